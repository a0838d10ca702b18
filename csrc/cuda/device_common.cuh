// Device helpers shared by the CUDA backend's kernel files: widening to float and rounding back
// (T: float, __nv_bfloat16, __half; uint8_t: float8_e4m3 expert weights, core/fp8.h), warp and
// block reductions, one row of add_rmsnorm (the norm kernels and the fused routing kernel), the
// weighted sum of a token's expert outputs (moe_unpermute and its fusion with the next norm), rows
// of x widened for the expert GEMVs, and grid sizes. Every kernel accumulates in float and rounds once when it stores, as the CPU twins
// in csrc/cpu/cpu_backend.cpp do.
#pragma once

#include <type_traits>

#include "cuda/kernels.cuh"

namespace mixtral::cuda {

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
__device__ __forceinline__ uint8_t from_f32<uint8_t>(float v) { return float_to_fp8(v); }

// The reductions: combine(a, b) over the warp's 32 lanes or the whole block, every thread getting
// the result. shuffle_xor moves a value between lanes; a kernel file that reduces a struct of its
// own adds its overload.
// Float only: an int would pass through a float and lose its bits past 2^24.
template <typename V>
__device__ __forceinline__ V shuffle_xor(V v, int lane_mask) {
  static_assert(std::is_same_v<V, float>, "shuffle_xor: floats here; a struct's overload beside its kernel");
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

template <typename V, typename Combine>
__device__ __forceinline__ V warp_reduce(V v, Combine combine) {
  for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) v = combine(v, shuffle_xor(v, lane_mask));
  return v;
}

// blockDim.x a multiple of 32, at most 1024; `identity` stands for the warps the block lacks.
template <typename V, typename Combine>
__device__ V block_reduce(V v, V identity, Combine combine) {
  __shared__ V partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, combine);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_reduce(lane < warps ? partial[lane] : identity, combine);
}

struct Plus {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Plus{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, Max{}); }
__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, 0.0f, Plus{}); }

// kWidth elements of `row` from element k on, widened (loads of up to 16 bytes; k and the row keep them aligned).
template <typename T, int kWidth>
__device__ __forceinline__ void load_widened(const T* row, int64_t k, float (&values)[kWidth]) {
  constexpr int kStep = kWidth < kPack16<T> ? kWidth : kPack16<T>;
  for (int i = 0; i < kWidth; i += kStep) {
    const Pack<T, kStep> pack = *reinterpret_cast<const Pack<T, kStep>*>(row + k + i);
    for (int j = 0; j < kStep; ++j) values[i + j] = to_f32(pack.values[j]);
  }
}

inline unsigned blocks_for(int64_t items, int threads) { return static_cast<unsigned>((items + threads - 1) / threads); }

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

// moe_unpermute's sum for token t and column i of y [R, hidden]: weights[t, j] * y[expanded_to_permuted[t * k + j], i]
// over j ascending (deterministic).
template <typename T>
__device__ __forceinline__ float unpermute_sum(const T* y, const int32_t* expanded_to_permuted, const float* weights,
                                               int k, int64_t t, int64_t i, int64_t hidden) {
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) sum += weights[t * k + j] * to_f32(y[int64_t(expanded_to_permuted[t * k + j]) * hidden + i]);
  return sum;
}

}  // namespace mixtral::cuda
