// The warp-level PTX instructions of the tensor-core attention (cuda/attention_tc.cu), one inline
// function each: mma.sync m16n8k16 (bfloat16 or float16 in, float32 accumulate), ldmatrix .x4 (and
// .trans) from shared memory, and cp.async of 16 bytes from global to shared memory with its commit
// and wait. The CUDA emulator (tests/cuda_emulator) implements each with the same layouts.
//
// Fragments of m16n8k16 (PTX ISA), with g = lane / 4 and c = lane % 4; a 32-bit register holds two
// 16-bit elements, the lower-indexed one in its low half:
//   A, 16x16 row-major, 4 registers: (row g, cols 2c..2c+1), (g + 8, 2c..), (g, 2c + 8..), (g + 8, 2c + 8..)
//   B, 16x8 (k x n), 2 registers:   (k 2c..2c+1, n g), (k 2c + 8.., n g)
//   C and D, 16x8 float:           (g, 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1)
// ldmatrix .x4: lanes 8m..8m+7 give the row addresses (16 bytes each, 16-byte aligned) of 8x8
// matrix m; register m of lane l receives row l / 4, elements 2(l % 4)..+1 of matrix m (with
// .trans: column l / 4, rows 2(l % 4)..+1), which is a B fragment's register when the rows are n
// (or, with .trans, k).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace mixtral::cuda {

// Two values rounded to T (bfloat16 or float16) in one register, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
  else
    return uint32_t(__half_as_ushort(__float2half_rn(lo))) | uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16;
}

// d += a b for one 16x8x16 tile of the warp (fragments above); T is the element type of a and b.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  emulated_mma_16x8x16(d, a, b0, b1, std::is_same_v<T, __half>);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory; `row` is this lane's row address.
template <bool kTranspose>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  emulated_ldmatrix_x4(r, row, kTranspose);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTranspose)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
#endif
}

// Starts copying 16 bytes (both addresses 16-byte aligned) from global to shared memory, or
// writing 16 zero bytes there when `present` is false (src is then not read).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool present) {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  emulated_cp_async_16(shared, global, present);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(present ? 16 : 0)
               : "memory");
#endif
}

// Closes the group of this thread's copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  emulated_cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight; other
// threads' copies are visible after a __syncthreads that follows.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  emulated_cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

}  // namespace mixtral::cuda
