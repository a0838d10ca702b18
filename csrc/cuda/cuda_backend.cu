// CudaBackend's methods (cuda/cuda_backend.cuh): all of core/backend.h (runtime, operations, fusions) on the GPU;
// no kernels here. An op runs the argument checks shared with the CPU backend (core/op_checks), dispatches the dtype
// and calls a launch_* of cuda/kernels.cuh or cuBLAS. cuBLAS is column-major: row-major out[M, N] =
// x[M, K] @ w[N, K]^T is column-major out^T[N, M] = w^T[N, K] x^T[K, M], so
//   cublasGemmEx(OP_T, OP_N, m=N, n=M, k=K, A=w, lda=K, B=x, ldb=K, C=out, ldc=N).
#include "cuda/cuda_backend.cuh"

#include <algorithm>
#include <cstdlib>

#include "core/op_checks.h"
#include "cuda/kernels.cuh"
#include "cuda/nccl_communicator.cuh"

namespace mixtral::cuda {

namespace {

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kBFloat16: return CUDA_R_16BF;
    case DType::kFloat16: return CUDA_R_16F;
    default: throw ShapeError(std::string("cuBLAS: unsupported dtype ") + dtype_name(dtype));
  }
}

void check_same_dtype(const char* op, const Tensor& a, const Tensor& b) {
  MX_CHECK(a.dtype == b.dtype, ShapeError,
           op << ": the CUDA backend needs one dtype, got " << dtype_name(a.dtype) << " and " << dtype_name(b.dtype));
}

const float kOne = 1.0f, kZero = 0.0f;

}  // namespace

CudaBackend::CudaBackend(int device) : runtime_(device) {}

CudaBackend::~CudaBackend() {
  for (auto& entry : graphs_) cudaGraphExecDestroy(entry.second);
  for (auto& entry : events_) cudaEventDestroy(entry.second);
  for (const GrowingBuffer* buffer : {&pointers_, &scratch_, &split_counters_, &dequantized_, &ordered_inputs_})
    if (buffer->data) cudaFree(buffer->data);
  for (void* buffer : retired_) cudaFree(buffer);
}

void CudaBackend::set_option(const std::string& name, const std::string& value) {
  if (name == "attention") {
    MX_CHECK(value == "auto" || value == "simple", Error, "attention must be auto or simple, got '" << value << "'");
    tensor_core_attention_ = value == "auto";
    return;
  }
  if (name == "dequantize_chunk_bytes") {
    char* end = nullptr;
    const long long bytes = std::strtoll(value.c_str(), &end, 10);
    MX_CHECK(!value.empty() && *end == '\0' && bytes >= 1024, Error,
             "dequantize_chunk_bytes must be a number of bytes, at least 1024, got '" << value << "'");
    dequantize_chunk_bytes_ = bytes;
    return;
  }
  MX_CHECK(name == "expert_gemm", Error, "cuda backend: unknown option '" << name << "'");
  if (value == "auto") expert_path_ = ExpertGemmPath::kAuto;
  else if (value == "per_expert") expert_path_ = ExpertGemmPath::kPerExpert;
  else if (value == "batched") expert_path_ = ExpertGemmPath::kBatched;
  else if (value == "grouped") expert_path_ = ExpertGemmPath::kGrouped;
  else throw Error("expert_gemm must be auto, per_expert, batched or grouped, got '" + value + "'");
}

// ---- memory --------------------------------------------------------------------------

void* CudaBackend::allocate(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, std::max<size_t>(bytes, 1));
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so the device stays usable
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    std::ostringstream message;
    message << "cuda: out of memory allocating " << bytes << " bytes (" << free_bytes << " of " << total_bytes
            << " free): " << cudaGetErrorString(status);
    throw DeviceOutOfMemoryError(message.str());
  }
  return ptr;
}

void CudaBackend::release(void* ptr) {
  if (ptr) cudaFree(ptr);
}

void CudaBackend::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  runtime_.upload(dst, host_src, bytes);
}

void CudaBackend::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  runtime_.download(host_dst, src, bytes);
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaStreamSynchronize(runtime_.stream())); }

void* CudaBackend::allocate_host(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t status = cudaMallocHost(&ptr, std::max<size_t>(bytes, 1));
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw DeviceOutOfMemoryError("cuda: cannot pin " + std::to_string(bytes) + " bytes of host memory: " +
                                 cudaGetErrorString(status));
  }
  return ptr;
}

void CudaBackend::release_host(void* ptr) {
  if (ptr) cudaFreeHost(ptr);
}

void CudaBackend::copy_from_host_async(void* dst, const void* host_src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, runtime_.stream()));
}

void CudaBackend::copy_to_host_async(void* host_dst, const void* src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, runtime_.stream()));
}

void CudaBackend::copy_async(void* dst, const void* src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, runtime_.stream()));
}

// ---- events -------------------------------------------------------------------------

int CudaBackend::create_event() {
  cudaEvent_t event = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  events_[next_event_] = event;
  return next_event_++;
}

cudaEvent_t CudaBackend::event(int id) const {
  auto found = events_.find(id);
  MX_CHECK(found != events_.end(), Error, "cuda: no event " << id);
  return found->second;
}

void CudaBackend::record_event(int id) { CUDA_CHECK(cudaEventRecord(event(id), runtime_.stream())); }

void CudaBackend::wait_event(int id) { CUDA_CHECK(cudaEventSynchronize(event(id))); }

void CudaBackend::release_event(int id) {
  auto found = events_.find(id);
  if (found == events_.end()) return;
  cudaEventDestroy(found->second);
  events_.erase(found);
}

// ---- graphs -------------------------------------------------------------------------

void CudaBackend::begin_graph() {
  MX_CHECK(!capturing_, Error, "cuda: a graph is already being recorded");
  // Relaxed: the few host-side calls made while recording (kernel attributes, error checks) stay legal.
  CUDA_CHECK(cudaStreamBeginCapture(runtime_.stream(), cudaStreamCaptureModeRelaxed));
  capturing_ = true;
}

int CudaBackend::end_graph() {
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(runtime_.stream(), &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_CHECK(status);
  graphs_[next_graph_] = exec;
  return next_graph_++;
}

void CudaBackend::abort_graph() {
  if (!capturing_) return;
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  if (cudaStreamEndCapture(runtime_.stream(), &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
  cudaGetLastError();  // the failed capture's error is reported by whoever threw
}

void CudaBackend::run_graph(int graph) {
  auto found = graphs_.find(graph);
  MX_CHECK(found != graphs_.end(), Error, "cuda: no graph " << graph);
  CUDA_CHECK(cudaGraphLaunch(found->second, runtime_.stream()));
}

void CudaBackend::release_graph(int graph) {
  auto found = graphs_.find(graph);
  if (found == graphs_.end()) return;
  cudaGraphExecDestroy(found->second);
  graphs_.erase(found);
}

std::string CudaBackend::new_communicator_id(const std::string& nccl_library) { return nccl_unique_id(nccl_library); }

std::shared_ptr<Communicator> CudaBackend::create_communicator(const std::string& nccl_library, const std::string& id,
                                                               int rank, int world_size) {
  CUDA_CHECK(cudaSetDevice(runtime_.device()));  // NCCL binds its communicator to the current device
  return make_nccl_communicator(nccl_library, id, rank, world_size, runtime_.stream());
}

MemoryInfo CudaBackend::memory_info() {
  MemoryInfo info{0, 0};
  CUDA_CHECK(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

void CudaBackend::fill_uniform(Tensor& t, uint64_t seed, float low, float high) {
  check_fill_uniform(t);
  if (t.dtype == DType::kInt4)
    return launch_fill_uniform_int4(t.ptr<uint8_t>(), t.numel() / 2, seed, low, high, runtime_.stream());
  if (t.dtype == DType::kFloat8E4M3)
    return launch_fill_uniform(t.ptr<uint8_t>(), t.numel(), seed, low, high, runtime_.stream());
  dispatch_device_float(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_fill_uniform(t.ptr<T>(), t.numel(), seed, low, high, runtime_.stream());
  });
}

// ---- dense --------------------------------------------------------------------------------

void CudaBackend::embedding(const Tensor& table, const Tensor& ids, Tensor& out) {
  check_embedding(table, ids, out);
  check_same_dtype("embedding", table, out);
  dispatch_device_float(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_embedding(table.ptr<const T>(), ids.ptr<const int32_t>(), out.ptr<T>(), ids.shape[0], table.shape[1],
                     runtime_.stream());
  });
}

void CudaBackend::add_rmsnorm(Tensor& residual, const Tensor* delta, const Tensor& weight, float eps, Tensor& out) {
  check_add_rmsnorm(residual, delta, weight, out);
  check_same_dtype("add_rmsnorm", residual, out);
  check_same_dtype("add_rmsnorm", residual, weight);
  if (delta) check_same_dtype("add_rmsnorm", residual, *delta);
  dispatch_device_float(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_add_rmsnorm(residual.ptr<T>(), delta ? delta->ptr<const T>() : nullptr, weight.ptr<const T>(), eps,
                       out.ptr<T>(), residual.shape[0], residual.shape[1], runtime_.stream());
  });
}

void CudaBackend::gemm(const void* x, DType x_dtype, const void* w, DType w_dtype, void* out, DType out_dtype,
                       int64_t m, int64_t n, int64_t k, int64_t ld_out) {
  if (m == 0 || n == 0) return;
  MX_CHECK(x_dtype == w_dtype, ShapeError,
           "matmul: cuBLAS needs x and w of one dtype, got " << dtype_name(x_dtype) << " and " << dtype_name(w_dtype));
  CUBLAS_CHECK(cublasGemmEx(runtime_.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                            static_cast<int>(k), &kOne, w, cuda_type(w_dtype), static_cast<int>(k), x,
                            cuda_type(x_dtype), static_cast<int>(k), &kZero, out, cuda_type(out_dtype),
                            static_cast<int>(ld_out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::matmul(const Tensor& x, const Tensor& w, Tensor& out) {
  check_matmul(x, w, out);
  gemm(x.data, x.dtype, w.data, w.dtype, out.data, out.dtype, x.shape[0], w.shape[0], x.shape[1], w.shape[0]);
}

// ---- attention ------------------------------------------------------------------------------

void CudaBackend::rope_kv_append(Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                                 const KvLayer& kv, const Tensor& page_table) {
  check_attention(qkv, shape, positions, kv, page_table, nullptr);
  MX_CHECK(qkv.dtype == kv.dtype, ShapeError, "rope_kv_append: the CUDA backend needs qkv and cache of one dtype");
  dispatch_device_float(qkv.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rope_kv_append(qkv.ptr<T>(), qkv.shape[0], qkv.shape[1], shape, positions.ptr<const int32_t>(), rope_theta,
                          static_cast<T*>(kv.k), static_cast<T*>(kv.v), page_table.ptr<const int32_t>(),
                          kv.page_size, runtime_.stream());
  });
}

void CudaBackend::attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions, const KvLayer& kv,
                            const Tensor& page_table, Tensor& out) {
  run_attention(qkv, shape, positions, 0.0f, kv, page_table, out);
}

void CudaBackend::rope_attention(Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                                 const KvLayer& kv, const Tensor& page_table, Tensor& out) {
  if (qkv.ndim != 2 || qkv.shape[0] != 1)
    return Backend::rope_attention(qkv, shape, positions, rope_theta, kv, page_table, out);
  MX_CHECK(rope_theta > 0.0f, ShapeError, "rope_attention: rope_theta must be positive, got " << rope_theta);
  run_attention(qkv, shape, positions, rope_theta, kv, page_table, out);
}

void CudaBackend::run_attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                                float rope_theta, const KvLayer& kv, const Tensor& page_table, Tensor& out) {
  check_attention(qkv, shape, positions, kv, page_table, &out);
  MX_CHECK(qkv.dtype == kv.dtype && qkv.dtype == out.dtype, ShapeError,
           "attention: the CUDA backend needs qkv, cache and out of one dtype");
  const int64_t tokens = qkv.shape[0];
  const int64_t splits = attention_splits(tokens, page_table.shape[0] * kv.page_size);
  AttentionScratch scratch{nullptr, 0, nullptr, 0};
  if (splits > 1) {  // sized for the most tokens that split, so one buffer serves every such call
    scratch.floats = kSplitMaxTokens * shape.num_heads * splits * (shape.head_dim + 1);
    scratch.data = scratch_floats(scratch.floats);
    scratch.counters = kSplitMaxTokens * shape.num_kv_heads;
    scratch.split_counters = split_counters(scratch.counters);
  }
  dispatch_device_float(qkv.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_attention(qkv.ptr<const T>(), tokens, qkv.shape[1], shape, positions.ptr<const int32_t>(), rope_theta,
                     static_cast<T*>(kv.k), static_cast<T*>(kv.v), page_table.ptr<const int32_t>(),
                     page_table.shape[0], kv.page_size, out.ptr<T>(), scratch, tensor_core_attention_,
                     runtime_.stream());
  });
}

// ---- mixture of experts ---------------------------------------------------------------------

void CudaBackend::router_topk(const Tensor& logits, Tensor& expert_ids, Tensor& weights) {
  check_router_topk(logits, expert_ids, weights);
  launch_router_topk(logits.ptr<const float>(), logits.shape[0], static_cast<int>(logits.shape[1]),
                     static_cast<int>(expert_ids.shape[1]), expert_ids.ptr<int32_t>(), weights.ptr<float>(),
                     runtime_.stream());
}

bool CudaBackend::fused_route_fits(const Tensor& x, const Tensor& router) const {
  return x.ndim == 2 && x.shape[0] >= 1 && x.shape[0] <= kFusedRouteMaxTokens && router.ndim == 2 &&
         router.shape[0] <= kFusedRouteMaxExperts && x.dtype == router.dtype;
}

void CudaBackend::launch_fused_route(const Tensor& x, const Tensor& router, Routing& routing,
                                     const ExpertPointerJobs& jobs, const RouteNorm* norm) {
  if (norm) {
    check_add_rmsnorm(norm->residual, &norm->delta, norm->weight, x);
    check_same_dtype("add_rmsnorm_moe", norm->residual, x);
    check_same_dtype("add_rmsnorm_moe", norm->delta, x);
    check_same_dtype("add_rmsnorm_moe", norm->weight, x);
  }
  check_matmul(x, router, routing.logits);
  check_router_topk(routing.logits, routing.expert_ids, routing.weights);
  check_moe_permute(routing.expert_ids, routing.expert_offsets, routing.permuted_to_expanded,
                    routing.expanded_to_permuted);
  check_moe_gather(x, routing.permuted_to_expanded, static_cast<int>(routing.expert_ids.shape[1]), routing.gathered);
  check_same_dtype("route", x, routing.gathered);
  dispatch_device_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const RouteNormPointers<T> route_norm =
        norm ? RouteNormPointers<T>{norm->residual.ptr<T>(), norm->delta.ptr<const T>(), norm->weight.ptr<const T>(),
                            norm->eps, static_cast<T*>(x.data)}
             : RouteNormPointers<T>{nullptr, nullptr, nullptr, 0.0f, nullptr};
    launch_route(x.ptr<const T>(), router.ptr<const T>(), x.shape[0], x.shape[1], static_cast<int>(router.shape[0]),
                 static_cast<int>(routing.expert_ids.shape[1]), routing.logits.ptr<float>(),
                 routing.expert_ids.ptr<int32_t>(), routing.weights.ptr<float>(), routing.expert_offsets.ptr<int32_t>(),
                 routing.permuted_to_expanded.ptr<int32_t>(), routing.expanded_to_permuted.ptr<int32_t>(),
                 routing.gathered.ptr<T>(), jobs, route_norm, runtime_.stream());
  });
}

void CudaBackend::route(const Tensor& x, const Tensor& router, Routing& routing) {
  if (fused_route_fits(x, router)) launch_fused_route(x, router, routing, ExpertPointerJobs{{}, 0});
  else Backend::route(x, router, routing);
}

void CudaBackend::moe_permute(const Tensor& expert_ids, Tensor& expert_offsets, Tensor& permuted_to_expanded,
                              Tensor& expanded_to_permuted) {
  check_moe_permute(expert_ids, expert_offsets, permuted_to_expanded, expanded_to_permuted);
  launch_moe_permute(expert_ids.ptr<const int32_t>(), expert_ids.numel(), static_cast<int>(expert_offsets.shape[0] - 1),
                     expert_offsets.ptr<int32_t>(), permuted_to_expanded.ptr<int32_t>(),
                     expanded_to_permuted.ptr<int32_t>(), runtime_.stream());
}

void CudaBackend::moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k, Tensor& out) {
  check_moe_gather(x, permuted_to_expanded, k, out);
  check_same_dtype("moe_gather", x, out);
  dispatch_device_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_moe_gather(x.ptr<const T>(), permuted_to_expanded.ptr<const int32_t>(), k, out.ptr<T>(), out.shape[0],
                      x.shape[1], runtime_.stream());
  });
}

ExpertGemmPath CudaBackend::expert_path(int64_t rows) const {
  if (expert_path_ != ExpertGemmPath::kAuto) return expert_path_;
  return rows <= kBatchedMaxRows ? ExpertGemmPath::kBatched : ExpertGemmPath::kPerExpert;
}

std::vector<int32_t> CudaBackend::offsets_on_host(const Tensor& expert_offsets, int64_t rows) {
  MX_CHECK(!capturing_, Error,
           "cuda: a recorded decode step cannot read the expert offsets on the host (the per-expert and grouped "
           "paths do, and FP8 or int4 experts past " << kExpertGemvFp8MaxRows << " rows)");
  std::vector<int32_t> offsets(expert_offsets.shape[0]);
  runtime_.download(offsets.data(), expert_offsets.data, offsets.size() * sizeof(int32_t));
  MX_CHECK(offsets.front() >= 0 && offsets.back() <= rows, ShapeError,
           "expert_matmul: offsets must lie within [0, " << rows << "], got [" << offsets.front() << ", "
                                                        << offsets.back() << "]");
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    MX_CHECK(offsets[e] <= offsets[e + 1], ShapeError, "expert_matmul: offsets must not decrease");
  return offsets;
}

bool CudaBackend::grow(GrowingBuffer& buffer, size_t bytes, size_t minimum_bytes) {
  if (bytes <= buffer.bytes) return false;
  MX_CHECK(!capturing_, Error, "cuda: a device buffer grows in a step run before any recording, not during one");
  retire(buffer.data);
  buffer = GrowingBuffer{};
  const size_t size = std::max(bytes, minimum_bytes);
  buffer.data = allocate(size);
  buffer.bytes = size;
  return true;
}

void** CudaBackend::pointer_arrays(int64_t count) {
  grow(pointers_, count * sizeof(void*), 4096 * sizeof(void*));
  return static_cast<void**>(pointers_.data);
}

void CudaBackend::retire(void* buffer) {
  if (!buffer) return;
  if (!graphs_.empty()) {  // a recorded graph may still use it: free it with the backend
    retired_.push_back(buffer);
    return;
  }
  CUDA_CHECK(cudaStreamSynchronize(runtime_.stream()));  // no queued work still reads it
  CUDA_CHECK(cudaFree(buffer));
}

float* CudaBackend::scratch_floats(int64_t floats) {
  grow(scratch_, floats * sizeof(float), (1 << 20) * sizeof(float));
  return static_cast<float*>(scratch_.data);
}

int32_t* CudaBackend::split_counters(int64_t count) {
  if (grow(split_counters_, count * sizeof(int32_t), 1024 * sizeof(int32_t))) {
    const std::vector<int32_t> zeros(split_counters_.bytes / sizeof(int32_t), 0);
    runtime_.upload(split_counters_.data, zeros.data(), split_counters_.bytes);
  }
  return static_cast<int32_t*>(split_counters_.data);
}

void* CudaBackend::dequantized(size_t bytes) {
  grow(dequantized_, bytes, 0);
  return dequantized_.data;
}

void* CudaBackend::ordered_inputs(size_t bytes) {
  grow(ordered_inputs_, bytes, 0);
  return ordered_inputs_.data;
}

void CudaBackend::expert_gemm_per_expert(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets,
                                         Tensor& out) {
  const int64_t N = w.shape[1], K = w.shape[2];
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
    if (count == 0) continue;
    gemm(x.rows(begin, count).data, x.dtype, static_cast<const char*>(w.data) + e * N * K * dtype_size(w.dtype),
         w.dtype, out.rows(begin, count).data, out.dtype, count, N, K, N);
  }
}

ExpertGemmPointers CudaBackend::batched_pointers(const Tensor& x, const Tensor& w, Tensor& out, void** arrays) const {
  MX_CHECK(x.dtype == w.dtype, ShapeError, "expert_matmul: cuBLAS needs x and w of one dtype");
  const int64_t R = x.shape[0];
  return ExpertGemmPointers{static_cast<const char*>(w.data), static_cast<const char*>(x.data),
                            static_cast<char*>(out.data), w.shape[1], w.shape[2], dtype_size(x.dtype),
                            dtype_size(out.dtype), const_cast<const void**>(arrays),
                            const_cast<const void**>(arrays + R), arrays + 2 * R};
}

void CudaBackend::expert_gemm_batched(const Tensor& x, const Tensor& w, Tensor& out, const ExpertGemmPointers& p) {
  const int64_t R = x.shape[0], N = w.shape[1], K = w.shape[2];
  if (R == 0) return;
  CUBLAS_CHECK(cublasGemmBatchedEx(runtime_.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), 1,
                                   static_cast<int>(K), &kOne, p.a, cuda_type(w.dtype), static_cast<int>(K), p.b,
                                   cuda_type(x.dtype), static_cast<int>(K), &kZero, p.c, cuda_type(out.dtype),
                                   static_cast<int>(N), static_cast<int>(R), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::expert_gemm_grouped(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets,
                                      Tensor& out) {
  const int64_t N = w.shape[1], K = w.shape[2];
  MX_CHECK(x.dtype == w.dtype && x.dtype == out.dtype, ShapeError,
           "expert_matmul: the grouped cuBLAS path needs x, w and out of one dtype");
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<float> alpha, beta;
  std::vector<const void*> a_host, b_host, c_host;  // uploaded one after another: a, then b, then c
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
    if (count == 0) continue;
    trans_a.push_back(CUBLAS_OP_T), trans_b.push_back(CUBLAS_OP_N);
    m.push_back(static_cast<int>(N)), n.push_back(static_cast<int>(count)), k.push_back(static_cast<int>(K));
    lda.push_back(static_cast<int>(K)), ldb.push_back(static_cast<int>(K)), ldc.push_back(static_cast<int>(N));
    group_size.push_back(1), alpha.push_back(1.0f), beta.push_back(0.0f);
    a_host.push_back(static_cast<const char*>(w.data) + e * N * K * dtype_size(w.dtype));
    b_host.push_back(x.rows(begin, count).data);
    c_host.push_back(out.rows(begin, count).data);
  }
  const int groups = static_cast<int>(m.size());
  if (groups == 0) return;
  void** arrays = pointer_arrays(3 * groups);
  const void** a = const_cast<const void**>(arrays);
  const void** b = a + groups;
  void** c = arrays + 2 * groups;
  a_host.insert(a_host.end(), b_host.begin(), b_host.end());
  a_host.insert(a_host.end(), c_host.begin(), c_host.end());
  runtime_.upload(arrays, a_host.data(), a_host.size() * sizeof(void*));
  CUBLAS_CHECK(cublasGemmGroupedBatchedEx(runtime_.cublas(), trans_a.data(), trans_b.data(), m.data(), n.data(),
                                          k.data(), alpha.data(), a, cuda_type(w.dtype), lda.data(), b,
                                          cuda_type(x.dtype), ldb.data(), beta.data(), c, cuda_type(out.dtype),
                                          ldc.data(), groups, group_size.data(), CUBLAS_COMPUTE_32F));
}

void CudaBackend::expert_gemm_on_host_offsets(ExpertGemmPath path, const Tensor& x, const Tensor& w,
                                              const std::vector<int32_t>& offsets, Tensor& out) {
  if (path == ExpertGemmPath::kGrouped) expert_gemm_grouped(x, w, offsets, out);
  else expert_gemm_per_expert(x, w, offsets, out);
}

namespace {

bool is_quantized(DType dtype) { return dtype == DType::kFloat8E4M3 || dtype == DType::kInt4; }

int64_t gemv_max_rows(DType dtype) {
  return dtype == DType::kInt4 ? kExpertGemvInt4MaxRows : kExpertGemvFp8MaxRows;
}

}  // namespace

void CudaBackend::expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets, Tensor& out) {
  check_expert_matmul(x, w, expert_offsets, out);
  const int64_t R = x.shape[0];
  if (is_quantized(w.dtype)) {
    check_same_dtype("expert_matmul", x, out);
    if (R <= gemv_max_rows(w.dtype)) expert_gemv_quantized(x, w, expert_offsets, out, nullptr);
    else expert_gemm_dequantized(x, w, expert_offsets, offsets_on_host(expert_offsets, R), out, nullptr);
    return;
  }
  const ExpertGemmPath path = expert_path(R);
  if (path != ExpertGemmPath::kBatched)
    return expert_gemm_on_host_offsets(path, x, w, offsets_on_host(expert_offsets, R), out);
  if (R == 0) return;
  const ExpertPointerJobs jobs{{batched_pointers(x, w, out, pointer_arrays(3 * R))}, 1};
  launch_expert_pointers(expert_offsets.ptr<const int32_t>(), static_cast<int>(w.shape[0]), R, jobs,
                         runtime_.stream());
  expert_gemm_batched(x, w, out, jobs.gemm[0]);
}

const void* CudaBackend::inputs_in_column_order(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                                                const Tensor* ordered_scratch) {
  const int64_t R = x.shape[0], K = x.shape[1];
  if (w.dtype != DType::kInt4 || !w.int4.input_order) return x.data;
  const size_t bytes = size_t(w.int4.segments) * R * K * dtype_size(x.dtype);
  // The engine's workspace plans the scratch (a buffer grown here would sit outside its memory plan);
  // without one (single ops) the backend keeps its own.
  const bool given = ordered_scratch && ordered_scratch->ndim > 0;
  MX_CHECK(!given || (ordered_scratch->dtype == x.dtype && ordered_scratch->nbytes() >= bytes), ShapeError,
           "moe: ordered_inputs " << ordered_scratch->describe() << " cannot hold the " << bytes << " bytes of "
                                  << x.describe() << " in " << w.int4.segments << " column orders");
  void* ordered = given ? ordered_scratch->data : ordered_inputs(bytes);
  dispatch_device_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_gather_columns(x.ptr<const T>(), R, K, w.int4.input_order, w.int4.segments,
                          expert_offsets.ptr<const int32_t>(), static_cast<int>(w.shape[0]), static_cast<T*>(ordered),
                          runtime_.stream());
  });
  return ordered;
}

void CudaBackend::expert_gemv_quantized(const Tensor& x, const Tensor& w, const Tensor& expert_offsets, Tensor& out,
                                        const Tensor* ordered_scratch) {
  const int64_t R = x.shape[0], E = w.shape[0], N = w.shape[1], K = w.shape[2];
  const void* inputs = inputs_in_column_order(x, w, expert_offsets, ordered_scratch);
  dispatch_device_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (w.dtype == DType::kFloat8E4M3) {
      launch_expert_gemv_fp8(x.ptr<const T>(), R, w.ptr<const uint8_t>(), w.row_scales, static_cast<int>(E),
                             expert_offsets.ptr<const int32_t>(), N, K, out.ptr<T>(), runtime_.stream());
      return;
    }
    const Int4Groups& q = w.int4;
    const int segments = q.input_order ? q.segments : 1;  // without column orders, all rows at once
    for (int s = 0; s < segments; ++s)
      launch_expert_gemv_int4(static_cast<const T*>(inputs) + s * R * K, R, w.ptr<const uint8_t>(), q.scales, q.zeros,
                              q.group_size, static_cast<int>(E), expert_offsets.ptr<const int32_t>(), N,
                              s * N / segments, N / segments, K, out.ptr<T>(), runtime_.stream());
  });
}

void CudaBackend::expert_gemm_dequantized(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                                          const std::vector<int32_t>& offsets, Tensor& out, const Tensor* ordered_scratch) {
  const int64_t R = x.shape[0], E = w.shape[0], N = w.shape[1], K = w.shape[2];
  const size_t element = dtype_size(x.dtype);
  const int segments = w.dtype == DType::kInt4 && w.int4.input_order ? w.int4.segments : 1;
  const int64_t segment_rows = N / segments;
  const char* inputs = static_cast<const char*>(inputs_in_column_order(x, w, expert_offsets, ordered_scratch));
  // Rows of w dequantized at a time (about dequantize_chunk_bytes_ of scratch, at least 16 bytes of
  // columns), each chunk one GEMM into its output columns: a multiple of 16 bytes of columns, so every
  // chunk's output stays as aligned as the first (cuBLAS picks its kernels by alignment) when the row
  // segments of act order are too (their N / segments rows a multiple of 16 bytes: Mixtral's are).
  const int64_t aligned_rows = 16 / int64_t(element);
  const int64_t chunk = std::min(
      segment_rows, std::max(aligned_rows, dequantize_chunk_bytes_ / (K * int64_t(element)) / aligned_rows * aligned_rows));
  void* scratch = dequantized(size_t(chunk) * K * element);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
    if (count == 0) continue;
    for (int s = 0; s < segments; ++s) {
      const char* x_rows = inputs + (s * R + begin) * K * element;  // rows begin.., in segment s's column order
      for (int64_t n0 = s * segment_rows; n0 < (s + 1) * segment_rows; n0 += chunk) {
        const int64_t rows = std::min(chunk, (s + 1) * segment_rows - n0), w_row = e * N + n0;
        dispatch_device_float(x.dtype, [&](auto tag) {
          using T = decltype(tag);
          if (w.dtype == DType::kFloat8E4M3) {
            launch_dequantize_fp8(w.ptr<const uint8_t>() + w_row * K, w.row_scales + w_row, rows, K,
                                  static_cast<T*>(scratch), runtime_.stream());
          } else {
            const int64_t groups = int4_groups(K, w.int4.group_size);
            launch_dequantize_int4(w.ptr<const uint8_t>() + w_row * (K / 2), w.int4.scales + w_row * groups,
                                   w.int4.zeros + w_row * groups, w.int4.group_size, rows, K, static_cast<T*>(scratch),
                                   runtime_.stream());
          }
        });
        char* out_columns = static_cast<char*>(out.data) + (begin * N + n0) * element;  // rows begin.., columns n0..
        gemm(x_rows, x.dtype, scratch, x.dtype, out_columns, out.dtype, count, rows, K, N);
      }
    }
  }
}

namespace {

// The checks of moe()'s expert half: both expert GEMMs (on the held experts' offsets) and the
// silu-mul between them.
void check_experts(const Routing& routing, const Tensor& held_offsets, const Tensor& w13, const Tensor& w2,
                   const ExpertBuffers& experts) {
  check_expert_matmul(routing.gathered, w13, held_offsets, experts.gate_up);
  check_silu_mul(experts.gate_up, experts.act);
  check_expert_matmul(experts.act, w2, held_offsets, experts.out);
}

}  // namespace

void CudaBackend::moe(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                      ExpertBuffers& experts) {
  const Tensor held_offsets = held_expert_offsets(routing, router, w13, experts);
  check_experts(routing, held_offsets, w13, w2, experts);
  if (is_quantized(w13.dtype)) return moe_quantized(x, router, w13, w2, routing, experts, nullptr);
  const int64_t R = routing.gathered.shape[0];
  const bool all_experts = w13.shape[0] == router.shape[0];
  // The batched path's pointer arrays cover every row: a slice of the experts takes the per-expert
  // path instead (or the grouped one when set), which skips the other experts' rows.
  const ExpertGemmPath path = expert_path(R);
  if (path == ExpertGemmPath::kBatched && all_experts) return moe_batched(x, router, w13, w2, routing, experts, nullptr);
  route(x, router, routing);
  if (!all_experts) fill_uniform(experts.out, 0, 0.0f, 0.0f);  // zeros, under the held experts' rows too
  const std::vector<int32_t> offsets = offsets_on_host(held_offsets, R);  // once for both GEMMs
  expert_gemm_on_host_offsets(path, routing.gathered, w13, offsets, experts.gate_up);
  silu_mul(experts.gate_up, experts.act);
  expert_gemm_on_host_offsets(path, experts.act, w2, offsets, experts.out);
}

void CudaBackend::moe_quantized(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2,
                                Routing& routing, ExpertBuffers& experts, const RouteNorm* norm) {
  if (fused_route_fits(x, router)) launch_fused_route(x, router, routing, ExpertPointerJobs{{}, 0}, norm);
  else Backend::route(x, router, routing);  // norm is only given when the fused kernel fits
  check_same_dtype("moe", routing.gathered, experts.gate_up);
  check_same_dtype("moe", experts.act, experts.out);
  if (w13.shape[0] < router.shape[0]) fill_uniform(experts.out, 0, 0.0f, 0.0f);  // zeros (every draw in [0, 0])
  // The GEMVs and the dequantizing GEMMs both skip the rows of experts the weights do not hold.
  const Tensor held_offsets = held_expert_offsets(routing, router, w13, experts);
  const int64_t R = routing.gathered.shape[0];
  if (R <= std::min(gemv_max_rows(w13.dtype), gemv_max_rows(w2.dtype))) {
    expert_gemv_quantized(routing.gathered, w13, held_offsets, experts.gate_up, &experts.ordered_inputs);
    silu_mul(experts.gate_up, experts.act);
    expert_gemv_quantized(experts.act, w2, held_offsets, experts.out, &experts.ordered_inputs);
    return;
  }
  const std::vector<int32_t> offsets = offsets_on_host(held_offsets, R);  // once for both GEMMs
  expert_gemm_dequantized(routing.gathered, w13, held_offsets, offsets, experts.gate_up, &experts.ordered_inputs);
  silu_mul(experts.gate_up, experts.act);
  expert_gemm_dequantized(experts.act, w2, held_offsets, offsets, experts.out, &experts.ordered_inputs);
}

void CudaBackend::moe_batched(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2,
                              Routing& routing, ExpertBuffers& experts, const RouteNorm* norm) {
  const int64_t R = routing.gathered.shape[0];
  void** arrays = pointer_arrays(6 * R);
  const ExpertPointerJobs jobs{{batched_pointers(routing.gathered, w13, experts.gate_up, arrays),
                                batched_pointers(experts.act, w2, experts.out, arrays + 3 * R)},
                               2};
  if (fused_route_fits(x, router)) {
    launch_fused_route(x, router, routing, jobs, norm);
  } else {
    Backend::route(x, router, routing);
    if (R > 0)
      launch_expert_pointers(routing.expert_offsets.ptr<const int32_t>(), static_cast<int>(w13.shape[0]), R, jobs,
                             runtime_.stream());
  }
  expert_gemm_batched(routing.gathered, w13, experts.gate_up, jobs.gemm[0]);
  silu_mul(experts.gate_up, experts.act);
  expert_gemm_batched(experts.act, w2, experts.out, jobs.gemm[1]);
}

void CudaBackend::add_rmsnorm_moe(Tensor& residual, const Tensor& delta, const Tensor& norm_weight, float eps,
                                  Tensor& h, const Tensor& router, const Tensor& w13, const Tensor& w2,
                                  Routing& routing, ExpertBuffers& experts) {
  const int64_t R = routing.gathered.shape[0];
  const bool quantized = is_quantized(w13.dtype), all_experts = w13.shape[0] == router.shape[0];
  if ((!quantized && (expert_path(R) != ExpertGemmPath::kBatched || !all_experts)) || !fused_route_fits(h, router))
    return Backend::add_rmsnorm_moe(residual, delta, norm_weight, eps, h, router, w13, w2, routing, experts);
  check_experts(routing, held_expert_offsets(routing, router, w13, experts), w13, w2, experts);
  const RouteNorm norm{residual, delta, norm_weight, eps};
  if (quantized) moe_quantized(h, router, w13, w2, routing, experts, &norm);
  else moe_batched(h, router, w13, w2, routing, experts, &norm);
}

void CudaBackend::silu_mul(const Tensor& gate_up, Tensor& out) {
  check_silu_mul(gate_up, out);
  check_same_dtype("silu_mul", gate_up, out);
  dispatch_device_float(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_silu_mul(gate_up.ptr<const T>(), out.ptr<T>(), out.shape[0], out.shape[1], runtime_.stream());
  });
}

void CudaBackend::moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                                Tensor& out) {
  check_moe_unpermute(y, expanded_to_permuted, weights, out);
  check_same_dtype("moe_unpermute", y, out);
  dispatch_device_float(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_moe_unpermute(y.ptr<const T>(), expanded_to_permuted.ptr<const int32_t>(), weights.ptr<const float>(),
                         out.ptr<T>(), weights.shape[0], static_cast<int>(weights.shape[1]), y.shape[1],
                         runtime_.stream());
  });
}

void CudaBackend::moe_unpermute_add_rmsnorm(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                                            Tensor& delta, Tensor& residual, const Tensor& norm_weight, float eps,
                                            Tensor& out) {
  check_moe_unpermute(y, expanded_to_permuted, weights, delta);
  check_add_rmsnorm(residual, &delta, norm_weight, out);
  check_same_dtype("moe_unpermute_add_rmsnorm", y, residual);
  check_same_dtype("moe_unpermute_add_rmsnorm", y, norm_weight);
  check_same_dtype("moe_unpermute_add_rmsnorm", y, out);
  dispatch_device_float(y.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_moe_unpermute_add_rmsnorm(y.ptr<const T>(), expanded_to_permuted.ptr<const int32_t>(),
                                     weights.ptr<const float>(), static_cast<int>(weights.shape[1]), residual.ptr<T>(),
                                     norm_weight.ptr<const T>(), eps, out.ptr<T>(), residual.shape[0],
                                     residual.shape[1], runtime_.stream());
  });
}

void CudaBackend::sample(const Tensor& logits, const SamplingParams& params, uint64_t seed, Tensor& state,
                         Tensor& token, Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) {
  check_sample(logits, params, state, token, logprob, top_ids, top_logprobs);
  launch_sample(logits.ptr<const float>(), logits.shape[0], params, seed, state.ptr<int32_t>(), token.ptr<int32_t>(),
                logprob.ptr<float>(), top_ids.ptr<int32_t>(), top_logprobs.ptr<float>(), runtime_.stream());
}

}  // namespace mixtral::cuda
