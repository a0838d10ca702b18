// RoPE + paged KV append and decode attention: rope_kv_append, attention, rope_attention of core/backend.h;
// launch_rope_kv_append, launch_attention, attention_splits of cuda/kernels.cuh. Layouts as in core/backend.h, plus
// the split scratch: partials [T, Hq, splits, D] then log-sum-exps [T, Hq, splits] float, counters [T, Hkv] int32.
// Prefill in bfloat16 or float16 with tensor_cores set goes to cuda/attention_tc.cu when that kernel takes it.
//
// rope_kv_append_kernel:
//   grid:   one block per (token, head of qkv): (T, Hq + 2 Hkv).
//   block:  min(256, D rounded up to 32) threads, striding over the head's D / 2 pairs or D elements.
//   shared: none.
//   phases: 1. q and k heads: rotate-half RoPE of the pairs (i, i + D / 2) at positions[t], in place.
//           2. q heads stop; k and v heads sync (the rotated k is read back by other threads).
//           3. k and v heads: the row into cache row pos % page_size of page page_table[pos / page_size].
//
// attention_kernel (causal GQA over the paged cache; flash-decoding when split):
//   grid:   one block per (token, KV head, split): (T, Hkv, splits), splits = attention_splits(T, table_pages *
//           page_size), 1 unless T <= kSplitMaxTokens; split z covers [z * per_split, (z + 1) * per_split) of
//           [0, pos + 1), per_split = (pos + 1) / splits rounded up to whole 32-position tiles, at least
//           kMinSplitPositions (pos read on the device: one launch serves any position).
//   block:  group * 32 threads (group = Hq / Hkv); warp w is query head g * group + w, lane j scores position j of
//           a 32-position tile and keeps output elements lane + 32 c; all threads load the tiles.
//   shared: static bool last_split; dynamic 4 * group * D + sizeof(T) * (4 * 32 * (D + kWidth) + 2 * D): q [group][D]
//           float (scaled), [2 stages][K, V][32][D + kWidth] T (rows padded: 16-byte reads of different rows hit
//           different banks), the token's own [K, V][D] T; opted in past 48 KiB (opt_in_shared_memory).
//   phases: 1. Start tile 0's load (cp.async when D is a multiple of 16 bytes, else plain loads); each warp stores q
//              scaled by 1/sqrt(D) (rope_theta > 0: rotated and rounded to T first, as rope_kv_append stores it).
//           2. rope_theta > 0 (one token): the block whose split holds pos rotates the token's k, writes k and v
//              to the cache and uses them for that row (no other block reads it).
//           3. Per tile, the next loading meanwhile (two stages): scores, online softmax, acc += p_j * v_j in order.
//           4. No split: out = acc / denom. Split: partial output and log-sum-exp (-inf: empty) to scratch, counted
//              in split_counters[t, g]; the last block resets it to 0 and merges in split order, weights
//              exp(lse_z - max lse) (one launch, no merge kernel).
//
// Limits: D even, at most 256; group at most 32, and group * 32 threads within what the kernel's registers allow
// (no __launch_bounds__: launch() refuses more with a ShapeError); rope_theta > 0 for one token only; dynamic
// shared memory within the opt-in limit; with splits, scratch of T * Hq * splits * (D + 1) floats and T * Hkv
// counters, zero between launches.
#include <algorithm>
#include <cfloat>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"
#include "cuda/ptx.cuh"

namespace mixtral::cuda {

namespace {

// Rotate-half RoPE of the pair (x1, x2) = (x[i], x[i + head_dim / 2]) at position pos.
__device__ __forceinline__ void rope_pair(float x1, float x2, int i, int head_dim, int32_t pos, float rope_theta,
                                          float& y1, float& y2) {
  const float inv_freq = static_cast<float>(1.0 / pow(static_cast<double>(rope_theta), (2.0 * i) / head_dim));
  const float angle = static_cast<float>(pos) * inv_freq;
  const float c = cosf(angle), s = sinf(angle);
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

// rope_kv_append for one (token, head of qkv); see the file header.
template <typename T>
__global__ void rope_kv_append_kernel(T* qkv, int64_t width, int q_heads, int kv_heads, int head_dim,
                                      const int32_t* positions, float rope_theta, T* k_pool, T* v_pool,
                                      const int32_t* page_table, int page_size) {
  const int64_t t = blockIdx.x;
  const int head = blockIdx.y, half = head_dim / 2;
  const int32_t pos = positions[t];
  T* x = qkv + t * width + int64_t(head) * head_dim;
  const bool rotated = head < q_heads + kv_heads;
  if (rotated) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      float y1, y2;
      rope_pair(to_f32(x[i]), to_f32(x[i + half]), i, head_dim, pos, rope_theta, y1, y2);
      x[i] = from_f32<T>(y1);
      x[i + half] = from_f32<T>(y2);
    }
  }
  if (head < q_heads) return;
  __syncthreads();  // the rotated k is read back by other threads below
  const bool is_k = rotated;
  const int g = is_k ? head - q_heads : head - q_heads - kv_heads;
  T* dst = (is_k ? k_pool : v_pool) + cache_offset(page_table, page_size, kv_heads, g, pos, head_dim);
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) dst[i] = x[i];
}

constexpr int kTile = 32;  // cache positions per shared-memory tile: one per lane

// Starts loading cache positions [start, start + kTile) of KV head g into the K and V tiles
// [kTile][row_stride] T of a stage (positions from `end` on are zero): with kWidth = kPack16<T>
// by cp.async, 16 bytes per copy, else by plain loads of one element. Commits the copies as one group.
template <int kWidth, typename T>
__device__ void load_kv_tile(const T* k_pool, const T* v_pool, const int32_t* page_table, int page_size, int kv_heads,
                             int g, int head_dim, int64_t start, int64_t end, T* k_tile, T* v_tile, int row_stride) {
  const int packs_per_row = head_dim / kWidth;
  for (int idx = threadIdx.x; idx < kTile * packs_per_row; idx += blockDim.x) {
    const int p = idx / packs_per_row, i = idx % packs_per_row * kWidth;
    const int64_t pos = start + p;
    const bool present = pos < end;
    const int64_t offset = present ? cache_offset(page_table, page_size, kv_heads, g, pos, head_dim) + i : 0;
    if constexpr (kWidth == kPack16<T>) {
      cp_async_16(k_tile + p * row_stride + i, k_pool + offset, present);
      cp_async_16(v_tile + p * row_stride + i, v_pool + offset, present);
    } else {
      k_tile[p * row_stride + i] = present ? k_pool[offset] : from_f32<T>(0.0f);
      v_tile[p * row_stride + i] = present ? v_pool[offset] : from_f32<T>(0.0f);
    }
  }
  cp_async_commit();
}

// Warp-wide: the row's output from its splits' partial outputs, out = sum_z w_z partial_z / sum_z w_z
// with w_z = exp(lse_z - max lse) (splits past the context have lse -inf). Read past L1 (__ldcg):
// other blocks wrote them.
template <typename T>
__device__ void merge_split_partials(const float* partial_out, const float* partial_lse, int splits, int64_t row,
                                     int head_dim, T* out_row) {
  const int lane = threadIdx.x % 32;
  const float* lse = partial_lse + row * splits;
  float max_lse = -INFINITY;
  for (int z = 0; z < splits; ++z) max_lse = fmaxf(max_lse, __ldcg(lse + z));
  for (int i = lane; i < head_dim; i += 32) {
    float sum = 0.0f, weight_sum = 0.0f;
    for (int z = 0; z < splits; ++z) {
      const float split_lse = __ldcg(lse + z);
      if (split_lse == -INFINITY) continue;
      const float w = expf(split_lse - max_lse);
      sum += w * __ldcg(partial_out + (row * splits + z) * head_dim + i);
      weight_sum += w;
    }
    out_row[i] = from_f32<T>(sum / weight_sum);
  }
}

// kChunks (2, 4 or 8, at least ceil(D / 32)): output elements per lane, held in registers. kWidth: elements per
// K/V load, kPack16<T> (16 bytes) when D is a multiple of it, else 1. Grid, block, shared memory: the file header.
template <typename T, int kChunks, int kWidth>
__global__ void attention_kernel(const T* qkv, int64_t width, int q_heads, int kv_heads, int head_dim,
                                 const int32_t* positions, float rope_theta, T* k_pool, T* v_pool,
                                 const int32_t* page_table, int page_size, float scale, T* out,
                                 float* partial_out, float* partial_lse, int32_t* split_counters) {
  __shared__ bool last_split;
  float* q_shared = dynamic_shared_memory<float>();
  const int group = q_heads / kv_heads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t = blockIdx.x;
  const int g = blockIdx.y, head = g * group + warp;
  const int64_t length = int64_t(positions[t]) + 1;  // read on the device: one launch serves any position
  const bool split = gridDim.z > 1;
  const int64_t per_split =
      max(kMinSplitPositions, (length + gridDim.z * kTile - 1) / (gridDim.z * kTile) * kTile);
  const int64_t begin = split ? blockIdx.z * per_split : 0;
  const int64_t end = split ? min(length, begin + per_split) : length;
  float running_max = -FLT_MAX, denom = 0.0f, acc[kChunks];
  for (int c = 0; c < kChunks; ++c) acc[c] = 0.0f;
  if (begin < end) {  // the same for the whole block; a split past the end of the context reads nothing
    const int row_stride = head_dim + kWidth;
    T* stages = reinterpret_cast<T*>(q_shared + group * head_dim);  // 16-byte aligned: head_dim % kWidth == 0
    auto k_stage = [&](int64_t tile) { return stages + (tile % 2) * 2 * kTile * row_stride; };
    auto load = [&](int64_t tile) {
      T* k_tile = k_stage(tile);
      load_kv_tile<kWidth>(k_pool, v_pool, page_table, page_size, kv_heads, g, head_dim, begin + tile * kTile, end,
                           k_tile, k_tile + kTile * row_stride, row_stride);
    };
    const int64_t tiles = (end - begin + kTile - 1) / kTile;
    load(0);  // in flight while q (and the token's own row) are made ready
    const T* q = qkv + t * width + int64_t(head) * head_dim;
    const int half = head_dim / 2;
    const int32_t pos = static_cast<int32_t>(length - 1);
    if (rope_theta > 0.0f) {  // rotated and rounded to T, as rope_kv_append stores q
      for (int i = lane; i < half; i += 32) {
        float y1, y2;
        rope_pair(to_f32(q[i]), to_f32(q[i + half]), i, head_dim, pos, rope_theta, y1, y2);
        q_shared[warp * head_dim + i] = to_f32(from_f32<T>(y1)) * scale;
        q_shared[warp * head_dim + i + half] = to_f32(from_f32<T>(y2)) * scale;
      }
    } else {
      for (int i = lane; i < head_dim; i += 32) q_shared[warp * head_dim + i] = to_f32(q[i]) * scale;
    }
    const float* q_row = q_shared + warp * head_dim;
    // The token's own k (rotated) and v, when this block's positions end at the token's.
    const bool own_row = rope_theta > 0.0f && end == length;
    T* own_k = stages + 2 * 2 * kTile * row_stride;
    T* own_v = own_k + head_dim;
    if (own_row) {
      const T* k_new = qkv + t * width + int64_t(q_heads + g) * head_dim;
      const T* v_new = k_new + int64_t(kv_heads) * head_dim;
      const int64_t row = cache_offset(page_table, page_size, kv_heads, g, pos, head_dim);
      for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float y1, y2;
        rope_pair(to_f32(k_new[i]), to_f32(k_new[i + half]), i, head_dim, pos, rope_theta, y1, y2);
        own_k[i] = k_pool[row + i] = from_f32<T>(y1);
        own_k[i + half] = k_pool[row + i + half] = from_f32<T>(y2);
      }
      for (int i = threadIdx.x; i < head_dim; i += blockDim.x) own_v[i] = v_pool[row + i] = v_new[i];
    }

    for (int64_t tile = 0; tile < tiles; ++tile) {
      if (tile + 1 < tiles) {
        load(tile + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this tile (and q_shared, own_k, own_v) is written
      T* k_tile = k_stage(tile);
      T* v_tile = k_tile + kTile * row_stride;
      const int64_t start = begin + tile * kTile;
      if (own_row && tile + 1 == tiles) {  // the token's row is the last of the last tile
        const int64_t own = (pos - start) * row_stride;
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
          k_tile[own + i] = own_k[i];
          v_tile[own + i] = own_v[i];
        }
        __syncthreads();
      }
      const bool valid = start + lane < end;
      float score = -FLT_MAX;
      if (valid) {
        score = 0.0f;
        for (int i = 0; i < head_dim; i += kWidth) {
          const Pack<T, kWidth> k = *reinterpret_cast<const Pack<T, kWidth>*>(k_tile + lane * row_stride + i);
          for (int j = 0; j < kWidth; ++j) score += q_row[i + j] * to_f32(k.values[j]);
        }
      }
      const float new_max = fmaxf(running_max, warp_max(score));
      const float p = valid ? expf(score - new_max) : 0.0f;
      const float correction = expf(running_max - new_max);
      denom = denom * correction + warp_sum(p);
      for (int c = 0; c < kChunks; ++c) acc[c] *= correction;
      const int tile_rows = static_cast<int>(end - start < kTile ? end - start : kTile);
      for (int j = 0; j < tile_rows; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
        for (int c = 0; c < kChunks; ++c) {
          const int i = lane + 32 * c;
          if (i < head_dim) acc[c] += pj * to_f32(v_tile[j * row_stride + i]);
        }
      }
      running_max = new_max;
      __syncthreads();  // this stage is no longer read before the next load into it
    }
  }
  T* o = out + t * int64_t(q_heads) * head_dim + int64_t(head) * head_dim;
  if (!split) {
    for (int c = 0; c < kChunks; ++c) {
      const int i = lane + 32 * c;
      if (i < head_dim) o[i] = from_f32<T>(acc[c] / denom);
    }
    return;
  }
  const int64_t row = t * q_heads + head, partial = row * int64_t(gridDim.z) + blockIdx.z;
  if (begin < end) {
    for (int c = 0; c < kChunks; ++c) {
      const int i = lane + 32 * c;
      if (i < head_dim) partial_out[partial * head_dim + i] = acc[c] / denom;
    }
  }
  if (lane == 0) partial_lse[partial] = begin < end ? running_max + logf(denom) : -INFINITY;
  __threadfence();  // this block's partials are visible on the device before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = split_counters + t * kv_heads + g;
    last_split = atomicAdd(counter, 1) == int(gridDim.z) - 1;
    if (last_split) *counter = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!last_split) return;
  __threadfence();  // the other blocks' partials are read after their counts
  merge_split_partials(partial_out, partial_lse, static_cast<int>(gridDim.z), row, head_dim, o);
}

}  // namespace

template <typename T>
void launch_rope_kv_append(T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                           const int32_t* positions, float rope_theta, T* k_pool, T* v_pool,
                           const int32_t* page_table, int page_size, cudaStream_t stream) {
  if (tokens == 0) return;
  const dim3 grid(static_cast<unsigned>(tokens), shape.num_heads + 2 * shape.num_kv_heads);
  const int threads = std::min(256, (shape.head_dim + 31) / 32 * 32);
  launch(rope_kv_append_kernel<T>, grid, threads, 0, stream, qkv, width, shape.num_heads, shape.num_kv_heads,
         shape.head_dim, positions, rope_theta, k_pool, v_pool, page_table, page_size);
}

template <typename T>
void launch_attention(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                      const int32_t* positions, float rope_theta, T* k_pool, T* v_pool, const int32_t* page_table,
                      int64_t table_pages, int page_size, T* out, AttentionScratch scratch, bool tensor_cores,
                      cudaStream_t stream) {
  const int group = shape.num_heads / shape.num_kv_heads, d = shape.head_dim;
  MX_CHECK(group <= 32, ShapeError, "cuda attention: at most 32 query heads per KV head, got " << group);
  MX_CHECK(d <= 256, ShapeError, "cuda attention: head_dim at most 256, got " << d);
  MX_CHECK(rope_theta == 0.0f || tokens == 1, ShapeError,
           "cuda attention: RoPE and the KV append fused for one token only, got " << tokens);
  if (tokens == 0) return;
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores && tokens > kSplitMaxTokens &&
        launch_attention_tensor_cores(qkv, tokens, width, shape, positions, k_pool, v_pool, page_table, page_size, out,
                                      stream))
      return;
  }
  const int64_t splits = attention_splits(tokens, table_pages * page_size);
  if (splits > 1)
    MX_CHECK(scratch.floats >= tokens * shape.num_heads * splits * (d + 1) &&
                 scratch.counters >= tokens * shape.num_kv_heads,
             ShapeError, "cuda attention: scratch too small for " << splits << " splits");
  const dim3 grid(static_cast<unsigned>(tokens), shape.num_kv_heads, static_cast<unsigned>(splits));
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  float* partial_out = scratch.data;
  float* partial_lse = scratch.data + tokens * shape.num_heads * splits * d;
  auto launch_kernel = [&](auto chunks, auto pack) {
    constexpr int kChunks = decltype(chunks)::value, kWidth = decltype(pack)::value;
    const size_t shared_bytes =
        sizeof(float) * size_t(group) * d + sizeof(T) * (2 * 2 * kTile * size_t(d + kWidth) + 2 * size_t(d));
    const int limit = opt_in_shared_memory<attention_kernel<T, kChunks, kWidth>>();
    MX_CHECK(shared_bytes <= size_t(limit), ShapeError,
             "cuda attention: " << group << " heads per KV head of " << d << " need " << shared_bytes
                                << " bytes of shared memory, the device has " << limit);
    launch(attention_kernel<T, kChunks, kWidth>, grid, group * 32, shared_bytes, stream, qkv, width, shape.num_heads,
           shape.num_kv_heads, d, positions, rope_theta, k_pool, v_pool, page_table, page_size, scale, out, partial_out,
           partial_lse, scratch.split_counters);
  };
  auto launch_width = [&](auto chunks) {
    if (d % kPack16<T> == 0) launch_kernel(chunks, std::integral_constant<int, kPack16<T>>{});  // every Mixtral
    else launch_kernel(chunks, std::integral_constant<int, 1>{});
  };
  if (d <= 64) launch_width(std::integral_constant<int, 2>{});
  else if (d <= 128) launch_width(std::integral_constant<int, 4>{});
  else launch_width(std::integral_constant<int, 8>{});
}

int64_t attention_splits(int64_t tokens, int64_t max_positions) {
  if (tokens > kSplitMaxTokens || max_positions <= 2 * kMinSplitPositions) return 1;
  return std::min(kMaxSplits, (max_positions + kMinSplitPositions - 1) / kMinSplitPositions);
}

#define MX_INSTANTIATE(T) \
  template void launch_rope_kv_append<T>(T*, int64_t, int64_t, const AttentionShape&, const int32_t*, float, T*, \
                                         T*, const int32_t*, int, cudaStream_t); \
  template void launch_attention<T>(const T*, int64_t, int64_t, const AttentionShape&, const int32_t*, float, T*, \
                                    T*, const int32_t*, int64_t, int, T*, AttentionScratch, bool, cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
