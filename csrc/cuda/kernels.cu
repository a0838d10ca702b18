// The hand-written CUDA kernels of the model (launchers declared in
// cuda/kernels.cuh; layouts in core/backend.h). Every kernel widens its
// inputs to float, accumulates in float and rounds once when it stores, as
// the CPU twins in csrc/cpu/cpu_backend.cpp do.
#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "cuda/cuda_check.cuh"
#include "cuda/kernels.cuh"
#include "cuda/ptx.cuh"

namespace mixtral::cuda {

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>  // uint8_t elements are float8_e4m3 (expert weights, core/fp8.h), the only byte dtype
__device__ __forceinline__ uint8_t from_f32<uint8_t>(float v) { return float_to_e4m3(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

unsigned blocks_for(int64_t items, int threads) { return static_cast<unsigned>((items + threads - 1) / threads); }

// ---- fill, embedding, norm -----------------------------------------------------------

template <typename T>
__global__ void fill_uniform_kernel(T* data, int64_t n, uint64_t seed, float low, float high) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    data[i] = from_f32<T>(uniform_in(seed, uint64_t(i), low, high));
}

template <typename T>
__global__ void embedding_kernel(const T* table, const int32_t* ids, T* out, int64_t hidden) {
  const T* src = table + int64_t(ids[blockIdx.x]) * hidden;
  T* dst = out + int64_t(blockIdx.x) * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}

// Row t of the residual stream: row += delta(i) (rounded to T, the norm reads it as stored) unless
// delta is null, then out_row = rmsnorm(row) * weight. Delta: a functor i -> float.
template <typename T, typename Delta>
__device__ void add_rmsnorm_row(T* row, const Delta& delta, bool add, const T* weight, float eps, T* out_row,
                                int64_t hidden) {
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_f32(row[i]);
    if (add) {
      const T stored = from_f32<T>(v + delta(i));
      row[i] = stored;
      v = to_f32(stored);
    }
    sum_sq += v * v;
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sum_sq) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    out_row[i] = from_f32<T>(to_f32(row[i]) * inv_rms * to_f32(weight[i]));
}

template <typename T>
__global__ void add_rmsnorm_kernel(T* residual, const T* delta, const T* weight, float eps, T* out,
                                   int64_t hidden) {
  const int64_t offset = int64_t(blockIdx.x) * hidden;
  add_rmsnorm_row(residual + offset, [&](int64_t i) { return to_f32(delta[offset + i]); }, delta != nullptr, weight,
                  eps, out + offset, hidden);
}

// delta(i) = moe_unpermute's sum for token blockIdx.x, rounded to T.
template <typename T>
__global__ void moe_unpermute_add_rmsnorm_kernel(const T* y, const int32_t* expanded_to_permuted,
                                                 const float* weights, int k, T* residual, const T* norm_weight,
                                                 float eps, T* out, int64_t hidden) {
  const int64_t t = blockIdx.x;
  auto delta = [&](int64_t i) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j)
      sum += weights[t * k + j] * to_f32(y[int64_t(expanded_to_permuted[t * k + j]) * hidden + i]);
    return to_f32(from_f32<T>(sum));
  };
  add_rmsnorm_row(residual + t * hidden, delta, true, norm_weight, eps, out + t * hidden, hidden);
}

// ---- attention ------------------------------------------------------------------

// Rotate-half RoPE of the pair (x1, x2) = (x[i], x[i + head_dim / 2]) at position pos.
__device__ __forceinline__ void rope_pair(float x1, float x2, int i, int head_dim, int32_t pos, float rope_theta,
                                          float& y1, float& y2) {
  const float inv_freq = static_cast<float>(1.0 / pow(static_cast<double>(rope_theta), (2.0 * i) / head_dim));
  const float angle = static_cast<float>(pos) * inv_freq;
  const float c = cosf(angle), s = sinf(angle);
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

// grid (tokens, Hq + 2 Hkv): the q and k heads are rotated in place, the k and v heads
// are written to cache row pos % page_size of page page_table[pos / page_size].
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

// grid (tokens, Hkv, splits), block (group * 32): warp w computes query head g * group + w with
// an online softmax over tiles of 32 cache positions (lane j scores position j of a tile); K and
// V tiles are shared by the group and stream through shared memory two stages deep (the next
// tile loads while this one is used). Without splits (gridDim.z 1) a block covers positions
// [0, pos + 1) and writes out. With splits (flash-decoding, for few tokens over a long cache)
// block z covers positions [z * per_split, (z + 1) * per_split), per_split = pos + 1 over the
// splits, rounded up to whole tiles and at least kMinSplitPositions, and writes its normalised
// partial output and log-sum-exp; the last block of a (token, KV head) to finish (counted in
// split_counters, which it sets back to 0) merges them into out. With rope_theta > 0 (one token:
// decode) the kernel also does rope_kv_append's work: q is rotated as it is loaded, and the block
// whose positions end at the token's writes the token's rotated k and its v into the cache and
// uses them in place of that cache row (no other block reads it). kChunks =
// ceil(head_dim / 32) output elements per lane; kWidth elements per load (kPack16<T>, 16 bytes,
// when head_dim allows, else 1). Shared memory: q [group][head_dim] float (scaled), then
// [2 stages][K, V][kTile][head_dim + kWidth] T (rows padded so that lanes reading 16 bytes of
// different rows hit different banks), then the token's own [K, V][head_dim] T.
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

// ---- mixture of experts ---------------------------------------------------------------

// Softmax over the E logits of one token, top-k (ties to the lower id), renormalised.
__device__ void route_token(const float* row, int num_experts, int k, int32_t* ids, float* w) {
  float max_logit = row[0];
  for (int e = 1; e < num_experts; ++e) max_logit = fmaxf(max_logit, row[e]);
  float denom = 0.0f;
  for (int e = 0; e < num_experts; ++e) denom += expf(row[e] - max_logit);
  float chosen_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float best_prob = 0.0f;
    for (int e = 0; e < num_experts; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= ids[i] == e;
      const float prob = expf(row[e] - max_logit) / denom;
      if (!taken && (best < 0 || prob > best_prob)) best = e, best_prob = prob;
    }
    ids[j] = best;
    chosen_sum += (w[j] = best_prob);
  }
  for (int j = 0; j < k; ++j) w[j] /= chosen_sum;
}

__global__ void router_topk_kernel(const float* logits, int64_t tokens, int num_experts, int k,
                                   int32_t* expert_ids, float* weights) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < tokens) route_token(logits + t * num_experts, num_experts, k, expert_ids + t * k, weights + t * k);
}

// The whole block (a multiple of 32 threads); warp e (looping over experts) scans the rows in
// order, 32 at a time, and places its expert's rows with a ballot, so the order within an expert
// is the row order. counts: shared int32 [num_experts + 1].
__device__ void permute_rows(const int32_t* expert_ids, int64_t rows, int num_experts, int32_t* counts,
                             int32_t* offsets, int32_t* permuted_to_expanded, int32_t* expanded_to_permuted) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int e = warp; e < num_experts; e += warps) {
    int32_t count = 0;
    for (int64_t base = 0; base < rows; base += 32) {
      const bool mine = base + lane < rows && expert_ids[base + lane] == e;
      count += __popc(__ballot_sync(0xffffffffu, mine));
    }
    if (lane == 0) counts[e + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    counts[0] = 0;
    for (int e = 0; e < num_experts; ++e) counts[e + 1] += counts[e];
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) offsets[e] = counts[e];
  for (int e = warp; e < num_experts; e += warps) {
    int32_t next = counts[e];
    for (int64_t base = 0; base < rows; base += 32) {
      const bool mine = base + lane < rows && expert_ids[base + lane] == e;
      const unsigned ballot = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int32_t r = next + __popc(ballot & ((1u << lane) - 1));
        permuted_to_expanded[r] = static_cast<int32_t>(base + lane);
        expanded_to_permuted[base + lane] = r;
      }
      next += __popc(ballot);
    }
  }
}

// One block; dynamic shared memory: the counts [E + 1], then, when `staged`, a copy of the expert
// ids [R] (one coalesced read, where the two passes of permute_rows would each wait on global loads).
__global__ void moe_permute_kernel(const int32_t* expert_ids, int64_t rows, int num_experts, bool staged,
                                   int32_t* offsets, int32_t* permuted_to_expanded, int32_t* expanded_to_permuted) {
  int32_t* counts = dynamic_shared_memory<int32_t>();
  const int32_t* ids = expert_ids;
  if (staged) {
    int32_t* copy = counts + num_experts + 1;
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) copy[i] = expert_ids[i];
    __syncthreads();
    ids = copy;
  }
  permute_rows(ids, rows, num_experts, counts, offsets, permuted_to_expanded, expanded_to_permuted);
}

// Permuted row r of expert e in each job's pointer arrays (ExpertGemmPointers).
__device__ __forceinline__ void write_expert_pointers(const ExpertPointerJobs& jobs, int64_t r, int expert) {
  for (int g = 0; g < jobs.count; ++g) {
    const ExpertGemmPointers& p = jobs.gemm[g];
    p.a[r] = p.w + size_t(expert) * p.n * p.k * p.in_element;
    p.b[r] = p.x + size_t(r) * p.k * p.in_element;
    p.c[r] = p.out + size_t(r) * p.n * p.out_element;
  }
}

constexpr int kRouteThreads = 1024;
constexpr int kRouteMaxPairs = int(kFusedRouteMaxTokens) * kFusedRouteMaxExperts;

// One block of kRouteThreads: the T * E dot products (pairs) are split into slices of the hidden
// size so that every warp has one (a pair per warp when there are more pairs than warps); kWidth
// elements per load (kPack16<T> when H allows). Then thread t routes token t, and the block
// permutes the expanded rows, gathers them and writes the jobs' pointer arrays. With a norm (its
// residual not null) the block first makes x itself: add_rmsnorm of each token's residual row.
template <typename T, int kWidth>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const T* x, const T* router, int tokens, int64_t hidden, int num_experts, int k, float* logits,
                 int32_t* expert_ids, float* weights, int32_t* offsets, int32_t* permuted_to_expanded,
                 int32_t* expanded_to_permuted, T* gathered, ExpertPointerJobs jobs, RouteNorm<T> norm) {
  if (norm.residual) {
    for (int t = 0; t < tokens; ++t) {
      const T* delta = norm.delta + t * hidden;
      add_rmsnorm_row(norm.residual + t * hidden, [&](int64_t i) { return to_f32(delta[i]); }, true, norm.weight,
                      norm.eps, norm.out + t * hidden, hidden);
    }
    __syncthreads();  // x (norm.out) is written
  }
  __shared__ float partial[kRouteMaxPairs];
  __shared__ float logits_shared[kRouteMaxPairs];
  __shared__ int32_t counts[kFusedRouteMaxExperts + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int pairs = tokens * num_experts;
  const int slices = max(1, warps / pairs);  // per pair
  const int64_t packs = hidden / kWidth;
  for (int item = warp; item < pairs * slices; item += warps) {
    const int pair = item / slices, slice = item % slices;
    const T* x_row = x + (pair / num_experts) * hidden;
    const T* w_row = router + (pair % num_experts) * hidden;
    float sum = 0.0f;
#pragma unroll 4
    for (int64_t p = packs * slice / slices + lane; p < packs * (slice + 1) / slices; p += 32) {
      const Pack<T, kWidth> a = reinterpret_cast<const Pack<T, kWidth>*>(x_row)[p];
      const Pack<T, kWidth> b = reinterpret_cast<const Pack<T, kWidth>*>(w_row)[p];
      for (int j = 0; j < kWidth; ++j) sum += to_f32(a.values[j]) * to_f32(b.values[j]);
    }
    sum = warp_sum(sum);
    if (lane == 0) partial[item] = sum;
  }
  __syncthreads();
  for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    float sum = 0.0f;
    for (int slice = 0; slice < slices; ++slice) sum += partial[pair * slices + slice];
    logits_shared[pair] = logits[pair] = sum;
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < tokens) route_token(logits_shared + t * num_experts, num_experts, k, expert_ids + t * k, weights + t * k);
  __syncthreads();  // the expert ids are written
  permute_rows(expert_ids, int64_t(tokens) * k, num_experts, counts, offsets, permuted_to_expanded,
               expanded_to_permuted);
  __syncthreads();  // the row map is written
  using Vec = Pack<T, kWidth>;
  for (int64_t idx = threadIdx.x; idx < tokens * k * packs; idx += blockDim.x) {
    const int64_t r = idx / packs, p = idx % packs;
    reinterpret_cast<Vec*>(gathered + r * hidden)[p] =
        reinterpret_cast<const Vec*>(x + (permuted_to_expanded[r] / k) * hidden)[p];
  }
  for (int r = threadIdx.x; r < tokens * k; r += blockDim.x)
    write_expert_pointers(jobs, r, expert_ids[permuted_to_expanded[r]]);
}

// kWidth elements per access in the next two kernels: kPack16<T> (16 bytes) when the row widths
// and pointers allow, else 1 (dispatch_pack_width).
template <typename T, int kWidth>
__global__ void moe_gather_kernel(const T* x, const int32_t* permuted_to_expanded, int k, T* out, int64_t hidden) {
  using Vec = Pack<T, kWidth>;
  const Vec* src = reinterpret_cast<const Vec*>(x + int64_t(permuted_to_expanded[blockIdx.x] / k) * hidden);
  Vec* dst = reinterpret_cast<Vec*>(out + int64_t(blockIdx.x) * hidden);
  for (int64_t i = threadIdx.x; i < hidden / kWidth; i += blockDim.x) dst[i] = src[i];
}

template <typename T, int kWidth>
__global__ void silu_mul_kernel(const T* gate_up, T* out, int64_t rows, int64_t width) {
  using Vec = Pack<T, kWidth>;
  const int64_t packs = width / kWidth, idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= rows * packs) return;
  const int64_t r = idx / packs, p = idx % packs;
  const Vec gate = reinterpret_cast<const Vec*>(gate_up + r * 2 * width)[p];
  const Vec up = reinterpret_cast<const Vec*>(gate_up + r * 2 * width + width)[p];
  Vec result;
  for (int j = 0; j < kWidth; ++j) {
    const float g = to_f32(gate.values[j]);
    result.values[j] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up.values[j]));
  }
  reinterpret_cast<Vec*>(out + r * width)[p] = result;
}

// ---- float8_e4m3 expert weights (core/fp8.h) ------------------------------------------------

// kWidth elements of row `row` of x from element k on, widened (16-byte loads when kWidth > 1).
template <typename T, int kWidth>
__device__ __forceinline__ void load_widened(const T* row, int64_t k, float (&values)[kWidth]) {
  constexpr int kStep = kWidth < kPack16<T> ? kWidth : kPack16<T>;
  for (int i = 0; i < kWidth; i += kStep) {
    const Pack<T, kStep> pack = *reinterpret_cast<const Pack<T, kStep>*>(row + k + i);
    for (int j = 0; j < kStep; ++j) values[i + j] = to_f32(pack.values[j]);
  }
}

// kE4M3GemvWarps warps a block, and registers bounded so that kMinBlocks blocks share an SM: 16
// warps for decode (up to 2 rows), enough loads in flight to stream the weights; 12 for up to 16
// rows, whose sums would spill at 16.
constexpr int kE4M3GemvWarps = 4;
template <int kMaxRows>
constexpr int kE4M3GemvMinBlocks = kMaxRows <= 2 ? 4 : 3;

// grid (ceil(N / (warps * kE4M3RowsPerWarp)), E): warp w of block b computes the kE4M3RowsPerWarp
// output columns from n0 = (b * warps + w) * kE4M3RowsPerWarp for the rows of expert blockIdx.y,
// at most kMaxRows of them, found from expert_offsets on the device. Lanes stride over K kWidth
// weight bytes at a time (16: one 16-byte load per row), each x chunk serving all the warp's
// columns; the weight bytes stay packed in registers and are widened where they are used. The
// float sums are reduced over the warp and scaled by the column's row scale.
template <typename T, int kWidth, int kMaxRows>
__global__ void __launch_bounds__(kE4M3GemvWarps * 32, kE4M3GemvMinBlocks<kMaxRows>)
    e4m3_expert_gemv_kernel(const T* x, const uint8_t* w, const float* row_scales, const int32_t* expert_offsets,
                            int64_t N, int64_t K, T* out) {
  const int e = blockIdx.y;
  const int64_t begin = expert_offsets[e], count = expert_offsets[e + 1] - begin;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = (int64_t(blockIdx.x) * (blockDim.x / 32) + warp) * kE4M3RowsPerWarp;
  if (count == 0 || n0 >= N) return;  // the same for the whole warp
  float acc[kE4M3RowsPerWarp][kMaxRows] = {};  // indexed by unrolled loops only: registers
  for (int64_t k = int64_t(lane) * kWidth; k < K; k += 32 * kWidth) {
    Pack<uint8_t, kWidth> bytes[kE4M3RowsPerWarp];
#pragma unroll
    for (int j = 0; j < kE4M3RowsPerWarp; ++j) {  // a column past N reads column n0's bytes, never stored
      bytes[j] = *reinterpret_cast<const Pack<uint8_t, kWidth>*>(w + (int64_t(e) * N + (n0 + j < N ? n0 + j : n0)) * K + k);
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < count) {
        float xs[kWidth];
        load_widened<T, kWidth>(x + (begin + r) * K, k, xs);
#pragma unroll
        for (int j = 0; j < kE4M3RowsPerWarp; ++j)
#pragma unroll
          for (int i = 0; i < kWidth; ++i) acc[j][r] += e4m3_to_float(bytes[j].values[i]) * xs[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= count) break;
#pragma unroll
    for (int j = 0; j < kE4M3RowsPerWarp; ++j) {
      const float sum = warp_sum(acc[j][r]);
      if (lane == 0 && n0 + j < N)
        out[(begin + r) * N + n0 + j] = from_f32<T>(sum * row_scales[int64_t(e) * N + n0 + j]);
    }
  }
}

// out[r, c] = e4m3(w[r, c]) * row_scales[r], rounded to T.
template <typename T>
__global__ void dequantize_e4m3_kernel(const uint8_t* w, const float* row_scales, int64_t rows, int64_t cols, T* out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(e4m3_to_float(w[i]) * row_scales[i / cols]);
}

template <typename T>
__global__ void moe_unpermute_kernel(const T* y, const int32_t* expanded_to_permuted, const float* weights, T* out,
                                     int k, int64_t hidden) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j)
      sum += weights[t * k + j] * to_f32(y[int64_t(expanded_to_permuted[t * k + j]) * hidden + i]);
    out[t * hidden + i] = from_f32<T>(sum);
  }
}

__global__ void expert_pointers_kernel(const int32_t* offsets, int num_experts, int64_t rows,
                                       ExpertPointerJobs jobs) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  int low = 0, high = num_experts - 1;  // the last e with offsets[e] <= r (empty experts skipped)
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (offsets[mid] <= r) low = mid;
    else high = mid - 1;
  }
  write_expert_pointers(jobs, r, low);
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------

template <typename T>
void launch_fill_uniform(T* data, int64_t n, uint64_t seed, float low, float high, cudaStream_t stream) {
  if (n == 0) return;
  launch(fill_uniform_kernel<T>, static_cast<unsigned>(std::min<int64_t>(blocks_for(n, 256), 65536)), 256, 0, stream,
         data, n, seed, low, high);
}

template <typename T>
void launch_embedding(const T* table, const int32_t* ids, T* out, int64_t tokens, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(embedding_kernel<T>, static_cast<unsigned>(tokens), 256, 0, stream, table, ids, out, hidden);
}

template <typename T>
void launch_add_rmsnorm(T* residual, const T* delta, const T* weight, float eps, T* out, int64_t rows,
                        int64_t hidden, cudaStream_t stream) {
  if (rows == 0) return;
  launch(add_rmsnorm_kernel<T>, static_cast<unsigned>(rows), 512, 0, stream, residual, delta, weight, eps, out, hidden);
}

template <typename T>
void launch_moe_unpermute_add_rmsnorm(const T* y, const int32_t* expanded_to_permuted, const float* weights, int k,
                                      T* residual, const T* norm_weight, float eps, T* out, int64_t tokens,
                                      int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(moe_unpermute_add_rmsnorm_kernel<T>, static_cast<unsigned>(tokens), 512, 0, stream, y, expanded_to_permuted,
         weights, k, residual, norm_weight, eps, out, hidden);
}

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

void launch_router_topk(const float* logits, int64_t tokens, int num_experts, int k, int32_t* expert_ids,
                        float* weights, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(router_topk_kernel, blocks_for(tokens, 128), 128, 0, stream, logits, tokens, num_experts, k, expert_ids,
         weights);
}

template <typename T>
void launch_route(const T* x, const T* router, int64_t tokens, int64_t hidden, int num_experts, int k, float* logits,
                  int32_t* expert_ids, float* weights, int32_t* expert_offsets, int32_t* permuted_to_expanded,
                  int32_t* expanded_to_permuted, T* gathered, const ExpertPointerJobs& jobs, const RouteNorm<T>& norm,
                  cudaStream_t stream) {
  MX_CHECK(tokens >= 1 && tokens <= kFusedRouteMaxTokens && num_experts <= kFusedRouteMaxExperts, ShapeError,
           "cuda route: " << tokens << " tokens over " << num_experts << " experts is not for the fused kernel");
  dispatch_pack_width<T>(hidden, {x, router, gathered}, [&](auto pack) {
    launch(route_kernel<T, decltype(pack)::value>, 1, kRouteThreads, 0, stream, x, router, static_cast<int>(tokens),
           hidden, num_experts, k, logits, expert_ids, weights, expert_offsets, permuted_to_expanded,
           expanded_to_permuted, gathered, jobs, norm);
  });
}

void launch_moe_permute(const int32_t* expert_ids, int64_t rows, int num_experts, int32_t* expert_offsets,
                        int32_t* permuted_to_expanded, int32_t* expanded_to_permuted, cudaStream_t stream) {
  const int threads = 32 * std::min(32, num_experts);
  const size_t counts_bytes = sizeof(int32_t) * (num_experts + 1), staged_bytes = counts_bytes + sizeof(int32_t) * rows;
  const bool staged = staged_bytes <= kDefaultSharedBytes;
  launch(moe_permute_kernel, 1, threads, staged ? staged_bytes : counts_bytes, stream, expert_ids, rows, num_experts,
         staged, expert_offsets, permuted_to_expanded, expanded_to_permuted);
}

template <typename T>
void launch_moe_gather(const T* x, const int32_t* permuted_to_expanded, int k, T* out, int64_t rows,
                       int64_t hidden, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_pack_width<T>(hidden, {x, out}, [&](auto pack) {
    launch(moe_gather_kernel<T, decltype(pack)::value>, static_cast<unsigned>(rows), 256, 0, stream, x,
           permuted_to_expanded, k, out, hidden);
  });
}

template <typename T>
void launch_silu_mul(const T* gate_up, T* out, int64_t rows, int64_t width, cudaStream_t stream) {
  if (rows * width == 0) return;
  dispatch_pack_width<T>(width, {gate_up, out}, [&](auto pack) {
    constexpr int kWidth = decltype(pack)::value;
    launch(silu_mul_kernel<T, kWidth>, blocks_for(rows * width / kWidth, 256), 256, 0, stream, gate_up, out, rows,
           width);
  });
}

template <typename T>
void launch_moe_unpermute(const T* y, const int32_t* expanded_to_permuted, const float* weights, T* out,
                          int64_t tokens, int k, int64_t hidden, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(moe_unpermute_kernel<T>, static_cast<unsigned>(tokens), 256, 0, stream, y, expanded_to_permuted, weights, out,
         k, hidden);
}

template <typename T>
void launch_e4m3_expert_gemv(const T* x, int64_t rows, const uint8_t* w, const float* row_scales, int num_experts,
                             const int32_t* expert_offsets, int64_t N, int64_t K, T* out, cudaStream_t stream) {
  if (rows == 0) return;
  // 16 columns a block: 768 blocks of two active experts for an 8x22B w2 (N 6144).
  constexpr int kWarps = kE4M3GemvWarps;
  const dim3 grid(blocks_for(N, kWarps * kE4M3RowsPerWarp), static_cast<unsigned>(num_experts));
  // 16 weight bytes per lane and row when K and both pointers keep rows of x and w 16-byte aligned.
  dispatch_pack_width<uint8_t>(K, {x, w}, [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    if (rows <= 2) {  // one token's two experts: a row bound of 2 keeps the sums few
      launch(e4m3_expert_gemv_kernel<T, kWidth, 2>, grid, kWarps * 32, 0, stream, x, w, row_scales, expert_offsets, N,
             K, out);
    } else {  // 8 weight bytes per load, so that 16 rows' sums fit the register bound without spilling
      constexpr int kManyRowsWidth = kWidth < 8 ? kWidth : 8;
      launch(e4m3_expert_gemv_kernel<T, kManyRowsWidth, int(kE4M3GemvMaxRows)>, grid, kWarps * 32, 0, stream, x, w,
             row_scales, expert_offsets, N, K, out);
    }
  });
}

template <typename T>
void launch_dequantize_e4m3(const uint8_t* w, const float* row_scales, int64_t rows, int64_t cols, T* out,
                            cudaStream_t stream) {
  if (rows * cols == 0) return;
  launch(dequantize_e4m3_kernel<T>, static_cast<unsigned>(std::min<int64_t>(blocks_for(rows * cols, 256), 65536)), 256,
         0, stream, w, row_scales, rows, cols, out);
}

void launch_expert_pointers(const int32_t* expert_offsets, int num_experts, int64_t rows,
                            const ExpertPointerJobs& jobs, cudaStream_t stream) {
  if (rows == 0) return;
  launch(expert_pointers_kernel, blocks_for(rows, 128), 128, 0, stream, expert_offsets, num_experts, rows, jobs);
}

template void launch_fill_uniform<uint8_t>(uint8_t*, int64_t, uint64_t, float, float, cudaStream_t);

#define MX_INSTANTIATE(T)                                                                                      \
  template void launch_e4m3_expert_gemv<T>(const T*, int64_t, const uint8_t*, const float*, int, const int32_t*,  \
                                          int64_t, int64_t, T*, cudaStream_t);                                   \
  template void launch_dequantize_e4m3<T>(const uint8_t*, const float*, int64_t, int64_t, T*, cudaStream_t);     \
  template void launch_fill_uniform<T>(T*, int64_t, uint64_t, float, float, cudaStream_t);                     \
  template void launch_embedding<T>(const T*, const int32_t*, T*, int64_t, int64_t, cudaStream_t);            \
  template void launch_add_rmsnorm<T>(T*, const T*, const T*, float, T*, int64_t, int64_t, cudaStream_t);     \
  template void launch_moe_unpermute_add_rmsnorm<T>(const T*, const int32_t*, const float*, int, T*, const T*,  \
                                                    float, T*, int64_t, int64_t, cudaStream_t);               \
  template void launch_rope_kv_append<T>(T*, int64_t, int64_t, const AttentionShape&, const int32_t*, float,  \
                                         T*, T*, const int32_t*, int, cudaStream_t);                          \
  template void launch_attention<T>(const T*, int64_t, int64_t, const AttentionShape&, const int32_t*, float, \
                                    T*, T*, const int32_t*, int64_t, int, T*, AttentionScratch, bool,         \
                                    cudaStream_t);                                                      \
  template void launch_route<T>(const T*, const T*, int64_t, int64_t, int, int, float*, int32_t*, float*,      \
                                int32_t*, int32_t*, int32_t*, T*, const ExpertPointerJobs&,                   \
                                const RouteNorm<T>&, cudaStream_t);                                            \
  template void launch_moe_gather<T>(const T*, const int32_t*, int, T*, int64_t, int64_t, cudaStream_t);      \
  template void launch_silu_mul<T>(const T*, T*, int64_t, int64_t, cudaStream_t);                             \
  template void launch_moe_unpermute<T>(const T*, const int32_t*, const float*, T*, int64_t, int, int64_t,    \
                                        cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)

}  // namespace mixtral::cuda
