// Launchers of the hand-written CUDA kernels, one op family per file beside its kernels (norm.cu,
// attention.cu and attention_tc.cu, routing.cu, expert_ffn.cu, fp8_experts.cu, int4_experts.cu,
// sampling.cu). Each one
// enqueues on `stream` and checks the launch; layouts are those of
// core/backend.h, element types float, __nv_bfloat16 or __half (T) (expert
// weights also float8_e4m3 bytes, core/fp8.h, or int4 codes, core/int4.h), with float32 accumulation.
// Arguments were checked by core/op_checks first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/backend.h"
#include "cuda/cuda_check.cuh"

namespace mixtral::cuda {

// ---- The decode limits: where the paths for a few tokens stop, and why ----
// A decode step has 1 token and k = 2 expanded rows; each limit leaves room for 8 tokens (16 rows).
// Up to kBatchedMaxRows rows, the expert GEMMs take the batched path (cublasGemmBatchedEx with
// device pointer arrays: no host sync, recordable in a graph). It runs one 1-row GEMM per row, each
// reading its expert's whole weight, so past a few rows per expert the per-expert GEMMs (each
// expert's weight read once, offsets read on the host) win.
constexpr int64_t kBatchedMaxRows = 16;
// FP8 and int4 experts up to this many rows take their hand-written GEMVs (no host sync), whose
// per-row sums live in registers: 16 rows is what their launch bounds hold without spilling on
// sm_90a (the int4 one at its bound; on sm_100a ptxas spills a few bytes of it).
constexpr int64_t kExpertGemvFp8MaxRows = 16;
constexpr int64_t kExpertGemvInt4MaxRows = 16;
// The fused routing kernel is one block: its tokens x experts dot products and the per-expert
// counts live in static shared memory sized by these.
constexpr int64_t kFusedRouteMaxTokens = 8;
constexpr int kFusedRouteMaxExperts = 32;
// Up to kSplitMaxTokens tokens, attention splits the cached positions over several blocks per
// (token, KV head) (flash-decoding): so few blocks would leave most SMs idle. At most kMaxSplits
// splits (with Mixtral's 8 KV heads, 512 blocks: every SM busy at 64k positions), each of at
// least kMinSplitPositions positions. The split scratch is sized for kSplitMaxTokens tokens.
constexpr int64_t kSplitMaxTokens = 8;
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMinSplitPositions = 128;

// Shared memory a block may take without opting in (static and dynamic together).
constexpr size_t kDefaultSharedBytes = 48 << 10;

// Lets Kernel use the device's opt-in shared memory per block, less its static __shared__
// arrays (the runtime refuses an attribute that, with them, passes the limit), and returns that
// many bytes: the most dynamic shared memory a launch of Kernel may ask for. Set once per kernel.
template <auto Kernel>
int opt_in_shared_memory() {
  static const int bytes = [] {
    int device = 0, limit = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const void* kernel = reinterpret_cast<const void*>(Kernel);
    const int dynamic = limit - static_cast<int>(kernel_limits(kernel).static_shared);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic));
    return dynamic;
  }();
  return bytes;
}

// The block's dynamic shared memory (the launch's shared_bytes) as T[], 128-byte aligned. The
// CUDA emulator that runs the kernels in the CPU-only tests (tests/cuda_emulator) has its own.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef MIXTRAL_EXT_CUDA_EMULATOR
  return reinterpret_cast<T*>(emulated_dynamic_shared_memory());
#else
  extern __shared__ __align__(128) unsigned char block_shared_memory[];
  return reinterpret_cast<T*>(block_shared_memory);
#endif
}

// kWidth elements of T read or written as one access (16 bytes: one vector load or store); the
// address must be aligned to the pack's size.
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T values[kWidth];
};
template <typename T>
constexpr int kPack16 = 16 / sizeof(T);  // elements of T in 16 bytes

// Calls fn(std::integral_constant<int, W>{}) with W = kPack16<T> when `width` (elements of T) is a
// multiple of it and every pointer is 16-byte aligned, so rows of that width go 16 bytes at a
// time; else W = 1.
template <typename T, typename Fn>
void dispatch_pack_width(int64_t width, std::initializer_list<const void*> pointers, Fn&& fn) {
  bool aligned = width % kPack16<T> == 0;
  for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (aligned) fn(std::integral_constant<int, kPack16<T>>{});
  else fn(std::integral_constant<int, 1>{});
}

// Element offset of cache row `pos` of KV head g in a [num_pages, Hkv, page_size, D] pool.
__device__ __forceinline__ int64_t cache_offset(const int32_t* page_table, int page_size, int kv_heads, int g,
                                                int64_t pos, int head_dim) {
  return ((int64_t(page_table[pos / page_size]) * kv_heads + g) * page_size + pos % page_size) * head_dim;
}

// Calls fn(T{}) with T the device type of a float dtype.
template <typename Fn>
void dispatch_device_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
    case DType::kFloat16: fn(__half{}); return;
    default: throw ShapeError(std::string("expected a float dtype, got ") + dtype_name(dtype));
  }
}

// data[i] = uniform_in(seed, i, low, high) (core/random.h), rounded to T (uint8_t: float8_e4m3).
template <typename T>
void launch_fill_uniform(T* data, int64_t n, uint64_t seed, float low, float high, cudaStream_t stream);

// out[t] = table[ids[t]]: table [V, H], out [T, H].
template <typename T>
void launch_embedding(const T* table, const int32_t* ids, T* out, int64_t tokens, int64_t hidden, cudaStream_t stream);

// residual += delta (if given), out = rmsnorm(residual) * weight; rows of `hidden`.
template <typename T>
void launch_add_rmsnorm(T* residual, const T* delta, const T* weight, float eps, T* out, int64_t rows,
                        int64_t hidden, cudaStream_t stream);

// Rotate-half RoPE on the q and k heads of qkv [T, width], k and v into the paged pools.
template <typename T>
void launch_rope_kv_append(T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                           const int32_t* positions, float rope_theta, T* k_pool, T* v_pool,
                           const int32_t* page_table, int page_size, cudaStream_t stream);

// Causal GQA attention over the paged cache; one block per (token, KV head), one warp per
// query head of the group, the group's K/V tiles loaded once into shared memory (by cp.async,
// two stages deep, when head_dim is a multiple of 16 bytes). For at most kSplitMaxTokens tokens
// over a cache of more than 2 * kMinSplitPositions positions (page table capacity, table_pages *
// page_size) the positions are split over attention_splits() blocks per (token, KV head)
// (flash-decoding), at most kMaxSplits; each token's split length is set on the device from its
// position (at least kMinSplitPositions, so a short context leaves the later blocks idle), and
// the last split block of each (token, KV head) to finish merges the splits by their
// log-sum-exp (one launch, no merge kernel).
struct AttentionScratch {
  float* data;              // [tokens * Hq * splits * (head_dim + 1)] partial outputs and log-sum-exps
  int64_t floats;
  int32_t* split_counters;  // [tokens * Hkv], zero between launches (the merging block resets its own)
  int64_t counters;
};
// More tokens (prefill) in bfloat16 or float16 with head_dim 64 or 128 go to the tensor-core
// kernel (cuda/attention_tc.cu) when tensor_cores is set. With rope_theta > 0 (one token only)
// the kernel first does rope_kv_append's work for the token (q rotated as it is read, its k and v
// into the cache), leaving qkv as it was; with 0 q and the cache are used as they are.
int64_t attention_splits(int64_t tokens, int64_t max_positions);
template <typename T>
void launch_attention(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                      const int32_t* positions, float rope_theta, T* k_pool, T* v_pool, const int32_t* page_table,
                      int64_t table_pages, int page_size, T* out, AttentionScratch scratch, bool tensor_cores,
                      cudaStream_t stream);

// Flash-attention style prefill on the tensor cores; false (nothing launched) for a head_dim
// other than 64 or 128, or K/V tiles past the device's opt-in shared memory.
template <typename T>
bool launch_attention_tensor_cores(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                                   const int32_t* positions, const T* k_pool, const T* v_pool,
                                   const int32_t* page_table, int page_size, T* out, cudaStream_t stream);

// Softmax over E experts, top-k (ties to the lower id), renormalised: logits [T, E] float32.
void launch_router_topk(const float* logits, int64_t tokens, int num_experts, int k, int32_t* expert_ids,
                        float* weights, cudaStream_t stream);

// The device pointer arrays of one batched expert GEMM (cublasGemmBatchedEx, one 1-row GEMM per
// permuted row r of expert e): a[r] = w + e*n*k (w [E, n, k]), b[r] = x + r*k (x [R, k]),
// c[r] = out + r*n (out [R, n]); element sizes in bytes.
struct ExpertGemmPointers {
  const char* w;
  const char* x;
  char* out;
  int64_t n, k;
  size_t in_element, out_element;
  const void** a;  // [R]
  const void** b;  // [R]
  void** c;        // [R]
};
// The pointer arrays of up to two batched expert GEMMs (a layer's w13 and w2), written by one
// launch; count 0 writes none.
struct ExpertPointerJobs {
  ExpertGemmPointers gemm[2];
  int count;
};

// Writes the jobs' pointer arrays for R rows, expert(r) the e with offsets[e] <= r < offsets[e + 1].
void launch_expert_pointers(const int32_t* expert_offsets, int num_experts, int64_t rows,
                            const ExpertPointerJobs& jobs, cudaStream_t stream);

// The add_rmsnorm a fused routing kernel does first (residual += delta, out = rmsnorm(residual) *
// weight; out is the routing's x), or none (residual null). residual, delta, out [T, H]; weight [H].
template <typename T>
struct RouteNormPointers {
  T* residual;
  const T* delta;
  const T* weight;
  float eps;
  T* out;
};

// router_topk, moe_permute and moe_gather of logits = x @ router^T in one kernel of one block,
// for at most kFusedRouteMaxTokens tokens and kFusedRouteMaxExperts experts (decode): x [T, H]
// and router [E, H] of T, logits [T, E] float32 written too, gathered [R, H] of T; then the
// pointer arrays of `jobs` (launch_expert_pointers) from the routing just made. With `norm`,
// x is first made by its add_rmsnorm. The dot products are split over the block's warps and
// summed in a fixed order.
template <typename T>
void launch_route(const T* x, const T* router, int64_t tokens, int64_t hidden, int num_experts, int k, float* logits,
                  int32_t* expert_ids, float* weights, int32_t* expert_offsets, int32_t* permuted_to_expanded,
                  int32_t* expanded_to_permuted, T* gathered, const ExpertPointerJobs& jobs,
                  const RouteNormPointers<T>& norm, cudaStream_t stream);

// Groups expanded rows by expert, stable in the row index: offsets [E + 1], both row maps [R].
void launch_moe_permute(const int32_t* expert_ids, int64_t rows, int num_experts, int32_t* expert_offsets,
                        int32_t* permuted_to_expanded, int32_t* expanded_to_permuted, cudaStream_t stream);

// out[r] = x[permuted_to_expanded[r] / k].
template <typename T>
void launch_moe_gather(const T* x, const int32_t* permuted_to_expanded, int k, T* out, int64_t rows,
                       int64_t hidden, cudaStream_t stream);

// out = silu(gate_up[:, :F]) * gate_up[:, F:].
template <typename T>
void launch_silu_mul(const T* gate_up, T* out, int64_t rows, int64_t width, cudaStream_t stream);

// moe_unpermute's sum for token t (rounded to T, as moe_unpermute stores it) added to residual
// row t, then add_rmsnorm's out; one block per token.
template <typename T>
void launch_moe_unpermute_add_rmsnorm(const T* y, const int32_t* expanded_to_permuted, const float* weights, int k,
                                      T* residual, const T* norm_weight, float eps, T* out, int64_t tokens,
                                      int64_t hidden, cudaStream_t stream);

// out[t] = sum_j weights[t, j] * y[expanded_to_permuted[t*k + j]], j ascending (deterministic).
template <typename T>
void launch_moe_unpermute(const T* y, const int32_t* expanded_to_permuted, const float* weights, T* out,
                          int64_t tokens, int k, int64_t hidden, cudaStream_t stream);

// float8_e4m3 expert weights w [E, N, K] with row scales [E * N] (core/fp8.h).
// expert_matmul for at most kExpertGemvFp8MaxRows rows (decode): out [R, N] = x [R, K] @ dequantized w[e]^T per
// expert e, its rows found from expert_offsets on the device (no host sync, graph-capturable); each warp
// computes kExpertGemvFp8RowsPerWarp output columns, reading their weights once.
constexpr int kExpertGemvFp8RowsPerWarp = 4;
template <typename T>
void launch_expert_gemv_fp8(const T* x, int64_t rows, const uint8_t* w, const float* row_scales, int num_experts,
                            const int32_t* expert_offsets, int64_t N, int64_t K, T* out, cudaStream_t stream);
// out [rows, cols] of T = e4m3(w) * row scale, for cuBLAS to multiply (prefill).
template <typename T>
void launch_dequantize_fp8(const uint8_t* w, const float* row_scales, int64_t rows, int64_t cols, T* out,
                           cudaStream_t stream);

// int4 expert weights (core/int4.h): codes [E, N, K / 2] bytes, float16 scales and uint8 zeros
// [E * N, groups], groups of group_size input columns.
// expert_matmul for at most kExpertGemvInt4MaxRows rows (decode) on the columns [n_begin, n_begin +
// n_count) of out [R, N] = x [R, K] @ dequantized w[e]^T per expert e, its rows found from
// expert_offsets on the device (no host sync, graph-capturable); each warp computes
// kExpertGemvInt4ColumnsPerWarp output columns, reading their codes once.
constexpr int kExpertGemvInt4ColumnsPerWarp = 4;
template <typename T>
void launch_expert_gemv_int4(const T* x, int64_t rows, const uint8_t* codes, const uint16_t* scales,
                             const uint8_t* zeros, int64_t group_size, int num_experts, const int32_t* expert_offsets,
                             int64_t N, int64_t n_begin, int64_t n_count, int64_t K, T* out, cudaStream_t stream);
// out [rows, K] of T = (code - zero) * scale of `rows` rows of codes, scales and zeros (prefill, for cuBLAS).
template <typename T>
void launch_dequantize_int4(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t group_size,
                            int64_t rows, int64_t K, T* out, cudaStream_t stream);
// Act order: out [segments, R, K] = x [R, K] in the column order of each row's expert and segment,
// out[s, r, k] = x[r, input_order[e, s, k]] (input_order [E, segments, K]); experts from the offsets.
template <typename T>
void launch_gather_columns(const T* x, int64_t rows, int64_t K, const int32_t* input_order, int segments,
                           const int32_t* expert_offsets, int num_experts, T* out, cudaStream_t stream);
// bytes of random int4 codes: byte b = int4_uniform_byte(seed, b, low, high) (core/int4.h).
void launch_fill_uniform_int4(uint8_t* data, int64_t bytes, uint64_t seed, float low, float high, cudaStream_t stream);

// One token from logits [V] float32 (core/sampling.h; the Backend::sample contract), one block.
void launch_sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed, int32_t* state,
                   int32_t* token, float* logprob, int32_t* top_ids, float* top_logprobs, cudaStream_t stream);

}  // namespace mixtral::cuda
