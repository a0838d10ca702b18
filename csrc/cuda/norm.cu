// Kernels of the residual stream: fill_uniform, embedding, add_rmsnorm, moe_unpermute_add_rmsnorm of
// core/backend.h; their launch_<op> of cuda/kernels.cuh. Layouts as in core/backend.h (fill_uniform also of
// float8_e4m3 bytes). A row kernel runs one block per token row.
//
// fill_uniform_kernel (synthetic weights):
//   grid:   grid-stride over n: min(ceil(n / 256), 65536) blocks.
//   block:  256 threads, one element per step.
//   shared: none.
//   phases: 1. data[i] = uniform_in(seed, i, low, high) (core/random.h), rounded to T: a value depends on (seed, i)
//              only, so any grid writes the same, and the CPU twin too (but in about one value of 2^29: nvcc
//              may fuse the multiply-add, in double).
//
// embedding_kernel:
//   grid:   one block per token: T blocks.
//   block:  256 threads, striding over H.
//   shared: none.
//   phases: 1. out[t] = table[ids[t]].
//
// add_rmsnorm_kernel:
//   grid:   one block per row: T blocks.
//   block:  512 threads, striding over H.
//   shared: block_sum's static float[32] (128 bytes).
//   phases: 1. residual += delta (when given), stored rounded to T; squares of the stored values summed per thread.
//           2. block_sum: shuffles in each warp, then over the warps (a fixed order: deterministic).
//           3. out = residual * (1 / sqrt(mean square + eps)) * weight, rounded to T (as the CPU twin).
//
// moe_unpermute_add_rmsnorm_kernel: add_rmsnorm_kernel's grid, block, shared memory and phases, with delta (not
// written) moe_unpermute's sum for the token, j ascending, rounded to T as moe_unpermute stores it.
//
// Limits: none beyond core/op_checks.
#include <algorithm>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

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
    return to_f32(from_f32<T>(unpermute_sum(y, expanded_to_permuted, weights, k, t, i, hidden)));
  };
  add_rmsnorm_row(residual + t * hidden, delta, true, norm_weight, eps, out + t * hidden, hidden);
}

}  // namespace

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

template void launch_fill_uniform<uint8_t>(uint8_t*, int64_t, uint64_t, float, float, cudaStream_t);

#define MX_INSTANTIATE(T) \
  template void launch_fill_uniform<T>(T*, int64_t, uint64_t, float, float, cudaStream_t); \
  template void launch_embedding<T>(const T*, const int32_t*, T*, int64_t, int64_t, cudaStream_t); \
  template void launch_add_rmsnorm<T>(T*, const T*, const T*, float, T*, int64_t, int64_t, cudaStream_t); \
  template void launch_moe_unpermute_add_rmsnorm<T>(const T*, const int32_t*, const float*, int, T*, const T*, \
                                                    float, T*, int64_t, int64_t, cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
