// The CUDA emulator's stand-in for mma.h (see cuda_runtime.h here): WMMA
// 16x16x16 fragments. Every lane loads whole A and B tiles; an accumulator's
// element e belongs to lane e % 32, which alone computes and stores it, so a
// warp does the tile's arithmetic once, as the tensor cores do. Each load,
// store and mma is a meeting point of the warp's lanes, as on the GPU.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  static constexpr int rows = 16, cols = 16;
  float values[16 * 16];  // [row][col] of the tile, widened to float
};

namespace detail {
inline float widen(float v) { return v; }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float widen(__half v) { return __half2float(v); }
inline int lane() { return emulated_lane(); }
// The tensor cores' rules: a 256-bit aligned pointer, and ldm a multiple of 16 bytes.
inline void check_access(const void* ptr, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    cuda_emulator::fault(cudaErrorMisalignedAddress, "wmma: a pointer not 256-bit aligned");
  if (ldm * element_bytes % 16 != 0)
    cuda_emulator::fault(cudaErrorMisalignedAddress, "wmma: ldm not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, typename T, typename Layout, typename Element>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const Element* ptr, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "a layout is needed");
  cuda_emulator::sync_warp();
  detail::check_access(ptr, ldm, sizeof(Element));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.values[r * 16 + c] = detail::widen(std::is_same_v<Layout, row_major> ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const float* ptr, unsigned ldm, layout_t layout) {
  cuda_emulator::sync_warp();
  detail::check_access(ptr, ldm, sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.values[r * 16 + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <typename T>
void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  cuda_emulator::sync_warp();
  detail::check_access(ptr, ldm, sizeof(float));
  for (int e = detail::lane(); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.values[e];
  }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& v : f.values) v = value;
}

template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  cuda_emulator::sync_warp();
  for (int e = detail::lane(); e < 256; e += 32) {
    const int r = e / 16, col = e % 16;
    float sum = c.values[e];
    for (int i = 0; i < 16; ++i) sum += a.values[r * 16 + i] * b.values[i * 16 + col];
    d.values[e] = sum;
  }
}

}  // namespace nvcuda::wmma
