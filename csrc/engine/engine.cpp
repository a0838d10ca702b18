// The engine's life: its configuration and options checked, the memory planned (weights, KV pools,
// workspace) and allocated, the sequences, and the CPU's threads. The model's weights are in
// engine/weights.cpp, the forward pass in engine/forward.cpp, and sampling and the pipelined
// decode steps in engine/decode.cpp.
#include "engine/engine.h"

#include <algorithm>
#include <utility>

#include "engine/arena.h"

namespace mixtral {

void ModelConfig::validate() const {
  auto positive = [](int64_t value, const char* name) {
    MX_CHECK(value > 0 && value < (int64_t(1) << 31), Error,
             "config: " << name << " must be in [1, 2^31), got " << value);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_layers, "num_hidden_layers");
  positive(num_heads, "num_attention_heads");
  positive(num_kv_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(num_experts, "num_local_experts");
  positive(experts_per_token, "num_experts_per_tok");
  positive(max_position_embeddings, "max_position_embeddings");
  MX_CHECK(num_heads % num_kv_heads == 0, Error,
           "config: num_attention_heads " << num_heads << " is not a multiple of num_key_value_heads "
                                          << num_kv_heads);
  MX_CHECK(head_dim % 2 == 0, Error, "config: head_dim " << head_dim << " must be even for RoPE");
  MX_CHECK(experts_per_token <= num_experts, Error,
           "config: num_experts_per_tok " << experts_per_token << " exceeds num_local_experts "
                                          << num_experts);
  MX_CHECK(rope_theta > 0 && rms_norm_eps > 0, Error,
           "config: rope_theta and rms_norm_eps must be positive");
}

namespace {

void validate_options(const ModelConfig& config, const EngineOptions& options) {
  MX_CHECK(options.max_context >= 1, Error, "max_context must be >= 1");
  MX_CHECK(options.kv_cache_tokens >= 1 && options.kv_cache_tokens < (int64_t(1) << 31), Error,
           "kv_cache_tokens must be in [1, 2^31), got " << options.kv_cache_tokens);
  MX_CHECK(options.page_size >= 1, Error, "page_size must be >= 1");
  MX_CHECK(options.max_batch_tokens >= 1, Error, "max_batch_tokens must be >= 1");
  MX_CHECK(options.num_threads >= 0, Error, "num_threads must be >= 1 (or 0 to measure), got " << options.num_threads);
  MX_CHECK(is_float(options.weight_dtype) && is_float(options.activation_dtype), Error,
           "weights and activations need a float dtype");
  MX_CHECK(options.expert_dtype == options.weight_dtype || options.expert_dtype == DType::kFloat8E4M3 ||
               options.expert_dtype == DType::kInt4,
           Error, "expert weights take the weight dtype, float8_e4m3 or int4, not " << dtype_name(options.expert_dtype));
  MX_CHECK(options.int4_group_size >= 0 && options.int4_group_size < (int64_t(1) << 31), Error,
           "int4_group_size must be >= 1 (or 0: one group per row), got " << options.int4_group_size);
  MX_CHECK(options.first_expert >= 0 && options.held_experts >= 0 &&
               options.first_expert + options.experts_held(config) <= config.num_experts,
           Error, "held experts [" << options.first_expert << ", " << options.first_expert + options.experts_held(config)
                                   << ") are not among the model's " << config.num_experts);
}

size_t kv_bytes_per_token(const ModelConfig& c, DType activation_dtype) {
  return size_t(c.num_layers) * 2 * c.num_kv_heads * c.head_dim * dtype_size(activation_dtype);
}

}  // namespace

Engine::Workspace Engine::Workspace::plan(const ModelConfig& c, const EngineOptions& options) {
  const int64_t T = options.max_batch_tokens, H = c.hidden_size, E = c.num_experts, F = c.intermediate_size;
  const int64_t k = c.experts_per_token;
  const int64_t max_pages = (options.max_context + options.page_size - 1) / options.page_size;
  const DType act = options.activation_dtype;
  ArenaPlan plan;
  Workspace w;
  w.ids = plan.add(DType::kInt32, {T});
  w.positions = plan.add(DType::kInt32, {T});
  w.page_table = plan.add(DType::kInt32, {max_pages});
  w.residual = plan.add(act, {T, H});
  w.normed = plan.add(act, {T, H});
  w.qkv = plan.add(act, {T, c.qkv_width()});
  w.attn = plan.add(act, {T, c.num_heads * c.head_dim});
  w.delta = plan.add(act, {T, H});
  w.routing.logits = plan.add(DType::kFloat32, {T, E});
  w.routing.expert_ids = plan.add(DType::kInt32, {T, k});
  w.routing.weights = plan.add(DType::kFloat32, {T, k});
  w.routing.expert_offsets = plan.add(DType::kInt32, {E + 1});
  w.routing.permuted_to_expanded = plan.add(DType::kInt32, {T * k});
  w.routing.expanded_to_permuted = plan.add(DType::kInt32, {T * k});
  w.routing.gathered = plan.add(act, {T * k, H});
  w.experts.gate_up = plan.add(act, {T * k, 2 * F});
  w.experts.act = plan.add(act, {T * k, F});
  w.experts.out = plan.add(act, {T * k, H});
  if (options.expert_dtype == DType::kInt4 && options.int4_act_order)
    w.experts.ordered_inputs = plan.add(act, {std::max(2 * H, F) * T * k});
  w.logits = plan.add(DType::kFloat32, {T, c.vocab_size});
  w.sampled_logprob = plan.add(DType::kFloat32, {1});
  w.top_ids = plan.add(DType::kInt32, {kMaxLogprobs});
  w.top_logprobs = plan.add(DType::kFloat32, {kMaxLogprobs});
  w.bytes = plan.bytes();
  return w;
}

void Engine::Workspace::place(void* base, Device device) {
  for (Tensor* t : {&ids, &positions, &page_table, &residual, &normed, &qkv, &attn, &delta, &routing.logits,
                    &routing.expert_ids, &routing.weights, &routing.expert_offsets, &routing.permuted_to_expanded,
                    &routing.expanded_to_permuted, &routing.gathered, &experts.gate_up, &experts.act, &experts.out,
                    &experts.ordered_inputs, &logits, &sampled_logprob, &top_ids, &top_logprobs})
    if (t->ndim > 0) ArenaPlan::place(*t, base, device);  // a tensor the plan left out stays empty
}

Engine::MemoryPlan Engine::memory_plan(const ModelConfig& config, const EngineOptions& options) {
  config.validate();
  validate_options(config, options);
  SlotLayout slots[static_cast<int>(Slot::kCount)];
  return MemoryPlan{plan_weights(config, options, slots), Workspace::plan(config, options).bytes,
                    kv_bytes_per_token(config, options.activation_dtype)};
}

Engine::Engine(const ModelConfig& config, const EngineOptions& options,
               std::unique_ptr<Backend> backend)
    : config_(config),
      options_(options),
      backend_(std::move(backend)),
      kv_(static_cast<int>(std::max<int64_t>(1, (options.kv_cache_tokens + options.page_size - 1) /
                                                   std::max(options.page_size, 1))),
          options.page_size) {
  config_.validate();
  validate_options(config_, options_);
  if (backend_->device() == Device::kCpu) {
    if (options_.num_threads > 0) backend_->set_threads(options_.num_threads);
    else thread_tuner_ = std::make_unique<ThreadTuner>(ThreadTuner::available_threads());
  }

  // ---- weights: one arena, slot after slot ----
  weight_bytes_ = plan_weights(config_, options_, slots_);
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) rows_loaded_[s].assign(slots_[s].count, 0);
  weight_arena_ = backend_->allocate(weight_bytes_);
  try {
    reset_int4_orders();
  } catch (...) {
    backend_->release(weight_arena_);
    throw;
  }

  // ---- KV pools: [L][k|v][num_pages, Hkv, page_size, D] ----
  kv_bytes_ = kv_bytes_per_token(config_, options_.activation_dtype) * kv_.num_pages() * kv_.page_size();
  try {
    kv_arena_ = backend_->allocate(kv_bytes_);
    work_ = Workspace::plan(config_, options_);
    workspace_arena_ = backend_->allocate(work_.bytes);
    work_.place(workspace_arena_, backend_->device());
    step_in_ = static_cast<int32_t*>(backend_->allocate_host(
        (2 * options_.max_batch_tokens + work_.page_table.shape[0]) * sizeof(int32_t)));
  } catch (...) {
    if (step_in_) backend_->release_host(step_in_);
    if (workspace_arena_) backend_->release(workspace_arena_);
    if (kv_arena_) backend_->release(kv_arena_);
    backend_->release(weight_arena_);
    throw;
  }
}

Engine::~Engine() {
  try {
    backend_->synchronize();  // queued decode steps still use the buffers
  } catch (...) {
  }
  while (!samplers_.empty()) release_sampler(samplers_.begin()->first);
  backend_->release_host(step_in_);
  backend_->release(workspace_arena_);
  backend_->release(kv_arena_);
  backend_->release(weight_arena_);
}

void Engine::release_sequence(int sequence) {
  stop_decodes_on(sequence);
  kv_.release(sequence);
}

void Engine::truncate_sequence(int sequence, int64_t length) {
  stop_decodes_on(sequence);
  MX_CHECK(length >= 0 && length <= kv_.length(sequence), Error,
           "truncate: length " << length << " outside [0, " << kv_.length(sequence) << "]");
  kv_.resize(sequence, length);
}

int Engine::num_threads() const {
  if (backend_->device() != Device::kCpu) return 0;
  return thread_tuner_ ? thread_tuner_->best() : options_.num_threads;
}

}  // namespace mixtral
