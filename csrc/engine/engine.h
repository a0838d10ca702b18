// The device-agnostic Mixtral model: configuration, weights in one arena,
// the KV page pools, a workspace for one chunk of tokens, and the forward pass
// wired from the operations of core/backend.h. Its definitions, by part:
//   engine/engine.cpp   configuration, memory plan, construction, sequences
//   engine/weights.cpp  the weight slots: layout, loading, random weights
//   engine/forward.cpp  the model itself (enqueue_model), chunks of a prompt
//   engine/decode.cpp   samplers and the pipelined, graph-recorded decode steps
//
// Weight slots, each [rows, cols] row-major in the weight dtype (w13 and w2 in
// the expert dtype, which may be float8_e4m3 with one float32 scale per row,
// core/fp8.h, or int4 with group scales, zeros and, for act order, a column
// order per row segment: w1's and w3's rows of w13, w2's; core/int4.h), per
// layer and per expert where marked (layouts as in core/backend.h):
//   embed [V, H]   lm_head [V, H]   final_norm [1, H]
//   per layer: attn_norm [1, H]  wqkv [(Hq+2Hkv)*D, H] (q rows, then k, then v)
//              wo [H, Hq*D]  ffn_norm [1, H]  router [E, H]
//   per layer and held expert: w13 [2F, H] (w1 rows, then w3)  w2 [H, F]
// The held experts are all E of them, or an expert-parallel rank's slice of options.held_experts
// from options.first_expert (the router still scores all E; engine/forward.cpp).
// q and k rows use the rotate-half RoPE layout (Hugging Face's); loaders
// permute interleaved checkpoints before calling load_weight.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/communicator.h"
#include "cpu/thread_tuner.h"
#include "engine/kv_cache.h"

namespace mixtral {

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  float rope_theta = 1e6f;
  float rms_norm_eps = 1e-5f;
  int64_t max_position_embeddings = 0;

  void validate() const;  // throws Error naming the first bad field
  int64_t qkv_width() const { return (num_heads + 2 * num_kv_heads) * head_dim; }
};

struct EngineOptions {
  DType weight_dtype = DType::kFloat32;
  DType expert_dtype = DType::kFloat32;      // of w13 and w2: the weight dtype, float8_e4m3 or int4
  int64_t int4_group_size = kInt4QuantizeGroupSize;  // int4 experts' input columns per group; 0: one per row
  // int4 blocks may come with act order (load_weight_int4's column_groups): the workspace then holds
  // the experts' inputs in their column orders (ExpertBuffers::ordered_inputs), else it has no room.
  bool int4_act_order = false;
  DType activation_dtype = DType::kFloat32;  // also the KV cache dtype
  int64_t max_context = 0;                   // tokens one sequence may hold
  int64_t kv_cache_tokens = 0;               // pool capacity over all sequences
  int page_size = 16;                        // tokens per KV page
  int64_t max_batch_tokens = 256;            // tokens per forward chunk
  bool graphs = false;                       // record each sampler's decode step once, replay it
  int num_threads = 0;                       // the CPU's threads; 0: timed decode steps choose (cpu/thread_tuner.h)
  // The experts whose weights this engine holds: [first_expert, first_expert + held_experts) of the
  // model's num_experts (an expert-parallel rank's slice); held_experts 0: all of them.
  int64_t first_expert = 0;
  int64_t held_experts = 0;
  int64_t experts_held(const ModelConfig& c) const { return held_experts > 0 ? held_experts : c.num_experts; }
};

enum class Slot { kEmbed, kLmHead, kFinalNorm, kAttnNorm, kWqkv, kWo, kFfnNorm, kRouter, kW13, kW2, kCount };

class Engine {
 public:
  Engine(const ModelConfig& config, const EngineOptions& options, std::unique_ptr<Backend> backend);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // What an engine of this config and options allocates on its device besides the KV cache, and
  // the KV cache's bytes per token (so a caller can size the cache to the memory left).
  struct MemoryPlan {
    size_t weight_bytes, workspace_bytes, kv_bytes_per_token;
  };
  static MemoryPlan memory_plan(const ModelConfig& config, const EngineOptions& options);

  // Makes this engine one rank of a sharded model: its config is its own slice (heads, expert width),
  // and after attention's output projection and after the experts' combine the ranks' partial
  // outputs are summed through the communicator (engine/forward.cpp). Set before the first forward
  // pass; null runs unsharded (a world of one runs the sharded data flow with sums of one rank, for
  // benchmarks/bench_parallel.py to measure what they cost).
  void set_communicator(std::shared_ptr<Communicator> communicator);
  const std::shared_ptr<Communicator>& communicator() const { return communicator_; }

  const ModelConfig& config() const { return config_; }
  const EngineOptions& options() const { return options_; }
  Backend& backend() { return *backend_; }
  // The threads the CPU's ops use now: num_threads, or the tuner's best; 0 on a GPU.
  int num_threads() const;

  // ---- weights (engine/weights.cpp) ----
  // Copies a host block [rows, cols] of dtype src_dtype into rows
  // [row_offset, row_offset + rows) of a slot, converting to the slot's dtype. A float8_e4m3
  // block comes with its src_row_scales [rows] (core/fp8.h); into a float8_e4m3 slot its bytes
  // and scales go as they are, a float block is quantized; into an int4 slot a float block is
  // quantized in groups of options.int4_group_size (core/int4.h).
  void load_weight(const std::string& slot, int64_t layer, int64_t expert, int64_t row_offset,
                   const void* src, DType src_dtype, int64_t rows, int64_t cols,
                   const float* src_row_scales = nullptr);
  // Copies an int4 block into an int4 slot as it is: packed codes [rows, cols / 2] (core/int4.h),
  // scales and zeros [rows, groups] (zeros integers 0..16, scales finite in float16) with the
  // slot's group size, and column_groups [cols] (each input column's group, act order) or null
  // for groups of consecutive columns. With act order the block is one whole row segment.
  void load_weight_int4(const std::string& slot, int64_t layer, int64_t expert, int64_t row_offset,
                        const uint8_t* packed, int64_t rows, int64_t cols, const float* scales, const float* zeros,
                        const int32_t* column_groups);
  std::vector<std::string> missing_weights() const;  // slots not fully loaded
  int64_t int4_groups_of(const std::string& slot) const;  // groups per row of an int4 slot (0 for another dtype)
  // Fills every slot with random weights on the device, no file needed (for benchmarks):
  // linear weights uniform with std 1/sqrt(cols), embedding and router std 1 (decisive
  // routing), norms in [0.5, 1.5).
  void init_random(uint64_t seed);
  size_t weight_bytes() const { return weight_bytes_; }

  // ---- sequences (engine/engine.cpp; append: engine/forward.cpp) ----
  int create_sequence() { return kv_.create(); }
  void release_sequence(int sequence);
  void truncate_sequence(int sequence, int64_t length);
  int64_t sequence_length(int sequence) const { return kv_.length(sequence); }
  // Runs tokens after the sequence's current end and writes float32 logits to
  // out: [n, V] when all_logits, else [V] for the last token. On any error the
  // sequence keeps its previous length.
  void append(int sequence, const int32_t* tokens, int64_t n, bool all_logits, float* out);
  // ---- sampling on the device (logits stay there; a few bytes come back; engine/decode.cpp) ----
  // A sampler for one generation: settings, seed, and its state (seen, counts, the draw counter,
  // the last token drawn) on the device, with the prompt's tokens marked seen. Returns its handle.
  int create_sampler(const SamplingParams& params, uint64_t seed, const int32_t* prompt, int64_t n);
  void release_sampler(int sampler);  // gives back its queued decode steps first
  // append() of the tokens (a prompt), then the next token drawn by the sampler.
  SampledToken append_sample(int sequence, const int32_t* tokens, int64_t n, int sampler);
  // The decode loop, pipelined: a decode step's input is the token its sampler drew last, read
  // on the device, so the host need not wait between steps. decode_next() queues the step of the
  // sampler's last token (drawn on `sequence`) unless it is queued already, then, when
  // queue_ahead is set, the backend runs ahead of the host (the GPU) and it fits (context, KV
  // pages), one more step after it, then waits for the older step only and returns its token:
  // the step queued ahead runs while the caller handles that token. The sequence holds the
  // tokens of the queued steps; release_sampler, release_sequence, truncate_sequence and append
  // wait for them and give back those whose tokens nobody read. The queued steps' tokens count
  // as drawn in the sampler's state. Decode steps take their inputs from and leave their outputs
  // in pinned host memory, two slots per sampler; with options.graphs (on a backend with graphs)
  // a sampler's first step runs directly and each slot's next one is recorded as a graph.
  SampledToken decode_next(int sequence, int sampler, bool queue_ahead);
  int num_samplers() const { return static_cast<int>(samplers_.size()); }

  const KvCacheManager& kv_cache() const { return kv_; }
  size_t kv_cache_bytes() const { return kv_bytes_; }
  size_t workspace_bytes() const { return work_.bytes; }

 private:
  struct SlotLayout {
    int64_t rows, cols;
    int64_t count;        // instances: layers x experts, 1 for global slots
    DType dtype;
    size_t offset;        // bytes into the weight arena
    // float8_e4m3: the [count * rows] float32 row scales; int4: the [count * rows, groups] float16
    // group scales; bytes into the arena.
    size_t scale_offset = 0;
    // int4 only: zeros [count * rows, groups] uint8 and the column orders [count, segments, cols]
    // int32 (bytes into the arena), read when `ordered` (a block with act order was loaded).
    size_t zero_offset = 0, order_offset = 0;
    int64_t group_size = 0, groups = 0, segments = 1;
    bool ordered = false;
  };
  Tensor weight(Slot slot, int64_t layer) const;  // [rows, cols], or [E, rows, cols] for experts
  // A slot's index from its name, and the first row of a block (checked to fit) in the slot's rows.
  int slot_index(const std::string& slot_name) const;
  size_t block_first_row(int s, int64_t layer, int64_t expert, int64_t row_offset, int64_t rows, int64_t cols) const;
  // Sets every column order of the int4 slots to the identity (no act order), and `ordered` off.
  void reset_int4_orders();
  // Stores an int4 block (codes packed two a byte, float16 scales, zeros) at first_row of slot s,
  // and `order` as the column order of its row segment (a block with one is one whole segment;
  // null: the segment keeps its order, the identity unless an earlier block gave another).
  void store_int4_block(int s, size_t first_row, int64_t rows, const uint8_t* packed, const uint16_t* scales,
                        const uint8_t* zeros, const int32_t* order);
  Tensor norm_weight(Slot slot, int64_t layer) const;  // [H]
  KvLayer kv_layer(int64_t layer) const;
  // Runs the tokens in chunks. Logits: all_logits -> [n, V] to host_out; else the last
  // token's [V] to host_out, or left in work_.logits row 0 when host_out is null.
  void forward(int sequence, const int32_t* tokens, int64_t n, bool all_logits, float* host_out);
  // Checks n tokens and the room for them, and grows the sequence by n; returns its old length.
  int64_t grow(int sequence, const int32_t* tokens, int64_t n);
  // One chunk: stages and copies its inputs, enqueues the forward pass.
  void run_chunk(int sequence, const int32_t* tokens, int64_t n, int64_t start, int64_t logit_rows);
  // Writes the ids, positions (from start) and the sequence's page table into step_in_, once
  // the device is done with its previous contents; enqueue_input_copies(n) sends them over.
  void stage_inputs(int sequence, const int32_t* tokens, int64_t n, int64_t start);
  void enqueue_input_copies(int64_t n);
  // The forward pass of n tokens whose ids, positions and page table are on the device already;
  // leaves float32 logits of the last logit_rows tokens in work_.logits rows [0, logit_rows).
  // enqueue_forward sets the CPU's threads around it (and times decode steps for the tuner).
  void enqueue_forward(int64_t n, int64_t logit_rows);
  void enqueue_model(int64_t n, int64_t logit_rows);
  struct SamplerState {
    SamplingParams params;
    uint64_t seed;
    void* state;        // on the device, int32: seen [V], counts [V], the draw counter, the last token
    int32_t* slots;     // pinned: two decode step slots of step_slot_words() (step_slot() has the layout)
    int events[2];      // each slot's step is done
    int graphs[2];      // each slot's recorded decode step, -1 before
    bool stepped;       // a decode step has run directly (later ones may be recorded)
    int sequence;       // where the sampler drew its last token, -1 before the first
    int queued;         // decode steps queued and not yet read: 0, 1 or 2
    int next_slot;      // the slot of the next decode step
  };
  SamplerState& find_sampler(int sampler, const char* caller);
  // Samples from work_.logits row 0 into the sampler's state and copies the results to out (pinned,
  // kOutputWords); read_sample() reads them there once the device is done.
  void enqueue_sample(SamplerState& s, int32_t* out);
  SampledToken read_sample(const SamplerState& s, const int32_t* out) const;
  static constexpr int64_t kOutputWords = 2 + 2 * kMaxLogprobs;  // token, logprob, top ids, top logprobs
  // A decode step slot: [0] the position, [1, 1 + max pages) the page table, then the outputs.
  int64_t step_slot_words() const { return 1 + work_.page_table.shape[0] + kOutputWords; }
  int32_t* step_slot(const SamplerState& s, int slot) const { return s.slots + slot * step_slot_words(); }
  int32_t* step_output(const SamplerState& s, int slot) const {
    return step_slot(s, slot) + 1 + work_.page_table.shape[0];
  }
  // Grows the sequence by one position and queues the decode step of the sampler's last token.
  void queue_decode_step(int sequence, SamplerState& s);
  void stop_decode(SamplerState& s);
  void stop_decodes_on(int sequence);  // of every sampler with steps queued on it
  std::map<int, SamplerState> samplers_;
  int next_sampler_ = 0;

  ModelConfig config_;
  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<Communicator> communicator_;  // null: one rank
  std::unique_ptr<ThreadTuner> thread_tuner_;  // on the CPU with num_threads 0
  KvCacheManager kv_;

  SlotLayout slots_[static_cast<int>(Slot::kCount)];
  std::vector<int64_t> rows_loaded_[static_cast<int>(Slot::kCount)];
  void* weight_arena_ = nullptr;
  size_t weight_bytes_ = 0;
  void* kv_arena_ = nullptr;
  size_t kv_bytes_ = 0;

  // The device buffers of one chunk of up to T = max_batch_tokens tokens, in one allocation.
  struct Workspace {
    Tensor ids, positions, page_table;   // [T], [T], [max pages] int32
    Tensor residual, normed, qkv, attn, delta;   // [T, H] / [T, qkv] / [T, Hq*D] / [T, H]
    Routing routing;        // for T tokens (layouts in core/backend.h)
    ExpertBuffers experts;  // for T*k rows (ordered_inputs with int4 experts with act order only)
    Tensor logits;  // [T, V] float32
    Tensor sampled_logprob, top_ids, top_logprobs;  // [1] f32, [20] i32, [20] f32
    size_t bytes = 0;  // of the allocation
    // The tensors as offsets into an allocation of `bytes`; place() turns them into pointers.
    static Workspace plan(const ModelConfig& c, const EngineOptions& options);
    void place(void* base, Device device);
  };
  // Lays the weight slots out in one arena; returns its bytes.
  static size_t plan_weights(const ModelConfig& c, const EngineOptions& options, SlotLayout* slots);
  Workspace work_;
  void* workspace_arena_ = nullptr;
  // Pinned inputs of a chunk: [ids T, positions T, page table (max pages)] int32.
  int32_t* step_in_ = nullptr;
};

}  // namespace mixtral
