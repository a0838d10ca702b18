// The CPU backend: reference implementations of every operation of
// core/backend.h. Plain loops, float32 accumulation, OpenMP threads over
// independent rows; inputs and outputs in float32, bfloat16 or float16 (expert
// weights also in float8_e4m3 with row scales, or int4 with group scales and zeros).
// This is the oracle the CUDA backend is tested against.
#pragma once

#include <vector>

#include "core/backend.h"

namespace mixtral {

// Storage types for the dtype dispatch: load() widens to float, store() rounds.
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return fp16_to_float(v); }
  static uint16_t store(float v) { return float_to_fp16(v); }
};

// float8_e4m3 weights (core/fp8.h), read only: their row scales are applied after the dot products.
struct FP8 {
  using storage = uint8_t;
  static float load(uint8_t v) { return fp8_to_float(v); }
};

// Calls fn(F32{}), fn(BF16{}) or fn(F16{}) for a float dtype.
template <typename Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(F32{}); return;
    case DType::kBFloat16: fn(BF16{}); return;
    case DType::kFloat16: fn(F16{}); return;
    default: throw ShapeError(std::string("expected a float dtype, got ") + dtype_name(dtype));
  }
}

// A float32 copy of a float tensor (or the tensor itself when already float32).
class F32Input {
 public:
  explicit F32Input(const Tensor& t);
  const float* data() const { return ptr_; }

 private:
  std::vector<float> owned_;
  const float* ptr_;
};

// A float32 buffer for an output; commit() writes it to the tensor in its dtype, commit_rows() only
// rows [begin, begin + count) of it (when the others are not the op's to write).
class F32Output {
 public:
  explicit F32Output(Tensor& t);
  float* data() { return ptr_; }
  void commit();
  void commit_rows(int64_t begin, int64_t count);

 private:
  Tensor& target_;
  std::vector<float> owned_;
  float* ptr_;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend();
  // ---- the runtime: memory on the host, every copy synchronous; no events or graphs ----
  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }
  void set_threads(int threads) override;  // default: OpenMP's (OMP_NUM_THREADS, else the cores available)

  void* allocate(size_t bytes) override;
  void release(void* ptr) override;
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void synchronize() override {}
  MemoryInfo memory_info() override;  // the host's available and total memory
  void* allocate_host(size_t bytes) override { return allocate(bytes); }
  void release_host(void* ptr) override { release(ptr); }
  void copy_from_host_async(void* dst, const void* host_src, size_t bytes) override {
    copy_from_host(dst, host_src, bytes);
  }
  void copy_to_host_async(void* host_dst, const void* src, size_t bytes) override { copy_to_host(host_dst, src, bytes); }
  void copy_async(void* dst, const void* src, size_t bytes) override { copy_to_host(dst, src, bytes); }

  // ---- the operations; the fusions are Backend's defaults, which run these ----
  void fill_uniform(Tensor& t, uint64_t seed, float low, float high) override;
  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void add_rmsnorm(Tensor& residual, const Tensor* delta, const Tensor& weight, float eps,
                   Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, Tensor& out) override;
  void rope_kv_append(Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                      float rope_theta, const KvLayer& kv, const Tensor& page_table) override;
  void attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                 const KvLayer& kv, const Tensor& page_table, Tensor& out) override;
  void router_topk(const Tensor& logits, Tensor& expert_ids, Tensor& weights) override;
  void moe_permute(const Tensor& expert_ids, Tensor& expert_offsets, Tensor& permuted_to_expanded,
                   Tensor& expanded_to_permuted) override;
  void moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k,
                  Tensor& out) override;
  void expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                     Tensor& out) override;
  void silu_mul(const Tensor& gate_up, Tensor& out) override;
  void moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                     Tensor& out) override;
  void sample(const Tensor& logits, const SamplingParams& params, uint64_t seed, Tensor& state, Tensor& token,
              Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) override;

 private:
  int threads_;
};

}  // namespace mixtral
