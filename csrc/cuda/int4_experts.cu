// int4 expert weights (core/int4.h): expert_matmul of core/backend.h for an int4 w; launch_expert_gemv_int4,
// launch_dequantize_int4, launch_gather_columns and launch_fill_uniform_int4 of cuda/kernels.cuh. w's codes
// [E, N, K / 2] bytes (two a byte, the lower column in the low nibble), float16 scales and uint8 zeros
// [E * N, groups]; x [R, K] and out [R, N] of T.
//
// expert_gemv_int4_kernel (decode: at most kExpertGemvInt4MaxRows rows; reads each weight byte once for all the rows
// of its expert):
//   grid:   one block per (16 output columns of [n_begin, n_begin + n_count), expert): (ceil(n_count / 16), E); an
//           expert without rows returns at once.
//   block:  kExpertGemvInt4Warps (4) warps; warp w of block b takes the 4 columns from n_begin + (b * 4 + w) * 4 for
//           every row of its expert; lanes stride over the codes, kWidth bytes (2 * kWidth codes) at a time.
//   shared: none.
//   phases: 1. The expert's rows [offsets[e], offsets[e + 1]) read on the device (no host sync, graph-capturable).
//           2. Per chunk of codes: the 4 columns' bytes loaded once (16 bytes per load on the fast path); each row's
//              x chunk widened once and used for all 4 columns. On the fast path a chunk lies in one group, so per
//              column it adds scale * (sum x * code - zero * sum x): the group's scale and zero applied once, in
//              registers; the fallback (kWidth 1) applies them per code.
//           3. Each sum reduced over the warp; lane 0 stores it, rounded to T.
//
// dequantize_int4_kernel (prefill: a chunk of rows for cuBLAS):
//   grid:   grid-stride over the chunk's bytes: min(ceil(rows * K / 2 / 256), 65536) blocks.
//   block:  256 threads, one byte (two codes) per step.
//   shared: none.
//   phases: 1. out[r, c] = (code - zero) * scale of c's group, rounded to T, for the byte's two columns.
//
// gather_columns_kernel (act order: x in each row segment's column order, once per expert and call):
//   grid:   (ceil(K / 256), min(R, 65535), segments), striding over the rows.
//   block:  256 threads, one column each.
//   shared: none.
//   phases: 1. The row's expert found from the offsets on the device; out[s, r, k] = x[r, order[e, s, k]].
//
// fill_uniform_int4_kernel (synthetic weights): grid-stride over bytes, 256 threads; byte b = int4_uniform_byte.
//
// Limits: the GEMV's R at most kExpertGemvInt4MaxRows (an expert's rows past kMaxRows would be left out); its fast
// path (kWidth 16, or 8 past 2 rows) needs K and the group size multiples of 32 and x, w 16-byte aligned, else
// kWidth 1.
#include <algorithm>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

constexpr int kExpertGemvInt4Warps = 4;
// As the FP8 GEMV: 16 warps an SM for decode (up to 2 rows), 12 for up to 16 rows.
template <int kMaxRows>
constexpr int kExpertGemvInt4MinBlocks = kMaxRows <= 2 ? 4 : 3;

// The value of a code 0..15 as a float without an int-to-float conversion (a quarter-rate instruction on the
// GPU): 2^23 + code has the code in its low mantissa bits, and subtracting 2^23 is exact.
__device__ __forceinline__ float code_value(uint32_t code) { return bits_float(0x4B000000u | code) - 8388608.0f; }

// kWidth: weight bytes per lane and load (16 or 8 on the fast path, else 1). kMaxRows: the bound of the rows of one
// expert, which sizes the register sums acc[4][kMaxRows] (2 for decode, else 16).
template <typename T, int kWidth, int kMaxRows>
__global__ void __launch_bounds__(kExpertGemvInt4Warps * 32, kExpertGemvInt4MinBlocks<kMaxRows>)
    expert_gemv_int4_kernel(const T* x, const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                            int64_t group_size, const int32_t* expert_offsets, int64_t N, int64_t n_begin,
                            int64_t n_count, int64_t K, T* out) {
  constexpr int kColumns = kExpertGemvInt4ColumnsPerWarp;
  constexpr int kCodes = 2 * kWidth;  // codes per load
  const int e = blockIdx.y;
  const int64_t begin = expert_offsets[e], count = expert_offsets[e + 1] - begin;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c0 = (int64_t(blockIdx.x) * (blockDim.x / 32) + warp) * kColumns;  // first column in the range
  if (count == 0 || c0 >= n_count) return;  // the same for the whole warp
  const int64_t groups = (K + group_size - 1) / group_size, row_bytes = K / 2;
  int64_t w_row[kColumns];  // e * N + n of each column; a column past the range reads the first one's, never stored
#pragma unroll
  for (int j = 0; j < kColumns; ++j) w_row[j] = int64_t(e) * N + n_begin + (c0 + j < n_count ? c0 + j : c0);
  float acc[kColumns][kMaxRows] = {};  // indexed by unrolled loops only: registers
  for (int64_t b = int64_t(lane) * kWidth; b < row_bytes; b += 32 * kWidth) {
    const int64_t k = 2 * b;  // the chunk's first column
    Pack<uint8_t, kWidth> bytes[kColumns];
#pragma unroll
    for (int j = 0; j < kColumns; ++j)
      bytes[j] = *reinterpret_cast<const Pack<uint8_t, kWidth>*>(codes + w_row[j] * row_bytes + b);
    if constexpr (kWidth > 1) {  // one group for the whole chunk
      float scale[kColumns], zero[kColumns];
#pragma unroll
      for (int j = 0; j < kColumns; ++j) {
        const int64_t g = w_row[j] * groups + k / group_size;
        scale[j] = __half2float(__ushort_as_half(scales[g]));
        zero[j] = float(zeros[g]);
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < count) {
          float xs[kCodes];
          load_widened<T, kCodes>(x + (begin + r) * K, k, xs);
          float x_sum = 0.0f;
#pragma unroll
          for (int i = 0; i < kCodes; ++i) x_sum += xs[i];
#pragma unroll
          for (int j = 0; j < kColumns; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < kWidth; ++i) {
              const uint32_t byte = bytes[j].values[i];
              dot += xs[2 * i] * code_value(byte & 0xFu) + xs[2 * i + 1] * code_value(byte >> 4);
            }
            acc[j][r] += scale[j] * (dot - zero[j] * x_sum);
          }
        }
      }
    } else {  // kWidth 1: the byte's two columns may lie in two groups
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r < count) {
          const T* x_row = x + (begin + r) * K;
          const float x0 = to_f32(x_row[k]), x1 = to_f32(x_row[k + 1]);
#pragma unroll
          for (int j = 0; j < kColumns; ++j) {
            const int64_t g0 = w_row[j] * groups + k / group_size, g1 = w_row[j] * groups + (k + 1) / group_size;
            const uint32_t byte = bytes[j].values[0];
            acc[j][r] += x0 * ((code_value(byte & 0xFu) - float(zeros[g0])) * __half2float(__ushort_as_half(scales[g0])));
            acc[j][r] += x1 * ((code_value(byte >> 4) - float(zeros[g1])) * __half2float(__ushort_as_half(scales[g1])));
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= count) break;
#pragma unroll
    for (int j = 0; j < kColumns; ++j) {
      const float sum = warp_sum(acc[j][r]);
      if (lane == 0 && c0 + j < n_count) out[(begin + r) * N + n_begin + c0 + j] = from_f32<T>(sum);
    }
  }
}

// out[r, c] = (code - zero) * scale, rounded to T; rows x K codes of one chunk.
template <typename T>
__global__ void dequantize_int4_kernel(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros,
                                       int64_t group_size, int64_t rows, int64_t K, T* out) {
  const int64_t bytes = rows * K / 2, groups = (K + group_size - 1) / group_size;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = 2 * i / K, k = 2 * i % K;
    const uint32_t byte = codes[i];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t g = r * groups + (k + half) / group_size;
      const float code = code_value(half ? byte >> 4 : byte & 0xFu);
      out[r * K + k + half] = from_f32<T>((code - float(zeros[g])) * __half2float(__ushort_as_half(scales[g])));
    }
  }
}

template <typename T>
__global__ void gather_columns_kernel(const T* x, int64_t R, int64_t K, const int32_t* input_order, int segments,
                                      const int32_t* expert_offsets, int num_experts, T* out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int s = blockIdx.z;
  if (k >= K) return;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    int e = 0;
    while (e + 1 < num_experts && expert_offsets[e + 1] <= r) ++e;
    out[(s * R + r) * K + k] = x[r * K + input_order[(int64_t(e) * segments + s) * K + k]];
  }
}

__global__ void fill_uniform_int4_kernel(uint8_t* data, int64_t bytes, uint64_t seed, float low, float high) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x)
    data[i] = int4_uniform_byte(seed, uint64_t(i), low, high);
}

}  // namespace

template <typename T>
void launch_expert_gemv_int4(const T* x, int64_t rows, const uint8_t* codes, const uint16_t* scales,
                             const uint8_t* zeros, int64_t group_size, int num_experts, const int32_t* expert_offsets,
                             int64_t N, int64_t n_begin, int64_t n_count, int64_t K, T* out, cudaStream_t stream) {
  if (rows == 0 || n_count == 0) return;
  constexpr int kWarps = kExpertGemvInt4Warps;
  const dim3 grid(blocks_for(n_count, kWarps * kExpertGemvInt4ColumnsPerWarp), static_cast<unsigned>(num_experts));
  // 16 bytes (32 codes, one group) per lane and load when K and the group size are multiples of 32 and every row of
  // x and w starts 16-byte aligned.
  const bool fast = K % 32 == 0 && group_size % 32 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(codes) % 16 == 0;
  auto run = [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    if (rows <= 2) {  // one token's two experts: a row bound of 2 keeps the sums few
      launch(expert_gemv_int4_kernel<T, kWidth, 2>, grid, kWarps * 32, 0, stream, x, codes, scales, zeros, group_size,
             expert_offsets, N, n_begin, n_count, K, out);
    } else {  // 8 bytes per load, so that 16 rows' sums fit the register bound without spilling
      constexpr int kManyRowsWidth = kWidth < 8 ? kWidth : 8;
      launch(expert_gemv_int4_kernel<T, kManyRowsWidth, int(kExpertGemvInt4MaxRows)>, grid, kWarps * 32, 0, stream, x,
             codes, scales, zeros, group_size, expert_offsets, N, n_begin, n_count, K, out);
    }
  };
  if (fast) run(std::integral_constant<int, 16>{});
  else run(std::integral_constant<int, 1>{});
}

template <typename T>
void launch_dequantize_int4(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t group_size,
                            int64_t rows, int64_t K, T* out, cudaStream_t stream) {
  if (rows * K == 0) return;
  launch(dequantize_int4_kernel<T>, static_cast<unsigned>(std::min<int64_t>(blocks_for(rows * K / 2, 256), 65536)),
         256, 0, stream, codes, scales, zeros, group_size, rows, K, out);
}

template <typename T>
void launch_gather_columns(const T* x, int64_t rows, int64_t K, const int32_t* input_order, int segments,
                           const int32_t* expert_offsets, int num_experts, T* out, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(blocks_for(K, 256), static_cast<unsigned>(std::min<int64_t>(rows, 65535)),
                  static_cast<unsigned>(segments));
  launch(gather_columns_kernel<T>, grid, 256, 0, stream, x, rows, K, input_order, segments, expert_offsets,
         num_experts, out);
}

void launch_fill_uniform_int4(uint8_t* data, int64_t bytes, uint64_t seed, float low, float high, cudaStream_t stream) {
  if (bytes == 0) return;
  launch(fill_uniform_int4_kernel, static_cast<unsigned>(std::min<int64_t>(blocks_for(bytes, 256), 65536)), 256, 0,
         stream, data, bytes, seed, low, high);
}

#define MX_INSTANTIATE(T) \
  template void launch_expert_gemv_int4<T>(const T*, int64_t, const uint8_t*, const uint16_t*, const uint8_t*, \
                                           int64_t, int, const int32_t*, int64_t, int64_t, int64_t, int64_t, T*, \
                                           cudaStream_t); \
  template void launch_dequantize_int4<T>(const uint8_t*, const uint16_t*, const uint8_t*, int64_t, int64_t, \
                                          int64_t, T*, cudaStream_t); \
  template void launch_gather_columns<T>(const T*, int64_t, int64_t, const int32_t*, int, const int32_t*, int, T*, \
                                         cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
