// Prefill attention on the tensor cores (WMMA 16x16x16, bfloat16 or float16
// inputs, float32 accumulation), flash-attention style: a block takes 16
// query tokens of one KV group, one warp per query head of the group; tiles of
// 16 cached positions are loaded once per block (shared by the group), and
// each warp computes S = Q K^T, an online softmax with the causal mask, and
// O += P V. Layouts as in core/backend.h; head_dim 64 or 128 (template).
// Shared memory per block: K and V tiles [16][D] T, then per warp Q [16][D] T,
// S [16][16] float, P [16][16] T, O [16][D] float, row max and sum [16] float.
#include <mma.h>

#include <cfloat>

#include "cuda/cuda_check.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

using namespace nvcuda;

constexpr int kRows = 16;  // query tokens per block, cached positions per tile

template <typename T>
__device__ __forceinline__ T narrow(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }

template <typename T, int D>
constexpr size_t warp_bytes() {
  return kRows * D * sizeof(T) + kRows * kRows * sizeof(float) + kRows * kRows * sizeof(T) +
         kRows * D * sizeof(float) + 2 * kRows * sizeof(float);
}

template <typename T, int D>
constexpr size_t shared_bytes(int group) {
  return 2 * kRows * D * sizeof(T) + group * warp_bytes<T, D>();
}

template <typename T, int D>
__global__ void attention_tc_kernel(const T* qkv, int64_t width, int64_t tokens, int q_heads, int kv_heads,
                                    const int32_t* positions, const T* k_pool, const T* v_pool,
                                    const int32_t* page_table, int page_size, float scale, T* out) {
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  const int group = q_heads / kv_heads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t first = int64_t(blockIdx.x) * kRows;
  const int g = blockIdx.y, head = g * group + warp;
  T* k_tile = reinterpret_cast<T*>(smem);
  T* v_tile = k_tile + kRows * D;
  unsigned char* mine = smem + 2 * kRows * D * sizeof(T) + warp * warp_bytes<T, D>();
  T* q = reinterpret_cast<T*>(mine);
  float* s = reinterpret_cast<float*>(q + kRows * D);
  T* p = reinterpret_cast<T*>(s + kRows * kRows);
  float* o = reinterpret_cast<float*>(p + kRows * kRows);
  float* row_max = o + kRows * D;
  float* row_sum = row_max + kRows;

  // This warp's queries and state; rows past the last token stay zero and fully masked.
  for (int idx = lane; idx < kRows * D; idx += 32) {
    const int r = idx / D, d = idx % D;
    q[idx] = first + r < tokens ? qkv[(first + r) * width + int64_t(head) * D + d] : narrow<T>(0.0f);
    o[idx] = 0.0f;
  }
  if (lane < kRows) row_max[lane] = -FLT_MAX, row_sum[lane] = 0.0f;
  int32_t last = 0;  // the largest position in the block's tile of queries
  for (int r = 0; r < kRows && first + r < tokens; ++r) last = max(last, positions[first + r]);
  const int r = lane / 2, half = lane % 2;  // softmax: two lanes per row, 8 columns each
  const int32_t row_position = first + r < tokens ? positions[first + r] : -1;

  for (int32_t start = 0; start <= last; start += kRows) {
    __syncthreads();  // the previous tile is no longer read
    using Vec = Pack<T, kPack16<T>>;  // 16-byte loads and stores
    for (int idx = threadIdx.x; idx < kRows * D / kPack16<T>; idx += blockDim.x) {
      const int row = idx / (D / kPack16<T>), d = idx % (D / kPack16<T>) * kPack16<T>;
      const int64_t pos = start + row;
      Vec k, v;
      if (pos <= last) {
        const int64_t offset = cache_offset(page_table, page_size, kv_heads, g, pos, D) + d;
        k = *reinterpret_cast<const Vec*>(k_pool + offset), v = *reinterpret_cast<const Vec*>(v_pool + offset);
      } else {
        for (int j = 0; j < kPack16<T>; ++j) k.values[j] = v.values[j] = narrow<T>(0.0f);
      }
      *reinterpret_cast<Vec*>(k_tile + row * D + d) = k;
      *reinterpret_cast<Vec*>(v_tile + row * D + d) = v;
    }
    __syncthreads();

    // S = Q K^T: K [16][D] row-major is K^T [D][16] column-major.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> scores;
    wmma::fill_fragment(scores, 0.0f);
    for (int kk = 0; kk < D; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, q + kk, D);
      wmma::load_matrix_sync(b, k_tile + kk, D);
      wmma::mma_sync(scores, a, b, scores);
    }
    wmma::store_matrix_sync(s, scores, kRows, wmma::mem_row_major);
    __syncwarp();

    // Online softmax over the tile, causal: column c is position start + c.
    float values[8], local_max = -FLT_MAX;
    for (int c = 0; c < 8; ++c) {
      const int col = half * 8 + c;
      const bool visible = start + col <= row_position;
      values[c] = visible ? s[r * kRows + col] * scale : -FLT_MAX;
      local_max = fmaxf(local_max, values[c]);
    }
    const float tile_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, 1));
    const float old_max = row_max[r];
    const float new_max = fmaxf(old_max, tile_max);
    float local_sum = 0.0f;
    for (int c = 0; c < 8; ++c) {
      const float e = values[c] == -FLT_MAX ? 0.0f : expf(values[c] - new_max);
      p[r * kRows + half * 8 + c] = narrow<T>(e);
      local_sum += e;
    }
    const float tile_sum = local_sum + __shfl_xor_sync(0xffffffffu, local_sum, 1);
    const float correction = old_max == -FLT_MAX ? 0.0f : expf(old_max - new_max);
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) o[r * D + d] *= correction;
    __syncwarp();  // every lane has read row_max before it changes
    if (half == 0) row_max[r] = new_max, row_sum[r] = row_sum[r] * correction + tile_sum;
    __syncwarp();

    // O += P V: P [16][16] row-major, V [16][D] row-major.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> weights;
    wmma::load_matrix_sync(weights, p, kRows);
    for (int n = 0; n < D; n += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> values_tile;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(values_tile, v_tile + n, D);
      wmma::load_matrix_sync(acc, o + n, D, wmma::mem_row_major);
      wmma::mma_sync(acc, weights, values_tile, acc);
      wmma::store_matrix_sync(o + n, acc, D, wmma::mem_row_major);
    }
    __syncwarp();
  }
  for (int idx = lane; idx < kRows * D; idx += 32) {
    const int row = idx / D, d = idx % D;
    if (first + row < tokens)
      out[(first + row) * int64_t(q_heads) * D + int64_t(head) * D + d] = narrow<T>(o[idx] / row_sum[row]);
  }
}

template <typename T, int D>
bool launch_tc(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape, const int32_t* positions,
               const T* k_pool, const T* v_pool, const int32_t* page_table, int page_size, T* out, cudaStream_t stream) {
  const int group = shape.num_heads / shape.num_kv_heads;
  const size_t bytes = shared_bytes<T, D>(group);
  if (bytes > size_t(opt_in_shared_memory<attention_tc_kernel<T, D>>())) return false;
  const dim3 grid(static_cast<unsigned>((tokens + kRows - 1) / kRows), shape.num_kv_heads);
  launch(attention_tc_kernel<T, D>, grid, group * 32, bytes, stream, qkv, width, tokens, shape.num_heads,
         shape.num_kv_heads, positions, k_pool, v_pool, page_table, page_size, 1.0f / sqrtf(static_cast<float>(D)), out);
  return true;
}

}  // namespace

template <typename T>
bool launch_attention_tensor_cores(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                                   const int32_t* positions, const T* k_pool, const T* v_pool,
                                   const int32_t* page_table, int page_size, T* out, cudaStream_t stream) {
  if (tokens == 0) return true;
  if (shape.head_dim == 64)
    return launch_tc<T, 64>(qkv, tokens, width, shape, positions, k_pool, v_pool, page_table, page_size, out, stream);
  if (shape.head_dim == 128)
    return launch_tc<T, 128>(qkv, tokens, width, shape, positions, k_pool, v_pool, page_table, page_size, out, stream);
  return false;
}

template bool launch_attention_tensor_cores<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t,
                                                           const AttentionShape&, const int32_t*,
                                                           const __nv_bfloat16*, const __nv_bfloat16*, const int32_t*,
                                                           int, __nv_bfloat16*, cudaStream_t);
template bool launch_attention_tensor_cores<__half>(const __half*, int64_t, int64_t, const AttentionShape&,
                                                    const int32_t*, const __half*, const __half*, const int32_t*, int,
                                                    __half*, cudaStream_t);

}  // namespace mixtral::cuda
