// The expert FFN's elementwise kernels: moe_gather, silu_mul, moe_unpermute of core/backend.h; launch_moe_gather,
// launch_silu_mul, launch_moe_unpermute of cuda/kernels.cuh. Layouts as in core/backend.h.
//
// moe_gather_kernel (token rows into expert order):
//   grid:   one block per permuted row r: R blocks.
//   block:  256 threads, striding over the row kWidth elements at a time.
//   shared: none.
//   phases: 1. out[r] = x[permuted_to_expanded[r] / k].
//
// silu_mul_kernel (between the two expert GEMMs):
//   grid:   one thread per kWidth elements of out [R, F]: ceil(R * F / kWidth / 256) blocks.
//   block:  256 threads.
//   shared: none.
//   phases: 1. out = silu(gate) * up, gate and up the two halves of the row of gate_up, in float, rounded once.
//
// moe_unpermute_kernel (the weighted sum of a token's expert outputs, back in token order):
//   grid:   one block per token: T blocks.
//   block:  256 threads, striding over H.
//   shared: none.
//   phases: 1. out[t, i] = sum_j weights[t, j] * y[expanded_to_permuted[t * k + j], i], j ascending (deterministic).
//
// Limits: none beyond core/op_checks; 16-byte accesses only where widths and pointers allow (kWidth, below).
#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

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

template <typename T>
__global__ void moe_unpermute_kernel(const T* y, const int32_t* expanded_to_permuted, const float* weights, T* out,
                                     int k, int64_t hidden) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    out[t * hidden + i] = from_f32<T>(unpermute_sum(y, expanded_to_permuted, weights, k, t, i, hidden));
}

}  // namespace

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

#define MX_INSTANTIATE(T) \
  template void launch_moe_gather<T>(const T*, const int32_t*, int, T*, int64_t, int64_t, cudaStream_t); \
  template void launch_silu_mul<T>(const T*, T*, int64_t, int64_t, cudaStream_t); \
  template void launch_moe_unpermute<T>(const T*, const int32_t*, const float*, T*, int64_t, int, int64_t, \
                                        cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
