// float8_e4m3 expert weights (core/fp8.h): expert_matmul of core/backend.h for an fp8 w; launch_expert_gemv_fp8 and
// launch_dequantize_fp8 of cuda/kernels.cuh. w [E, N, K] bytes with one float32 scale per output row
// (row_scales [E * N]); x [R, K] and out [R, N] of T.
//
// expert_gemv_fp8_kernel (decode: at most kExpertGemvFp8MaxRows rows; reads each weight byte once for all the rows
// of its expert):
//   grid:   one block per (16 output columns, expert): (ceil(N / 16), E); an expert without rows returns at once.
//   block:  kExpertGemvFp8Warps (4) warps; warp w of block b takes the kExpertGemvFp8RowsPerWarp (4) columns from
//           n0 = (b * 4 + w) * 4 for every row of its expert; lanes stride over K, kWidth weight bytes at a time.
//   shared: none.
//   phases: 1. The expert's rows [offsets[e], offsets[e + 1]) read on the device (no host sync, graph-capturable).
//           2. Per K chunk: the 4 columns' weight bytes loaded once, kept packed in registers and widened where
//              used; each row's x chunk widened once and used for all 4 columns; float sums per (column, row).
//           3. Each sum reduced over the warp; lane 0 stores it times the column's row scale, rounded to T.
//
// dequantize_fp8_kernel (prefill: a chunk of rows for cuBLAS):
//   grid:   grid-stride over rows * cols: min(ceil(rows * cols / 256), 65536) blocks.
//   block:  256 threads, one element per step.
//   shared: none.
//   phases: 1. out[r, c] = e4m3(w[r, c]) * row_scales[r], rounded to T.
//
// Limits: the GEMV's R at most kExpertGemvFp8MaxRows (an expert's rows past kMaxRows would be left out); kWidth 16
// bytes only when K is a multiple of 16 and x and w are 16-byte aligned, else 1.
#include <algorithm>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

// kExpertGemvFp8Warps warps a block, and registers bounded so that kMinBlocks blocks share an SM: 16
// warps for decode (up to 2 rows), enough loads in flight to stream the weights; 12 for up to 16
// rows, whose sums would spill at 16.
constexpr int kExpertGemvFp8Warps = 4;
template <int kMaxRows>
constexpr int kExpertGemvFp8MinBlocks = kMaxRows <= 2 ? 4 : 3;

// kWidth: weight bytes per lane and load (16, or 8 for more than 2 rows, else 1). kMaxRows: the bound of the rows
// of one expert, which sizes the register sums acc[kExpertGemvFp8RowsPerWarp][kMaxRows] (2 for decode, else 16).
template <typename T, int kWidth, int kMaxRows>
__global__ void __launch_bounds__(kExpertGemvFp8Warps * 32, kExpertGemvFp8MinBlocks<kMaxRows>)
    expert_gemv_fp8_kernel(const T* x, const uint8_t* w, const float* row_scales, const int32_t* expert_offsets,
                            int64_t N, int64_t K, T* out) {
  const int e = blockIdx.y;
  const int64_t begin = expert_offsets[e], count = expert_offsets[e + 1] - begin;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = (int64_t(blockIdx.x) * (blockDim.x / 32) + warp) * kExpertGemvFp8RowsPerWarp;
  if (count == 0 || n0 >= N) return;  // the same for the whole warp
  float acc[kExpertGemvFp8RowsPerWarp][kMaxRows] = {};  // indexed by unrolled loops only: registers
  for (int64_t k = int64_t(lane) * kWidth; k < K; k += 32 * kWidth) {
    Pack<uint8_t, kWidth> bytes[kExpertGemvFp8RowsPerWarp];
#pragma unroll
    for (int j = 0; j < kExpertGemvFp8RowsPerWarp; ++j) {  // a column past N reads column n0's bytes, never stored
      bytes[j] = *reinterpret_cast<const Pack<uint8_t, kWidth>*>(w + (int64_t(e) * N + (n0 + j < N ? n0 + j : n0)) * K + k);
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < count) {
        float xs[kWidth];
        load_widened<T, kWidth>(x + (begin + r) * K, k, xs);
#pragma unroll
        for (int j = 0; j < kExpertGemvFp8RowsPerWarp; ++j)
#pragma unroll
          for (int i = 0; i < kWidth; ++i) acc[j][r] += fp8_to_float(bytes[j].values[i]) * xs[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= count) break;
#pragma unroll
    for (int j = 0; j < kExpertGemvFp8RowsPerWarp; ++j) {
      const float sum = warp_sum(acc[j][r]);
      if (lane == 0 && n0 + j < N)
        out[(begin + r) * N + n0 + j] = from_f32<T>(sum * row_scales[int64_t(e) * N + n0 + j]);
    }
  }
}

// out[r, c] = e4m3(w[r, c]) * row_scales[r], rounded to T.
template <typename T>
__global__ void dequantize_fp8_kernel(const uint8_t* w, const float* row_scales, int64_t rows, int64_t cols, T* out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(fp8_to_float(w[i]) * row_scales[i / cols]);
}

}  // namespace

template <typename T>
void launch_expert_gemv_fp8(const T* x, int64_t rows, const uint8_t* w, const float* row_scales, int num_experts,
                            const int32_t* expert_offsets, int64_t N, int64_t K, T* out, cudaStream_t stream) {
  if (rows == 0) return;
  // 16 columns a block: 768 blocks of two active experts for an 8x22B w2 (N 6144).
  constexpr int kWarps = kExpertGemvFp8Warps;
  const dim3 grid(blocks_for(N, kWarps * kExpertGemvFp8RowsPerWarp), static_cast<unsigned>(num_experts));
  // 16 weight bytes per lane and row when K and both pointers keep rows of x and w 16-byte aligned.
  dispatch_pack_width<uint8_t>(K, {x, w}, [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    if (rows <= 2) {  // one token's two experts: a row bound of 2 keeps the sums few
      launch(expert_gemv_fp8_kernel<T, kWidth, 2>, grid, kWarps * 32, 0, stream, x, w, row_scales, expert_offsets, N,
             K, out);
    } else {  // 8 weight bytes per load, so that 16 rows' sums fit the register bound without spilling
      constexpr int kManyRowsWidth = kWidth < 8 ? kWidth : 8;
      launch(expert_gemv_fp8_kernel<T, kManyRowsWidth, int(kExpertGemvFp8MaxRows)>, grid, kWarps * 32, 0, stream, x, w,
             row_scales, expert_offsets, N, K, out);
    }
  });
}

template <typename T>
void launch_dequantize_fp8(const uint8_t* w, const float* row_scales, int64_t rows, int64_t cols, T* out,
                           cudaStream_t stream) {
  if (rows * cols == 0) return;
  launch(dequantize_fp8_kernel<T>, static_cast<unsigned>(std::min<int64_t>(blocks_for(rows * cols, 256), 65536)), 256,
         0, stream, w, row_scales, rows, cols, out);
}

#define MX_INSTANTIATE(T) \
  template void launch_expert_gemv_fp8<T>(const T*, int64_t, const uint8_t*, const float*, int, const int32_t*, \
                                          int64_t, int64_t, T*, cudaStream_t); \
  template void launch_dequantize_fp8<T>(const uint8_t*, const float*, int64_t, int64_t, T*, cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
