// The CUDA backend: every operation of core/backend.h on one GPU. Hand-written
// kernels (cuda/kernels.cuh) for the element-wise, attention, routing and
// permutation steps; cuBLAS for the dense projections (cublasGemmEx, float32
// accumulation) and for the expert GEMMs, by one of three paths:
//   per_expert  one cublasGemmEx per expert with rows (expert offsets read on the host)
//   batched     cublasGemmBatchedEx, one 1-row GEMM per permuted row, with device pointer
//               arrays written by a kernel from the offsets (no host sync, graph-capturable);
//               in moe(), one launch writes both GEMMs' arrays, the routing kernel for decode
//   grouped     cublasGemmGroupedBatchedEx, one group per expert with rows (offsets on the host)
// "auto" picks batched up to kBatchedMaxRows rows (decode) and per_expert above (prefill):
// cuBLAS's fastest paths for those shapes when timed alone on an H200 (docs/speed.md), the
// limits' reasons in cuda/kernels.cuh. FP8 and int4 experts (core/fp8.h, core/int4.h) take none
// of these: a hand-written GEMV up to 16 rows (no host sync), else chunks dequantized for
// cublasGemmEx per expert (one kernel each, then cuBLAS's tensor cores: prefill is compute-bound,
// and a fused int4 GEMM would have to match them). An int4 weight with act order has x gathered
// into its column orders first, once per call (one kernel). An expert-parallel rank's moe() over a
// slice of the experts never takes the batched path (its arrays cover every row): its float experts
// run per expert (or grouped), offsets on the host, so its decode steps cannot be recorded; its FP8
// and int4 experts take the GEMV, which reads the offsets on the device, as with all experts.
// Options: "expert_gemm" = auto|per_expert|batched|grouped; "attention" = auto (prefill in
// bfloat16/float16 on the tensor cores) or simple (the CUDA-core kernel for everything).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/kernels.cuh"
#include "cuda/runtime.cuh"

namespace mixtral::cuda {

enum class ExpertGemmPath { kAuto, kPerExpert, kBatched, kGrouped };

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;

  // ---- the runtime: device memory, pinned host memory, one stream, events, CUDA graphs ----
  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "cuda"; }
  void set_option(const std::string& name, const std::string& value) override;
  void* allocate(size_t bytes) override;
  void release(void* ptr) override;
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void synchronize() override;
  MemoryInfo memory_info() override;
  void* allocate_host(size_t bytes) override;
  void release_host(void* ptr) override;
  void copy_from_host_async(void* dst, const void* host_src, size_t bytes) override;
  void copy_to_host_async(void* host_dst, const void* src, size_t bytes) override;
  void copy_async(void* dst, const void* src, size_t bytes) override;
  bool asynchronous() const override { return true; }
  int create_event() override;
  void record_event(int event) override;
  void wait_event(int event) override;
  void release_event(int event) override;
  bool supports_graphs() const override { return true; }
  void begin_graph() override;
  int end_graph() override;
  void abort_graph() override;
  void run_graph(int graph) override;
  void release_graph(int graph) override;
  // NCCL (cuda/nccl_communicator.cu) on this backend's stream.
  std::string new_communicator_id(const std::string& nccl_library) override;
  std::shared_ptr<Communicator> create_communicator(const std::string& nccl_library, const std::string& id, int rank,
                                                    int world_size) override;

  // ---- the operations ----
  void fill_uniform(Tensor& t, uint64_t seed, float low, float high) override;
  void embedding(const Tensor& table, const Tensor& ids, Tensor& out) override;
  void add_rmsnorm(Tensor& residual, const Tensor* delta, const Tensor& weight, float eps, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, Tensor& out) override;
  void rope_kv_append(Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                      const KvLayer& kv, const Tensor& page_table) override;
  void attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions, const KvLayer& kv,
                 const Tensor& page_table, Tensor& out) override;
  void router_topk(const Tensor& logits, Tensor& expert_ids, Tensor& weights) override;
  void moe_permute(const Tensor& expert_ids, Tensor& expert_offsets, Tensor& permuted_to_expanded,
                   Tensor& expanded_to_permuted) override;
  void moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k, Tensor& out) override;
  void expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets, Tensor& out) override;
  void silu_mul(const Tensor& gate_up, Tensor& out) override;
  void moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                     Tensor& out) override;
  void sample(const Tensor& logits, const SamplingParams& params, uint64_t seed, Tensor& state, Tensor& token,
              Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) override;

  // ---- the fusions (each runs the default where its fused form does not fit) ----
  void rope_attention(Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                      const KvLayer& kv, const Tensor& page_table, Tensor& out) override;
  void route(const Tensor& x, const Tensor& router, Routing& routing) override;
  void moe(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
           ExpertBuffers& experts) override;
  void add_rmsnorm_moe(Tensor& residual, const Tensor& delta, const Tensor& norm_weight, float eps, Tensor& h,
                       const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                       ExpertBuffers& experts) override;
  void moe_unpermute_add_rmsnorm(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                                 Tensor& delta, Tensor& residual, const Tensor& norm_weight, float eps,
                                 Tensor& out) override;

 private:
  // out[M, N] = x[M, K] @ w^T for row-major w with leading dimension K (one cublasGemmEx); out's
  // rows are ld_out elements apart.
  void gemm(const void* x, DType x_dtype, const void* w, DType w_dtype, void* out, DType out_dtype, int64_t m,
            int64_t n, int64_t k, int64_t ld_out);
  // attention(), first doing rope_kv_append's work for its one token when rope_theta > 0.
  void run_attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                     const KvLayer& kv, const Tensor& page_table, Tensor& out);
  ExpertGemmPath expert_path(int64_t rows) const;  // the option, with auto resolved for `rows`
  // The per-expert or grouped path, with the expert offsets read on the host (checked there).
  std::vector<int32_t> offsets_on_host(const Tensor& expert_offsets, int64_t rows);
  void expert_gemm_on_host_offsets(ExpertGemmPath path, const Tensor& x, const Tensor& w,
                                   const std::vector<int32_t>& offsets, Tensor& out);
  void expert_gemm_per_expert(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, Tensor& out);
  void expert_gemm_grouped(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, Tensor& out);
  // The batched path: where its pointer arrays (3 * R pointers from `arrays`) point for
  // out = x @ w[e]^T, and the cuBLAS call that reads them once a kernel has written them.
  ExpertGemmPointers batched_pointers(const Tensor& x, const Tensor& w, Tensor& out, void** arrays) const;
  void expert_gemm_batched(const Tensor& x, const Tensor& w, Tensor& out, const ExpertGemmPointers& pointers);
  bool fused_route_fits(const Tensor& x, const Tensor& router) const;
  // The add_rmsnorm that the fused routing kernel may do first: x = add_rmsnorm(residual, &delta,
  // weight, eps) (the kernel takes it as RouteNormPointers, cuda/kernels.cuh).
  struct RouteNorm {
    Tensor& residual;
    const Tensor& delta;
    const Tensor& weight;
    float eps;
  };
  // The fused routing kernel, also writing the pointer arrays of `jobs`; with `norm`, x is first
  // made by its add_rmsnorm.
  void launch_fused_route(const Tensor& x, const Tensor& router, Routing& routing, const ExpertPointerJobs& jobs,
                          const RouteNorm* norm = nullptr);
  // expert_matmul of float8_e4m3 or int4 weights (x and out of one dtype): the hand-written kernel
  // for at most 16 rows (kExpertGemvFp8MaxRows, kExpertGemvInt4MaxRows; decode; offsets read on the
  // device, no host sync), or per expert with rows, row chunks of w dequantized to x's dtype for
  // cublasGemmEx (prefill, offsets read on the host).
  // ordered_scratch (may be null) is moe()'s ExpertBuffers::ordered_inputs.
  void expert_gemv_quantized(const Tensor& x, const Tensor& w, const Tensor& expert_offsets, Tensor& out,
                             const Tensor* ordered_scratch);
  void expert_gemm_dequantized(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                               const std::vector<int32_t>& offsets, Tensor& out, const Tensor* ordered_scratch);
  // x's rows, for an int4 w with act order, gathered into each row segment's column order ([segments,
  // R, K]: in ordered_scratch when given, a ShapeError when it is too small, else in a device buffer kept
  // between calls); else x itself.
  const void* inputs_in_column_order(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                                     const Tensor* ordered_scratch);
  // moe() of float8_e4m3 or int4 experts: the fused routing kernel (without pointer arrays; with
  // `norm`, if given) when it fits, else the separate routing ops, then the expert ops (offsets read
  // on the host once for both GEMMs when the dequantized path runs).
  void moe_quantized(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                     ExpertBuffers& experts, const RouteNorm* norm);
  // moe() on the batched path: both GEMMs' pointer arrays written by one launch, the fused routing
  // kernel's when it fits (then with `norm`, if given), else a pointer kernel's after the routing.
  void moe_batched(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                   ExpertBuffers& experts, const RouteNorm* norm);
  // Device memory kept between calls and grown rarely (never while a graph is recorded).
  struct GrowingBuffer {
    void* data = nullptr;
    size_t bytes = 0;
  };
  // Gives `buffer` at least `bytes` (no less than minimum_bytes), retiring the outgrown one;
  // true when it allocated.
  bool grow(GrowingBuffer& buffer, size_t bytes, size_t minimum_bytes);
  // Device memory for `count` pointers (the batched and grouped paths).
  void** pointer_arrays(int64_t count);
  // Device scratch of at least `floats` floats (split attention's partial results).
  float* scratch_floats(int64_t floats);
  // Split attention's counters of finished blocks, `count` of them, zero when handed out.
  int32_t* split_counters(int64_t count);
  // Device memory for `bytes` of dequantized expert weights, and for inputs in column order (the
  // expert_matmul op alone; moe() has the engine's scratch).
  void* dequantized(size_t bytes);
  void* ordered_inputs(size_t bytes);
  cudaEvent_t event(int id) const;  // throws for an unknown id
  // Frees a buffer that was outgrown, or keeps it until the backend goes while graphs may use it.
  void retire(void* buffer);

  Runtime runtime_;
  ExpertGemmPath expert_path_ = ExpertGemmPath::kAuto;
  bool tensor_core_attention_ = true;  // option "attention": auto (tensor cores for prefill) or simple
  // Option "dequantize_chunk_bytes": the scratch of FP8 or int4 experts dequantized for cuBLAS at prefill.
  int64_t dequantize_chunk_bytes_ = int64_t(64) << 20;
  GrowingBuffer pointers_, scratch_, split_counters_, dequantized_, ordered_inputs_;
  std::vector<void*> retired_;
  bool capturing_ = false;
  std::map<int, cudaGraphExec_t> graphs_;
  int next_graph_ = 0;
  std::map<int, cudaEvent_t> events_;
  int next_event_ = 0;
};

}  // namespace mixtral::cuda
