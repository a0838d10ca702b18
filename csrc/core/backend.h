// The operation interface: one virtual method per operation of the model.
// The engine calls only these; csrc/cpu/ implements them with plain loops and
// float32 accumulation (the reference), csrc/cuda/ with kernels and cuBLAS.
// Every tensor passed to a backend lives on that backend's device.
//
// Layouts (T tokens in the pass, H hidden, Hq/Hkv query/KV heads, D head_dim,
// E experts, k experts per token, R = T*k expanded rows, F expert FFN width):
//   activations  [T, H] row-major; qkv [T, (Hq + 2*Hkv) * D] with q, k, v side by side
//   linear weights [N, K] row-major (out x in, as nn.Linear): y = x @ w^T
//   expert weights [E, N, K]: w13 [E, 2F, H] (w1 rows then w3 rows), w2 [E, H, F]; in a
//     float dtype, float8_e4m3 with row_scales [E * N] float32 (core/fp8.h), or int4 codes
//     [E, N, K / 2] bytes with w.int4's group scales and zeros [E * N, groups] (core/int4.h)
//   KV cache of a layer: k and v pools each [num_pages, Hkv, page_size, D]
//   page_table [pages of the sequence] int32; positions [T] int32
// Adding an operation touches, in this order:
//   1. here: its contract (layouts, rounding) in the group it belongs to; a fusion gets a default
//      body that runs the primitive operations it fuses (the reference);
//   2. core/op_checks.{h,cpp}: check_<op>, the argument checks both backends call first;
//   3. cpu/cpu_backend.{h,cpp}: CpuBackend::<op>, plain loops with float32 accumulation;
//   4. cuda/kernels.cuh: launch_<op>; cuda/<family>.cu: <op>_kernel and launch_<op>, with the
//      file's header kept true (grid, block, shared memory, phases);
//   5. cuda/cuda_backend.{cuh,cu}: CudaBackend::<op> (checks, dtype dispatch, launch);
//   6. bindings/ops_binding.cpp: Ops.<op> for the tests, and python/mixtral_ext/_C.pyi regenerated
//      (python -m pybind11_stubgen mixtral_ext._C -o python);
//   7. tests/test_ops.py: a test in this header's order, the CPU against numpy or transformers and
//      CUDA against the CPU, on random inputs of odd sizes;
//   8. benchmarks/bench_ops.py: a row, when the op is on the decode path;
//   9. engine/forward.cpp: the call;
//  10. kBackendAbi below, one up: the CUDA library is built apart from the core and opened at run time.
// The CUDA sources are globbed (cmake/cuda_sources.cmake): a new .cu file needs no list.
#pragma once

#include <memory>

#include "core/communicator.h"
#include "core/sampling.h"
#include "core/tensor.h"

namespace mixtral {

// The version of this header's classes as the CUDA library (opened at run time, core/cuda_library.h)
// and the core see them: one up with any change to Backend's methods or the structs they take,
// so that a library built from another version is refused instead of calling the wrong methods.
constexpr int kBackendAbi = 5;

struct AttentionShape {
  int num_heads;     // Hq
  int num_kv_heads;  // Hkv, divides Hq
  int head_dim;      // D, even
};

// One layer's K and V page pools.
struct KvLayer {
  void* k = nullptr;  // [num_pages, Hkv, page_size, D]
  void* v = nullptr;  // [num_pages, Hkv, page_size, D]
  DType dtype = DType::kFloat32;
  int num_pages = 0;
  int page_size = 0;
};

// What a layer's routing writes (T tokens, k experts each, R = T*k expanded rows, E experts).
struct Routing {
  Tensor logits;                // [T, E] float32
  Tensor expert_ids;            // [T, k] int32
  Tensor weights;               // [T, k] float32, renormalised over the k
  Tensor expert_offsets;        // [E + 1] int32: the permuted rows of expert e are [offsets[e], offsets[e+1])
  Tensor permuted_to_expanded;  // [R] int32
  Tensor expanded_to_permuted;  // [R] int32
  Tensor gathered;              // [R, H]: permuted row r is x[permuted_to_expanded[r] / k]
};

// The experts' work on the gathered rows.
struct ExpertBuffers {
  Tensor gate_up;  // [R, 2F]
  Tensor act;      // [R, F]
  Tensor out;      // [R, H]
  // Scratch for int4 experts with act order, of the activation dtype, [max(2H, F) * R] (x gathered
  // into the column orders of w1's and w3's rows, or of w2's), or empty: a backend that needs it
  // then keeps its own (the engine's is empty only when it loads no act order).
  Tensor ordered_inputs;
  // The first of the router's experts that the expert weights hold: w13 [El, 2F, H] and w2 [El, H, F]
  // hold experts [first_expert, first_expert + El) of the router's E (an expert-parallel rank's
  // slice; all of them, from 0, otherwise).
  int64_t first_expert = 0;
};

// The expert offsets of the experts the weights hold (the expert GEMMs' offsets): the router's
// routing.expert_offsets [E + 1] whole, or its view [first_expert, first_expert + El] for a slice of
// El of the router's E experts (router [E, H], w13 [El, 2F, H]). ShapeError when the slice does not
// lie within the router's experts.
inline Tensor held_expert_offsets(const Routing& routing, const Tensor& router, const Tensor& w13,
                                  const ExpertBuffers& experts) {
  const int64_t E = router.shape[0], held = w13.shape[0], first = experts.first_expert;
  MX_CHECK(router.ndim == 2 && w13.ndim == 3 && routing.expert_offsets.ndim == 1 &&
               routing.expert_offsets.shape[0] == E + 1,
           ShapeError, "moe: router " << router.describe() << ", w13 " << w13.describe() << " and expert offsets "
                                      << routing.expert_offsets.describe() << " do not go together");
  MX_CHECK(first >= 0 && held >= 1 && first + held <= E, ShapeError,
           "moe: the expert weights hold experts [" << first << ", " << first + held << "), outside the router's "
                                                    << E);
  return routing.expert_offsets.rows(first, held + 1);
}

struct MemoryInfo {
  size_t free_bytes;   // what the device could still allocate
  size_t total_bytes;
};

class MX_EXPORT Backend {
 public:
  // ==== 1. The runtime: memory, copies, streams' events, graphs ====
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // A backend-specific setting (the CUDA backend: "expert_gemm" = auto|per_expert|batched|grouped).
  virtual void set_option(const std::string& name, const std::string& value) {
    throw Error("backend " + this->name() + ": unknown option '" + name + "' = '" + value + "'");
  }
  // How many host threads the ops use (the CPU backend; a device backend has none to set).
  virtual void set_threads(int /*threads*/) {}

  // Memory.
  virtual void* allocate(size_t bytes) = 0;  // throws DeviceOutOfMemoryError
  virtual void release(void* ptr) = 0;
  virtual void copy_from_host(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  virtual MemoryInfo memory_info() = 0;

  // Captured steps.
  // Host memory the device may read and write while the host goes on (pinned on the GPU), and
  // copies that return before they are done (synchronize() waits for them).
  virtual void* allocate_host(size_t bytes) = 0;
  virtual void release_host(void* ptr) = 0;
  virtual void copy_from_host_async(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host_async(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_async(void* dst, const void* src, size_t bytes) = 0;  // device to device
  // Whether enqueued work runs later, on a device of its own (the GPU), rather than as it is
  // enqueued: only then does queueing work ahead of the host gain time.
  virtual bool asynchronous() const { return false; }
  // Events: record_event() marks the point the queued work has reached, wait_event() returns when
  // the device has passed it (work queued later may still run). A backend that runs each operation
  // when it is enqueued has nothing to wait for.
  virtual int create_event() { return 0; }
  virtual void record_event(int) {}
  virtual void wait_event(int) {}
  virtual void release_event(int) {}
  // Graphs (CUDA graphs): the operations enqueued between begin_graph() and end_graph() are
  // recorded, not run, and run_graph() replays them, reading the host memory above afresh.
  // A backend without graphs says so, and the engine runs every step directly.
  virtual bool supports_graphs() const { return false; }
  virtual void begin_graph() { throw Error("backend " + name() + " has no graphs"); }
  virtual int end_graph() { throw Error("backend " + name() + " has no graphs"); }
  virtual void abort_graph() {}  // ends a capture that failed midway, recording nothing
  virtual void run_graph(int) { throw Error("backend " + name() + " has no graphs"); }
  virtual void release_graph(int) {}

  // Collectives of a sharded engine (core/communicator.h): rank 0's backend makes a new group id,
  // the ranks hand it round, and each rank's backend joins the group with it as rank `rank` of
  // `world_size` (a call that returns once every rank has joined). The communicator enqueues on
  // this backend's stream. nccl_library: NCCL's library, a path or a name dlopen finds. A backend
  // without collectives of its own (the CPU's: its engines get PythonCommunicator) throws.
  virtual std::string new_communicator_id(const std::string& /*nccl_library*/) {
    throw Error("backend " + name() + " has no communicator of its own");
  }
  virtual std::shared_ptr<Communicator> create_communicator(const std::string& /*nccl_library*/,
                                                            const std::string& /*id*/, int /*rank*/,
                                                            int /*world_size*/) {
    throw Error("backend " + name() + " has no communicator of its own");
  }

  // ==== 2. The operations, in the model's order; each backend implements every one ====
  // t[i] = uniform_in(seed, i, low, high) (core/random.h), rounded to t's dtype; t contiguous.
  // int4 codes are floored and clamped to 0..15 (int4_uniform_byte, core/int4.h).
  virtual void fill_uniform(Tensor& t, uint64_t seed, float low, float high) = 0;

  // out[t] = table[ids[t]]; table [V, H], ids [T] int32 (already range-checked), out [T, H].
  virtual void embedding(const Tensor& table, const Tensor& ids, Tensor& out) = 0;

  // residual += delta (when delta is given); out = rmsnorm(residual) * weight.
  // residual, delta, out [T, H]; weight [H].
  virtual void add_rmsnorm(Tensor& residual, const Tensor* delta, const Tensor& weight,
                           float eps, Tensor& out) = 0;

  // out = x @ w^T; x [M, K], w [N, K], out [M, N]; float32 accumulation.
  virtual void matmul(const Tensor& x, const Tensor& w, Tensor& out) = 0;

  // Rotates q and k of qkv in place (rotate-half RoPE at positions[t]) and writes
  // the rotated k and the v of each token into the cache slot of its position:
  // page page_table[pos / page_size], row pos % page_size.
  virtual void rope_kv_append(Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                              float rope_theta, const KvLayer& kv, const Tensor& page_table) = 0;

  // Causal GQA attention: token t attends to cache positions [0, positions[t]].
  // qkv [T, (Hq+2Hkv)*D] (only q is read), out [T, Hq*D]; scale 1/sqrt(D).
  virtual void attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                         const KvLayer& kv, const Tensor& page_table, Tensor& out) = 0;

  // Router: softmax over all experts, top-k (ties to the lower id), renormalise.
  // logits [T, E] float32 -> expert_ids [T, k] int32, weights [T, k] float32.
  virtual void router_topk(const Tensor& logits, Tensor& expert_ids, Tensor& weights) = 0;

  // Groups the expanded rows i = t*k + j by expert, stable in i.
  // expert_ids [T, k] -> expert_offsets [E + 1] (rows of expert e are
  // [offsets[e], offsets[e+1])), permuted_to_expanded [R], expanded_to_permuted [R].
  virtual void moe_permute(const Tensor& expert_ids, Tensor& expert_offsets,
                           Tensor& permuted_to_expanded, Tensor& expanded_to_permuted) = 0;

  // out[r] = x[permuted_to_expanded[r] / k]; x [T, H], out [R, H].
  virtual void moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k,
                          Tensor& out) = 0;

  // For each expert e: out[rows of e] = x[rows of e] @ w[e]^T.
  // x [R, K], w [E, N, K], expert_offsets [E + 1], out [R, N]. The experts' rows are the span
  // [offsets[0], offsets[E]): every row, or the rows of an expert-parallel rank's slice of the
  // router's experts (offsets a view into the router's); rows outside it are left as they are, but
  // for the CUDA backend's batched path (expert_gemm "batched", or "auto" for few rows), whose
  // pointer arrays cover every row and so need offsets[0] = 0 and offsets[E] = R (moe() over a slice
  // never takes it). For float8_e4m3 w, column n of
  // expert e is the float32 sum over k of x * e4m3(w) times w.row_scales[e * N + n]. For int4 w
  // (core/int4.h), the float32 sum over k of x[r, order[k]] * (code[e, n, k] - zero) * scale, zero
  // and scale those of group k / group_size of row e * N + n, order = input_order[e, s] for the
  // segment s of row n (w.int4.segments of N / segments rows), or the identity without one.
  virtual void expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                             Tensor& out) = 0;

  // out = silu(gate_up[:, :F]) * gate_up[:, F:]; gate_up [R, 2F], out [R, F].
  virtual void silu_mul(const Tensor& gate_up, Tensor& out) = 0;

  // out[t] = sum_j weights[t, j] * y[expanded_to_permuted[t*k + j]], j ascending.
  // y [R', H] with R' >= R (the rows of some tokens only may be combined), weights [T, k]
  // float32, out [T, H].
  virtual void moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted,
                             const Tensor& weights, Tensor& out) = 0;

  // One token from logits [V] float32 by the steps of core/sampling.h with the draw
  // uniform01(seed, step). state [2V + 1] int32 is the generation's: seen [V], counts [V] (read
  // for the penalties) and the draw counter step, all updated here, on the device, so a
  // captured decode step needs no host input. token [1] int32, logprob [1] float32 (raw
  // log-softmax of the token), top_ids [n] int32, top_logprobs [n] float32, n = params.logprobs.
  virtual void sample(const Tensor& logits, const SamplingParams& params, uint64_t seed, Tensor& state,
                      Tensor& token, Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) = 0;

  // ==== 3. The fusions: several operations in one call. Each default body runs them (the
  // reference); a backend overrides one where it fuses the work ====
  // rope_kv_append, then attention (qkv is scratch afterwards: its q and k heads may be left
  // rotated or not). The default runs the two; the CUDA backend fuses them for one token (decode).
  virtual void rope_attention(Tensor& qkv, const AttentionShape& shape, const Tensor& positions, float rope_theta,
                              const KvLayer& kv, const Tensor& page_table, Tensor& out) {
    rope_kv_append(qkv, shape, positions, rope_theta, kv, page_table);
    attention(qkv, shape, positions, kv, page_table, out);
  }

  // A layer's routing in one operation: logits = x @ router^T (float32), then router_topk,
  // moe_permute and moe_gather of x, into `routing` (layouts there); router [E, H]. This default
  // runs the four operations; a backend may fuse them (the CUDA backend does for few tokens: decode).
  virtual void route(const Tensor& x, const Tensor& router, Routing& routing) {
    matmul(x, router, routing.logits);
    router_topk(routing.logits, routing.expert_ids, routing.weights);
    moe_permute(routing.expert_ids, routing.expert_offsets, routing.permuted_to_expanded,
                routing.expanded_to_permuted);
    moe_gather(x, routing.permuted_to_expanded, static_cast<int>(routing.expert_ids.shape[1]), routing.gathered);
  }

  // A layer's mixture of experts up to the combine: route(x, router, routing), then on the
  // gathered rows expert_matmul by w13 [El, 2F, H] into experts.gate_up, silu_mul into
  // experts.act and expert_matmul by w2 [El, H, F] into experts.out (moe_unpermute combines them).
  // When the weights hold a slice of the router's experts (El < E, from experts.first_expert), the
  // GEMMs take the slice's offsets (held_expert_offsets) and the rows routed to other experts come
  // out zero in experts.out, so that the combine sums this slice's share (their rows of gate_up and
  // act are scratch). This default runs those operations; the CUDA backend reads the expert offsets
  // once for both expert GEMMs, and for decode writes the batched GEMMs' pointer arrays in the
  // routing kernel (all experts held) or reads the offsets on the device (quantized experts).
  virtual void moe(const Tensor& x, const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                   ExpertBuffers& experts) {
    const Tensor offsets = held_expert_offsets(routing, router, w13, experts);
    route(x, router, routing);
    if (w13.shape[0] < router.shape[0]) fill_uniform(experts.out, 0, 0.0f, 0.0f);  // every draw in [0, 0]: zeros
    expert_matmul(routing.gathered, w13, offsets, experts.gate_up);
    silu_mul(experts.gate_up, experts.act);
    expert_matmul(experts.act, w2, offsets, experts.out);
  }

  // The FFN half of a layer up to the combine: add_rmsnorm(residual, &delta, norm_weight, eps, h),
  // then moe(h, ...). The default runs the two; the CUDA backend does the norm in its fused
  // routing kernel (decode).
  virtual void add_rmsnorm_moe(Tensor& residual, const Tensor& delta, const Tensor& norm_weight, float eps, Tensor& h,
                               const Tensor& router, const Tensor& w13, const Tensor& w2, Routing& routing,
                               ExpertBuffers& experts) {
    add_rmsnorm(residual, &delta, norm_weight, eps, h);
    moe(h, router, w13, w2, routing, experts);
  }

  // The experts' outputs combined into the residual stream and its next norm: moe_unpermute into
  // delta [T, H], then add_rmsnorm(residual, &delta, weight, eps, out). The default runs the
  // two; a backend may fuse them (the CUDA backend does, and leaves delta unwritten).
  virtual void moe_unpermute_add_rmsnorm(const Tensor& y, const Tensor& expanded_to_permuted, const Tensor& weights,
                                         Tensor& delta, Tensor& residual, const Tensor& norm_weight, float eps,
                                         Tensor& out) {
    moe_unpermute(y, expanded_to_permuted, weights, delta);
    add_rmsnorm(residual, &delta, norm_weight, eps, out);
  }
};

}  // namespace mixtral
