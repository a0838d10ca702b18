// The Mixtral forward pass over the operation interface (see engine/engine.h
// for the weight slots and core/backend.h for the layouts). One chunk:
//   x = embed(ids)
//   per layer: h = norm(x += moe_out of the layer before: its experts' rows, weighted
//              and unpermuted); qkv = h @ wqkv^T; in one operation rope + KV append
//              and attn = attention(q, cache); in one operation h = norm(x += attn @ wo^T)
//              and moe: route h (router, top-k, group and gather rows by expert),
//              silu(h w1) * (h w3) @ w2 per expert
//   h = norm(x += moe_out of the last layer), logit rows only; logits = h @ lm_head^T
// Then either the logits go to the host (append), or the backend samples the
// next token where they are (append_sample). Decode steps (decode_next) take
// their input token from the sampler's state on the device, are queued one
// ahead of the token the host reads, and can be recorded once as graphs.
#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace mixtral {

namespace {

const char* const kSlotNames[] = {"embed",    "lm_head", "final_norm", "attn_norm", "wqkv",
                                  "wo",       "ffn_norm", "router",    "w13",       "w2"};

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Hands out aligned tensors from one allocation, sized in a first pass.
class ArenaPlan {
 public:
  Tensor add(DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t(reinterpret_cast<void*>(bytes_), dtype, Device::kCpu, dims);
    bytes_ += align_up(t.nbytes());
    return t;
  }
  size_t bytes() const { return bytes_; }
  // Turns the planned offsets into pointers into `base` on `device`.
  static void place(Tensor& t, void* base, Device device) {
    t.data = static_cast<char*>(base) + reinterpret_cast<size_t>(t.data);
    t.device = device;
  }

 private:
  size_t bytes_ = 0;
};

}  // namespace

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

void validate_options(const EngineOptions& options) {
  MX_CHECK(options.max_context >= 1, Error, "max_context must be >= 1");
  MX_CHECK(options.kv_cache_tokens >= 1 && options.kv_cache_tokens < (int64_t(1) << 31), Error,
           "kv_cache_tokens must be in [1, 2^31), got " << options.kv_cache_tokens);
  MX_CHECK(options.page_size >= 1, Error, "page_size must be >= 1");
  MX_CHECK(options.max_batch_tokens >= 1, Error, "max_batch_tokens must be >= 1");
  MX_CHECK(options.num_threads >= 0, Error, "num_threads must be >= 1 (or 0 to measure), got " << options.num_threads);
  MX_CHECK(is_float(options.weight_dtype) && is_float(options.activation_dtype), Error,
           "weights and activations need a float dtype");
  MX_CHECK(options.expert_dtype == options.weight_dtype || options.expert_dtype == DType::kFloat8E4M3, Error,
           "expert weights take the weight dtype or float8_e4m3, not " << dtype_name(options.expert_dtype));
}

size_t kv_bytes_per_token(const ModelConfig& c, DType activation_dtype) {
  return size_t(c.num_layers) * 2 * c.num_kv_heads * c.head_dim * dtype_size(activation_dtype);
}

}  // namespace

size_t Engine::plan_weights(const ModelConfig& c, const EngineOptions& options, SlotLayout* slots) {
  const int64_t H = c.hidden_size, E = c.num_experts, L = c.num_layers, F = c.intermediate_size;
  const int64_t shapes[][3] = {
      {c.vocab_size, H, 1},          {c.vocab_size, H, 1}, {1, H, 1},     {1, H, L},
      {c.qkv_width(), H, L},         {H, c.num_heads * c.head_dim, L},    {1, H, L},
      {E, H, L},                     {2 * F, H, L * E},   {H, F, L * E}};
  size_t total = 0;
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const bool expert = s == int(Slot::kW13) || s == int(Slot::kW2);
    const DType dtype = expert ? options.expert_dtype : options.weight_dtype;
    const size_t rows = size_t(shapes[s][0]) * shapes[s][2];
    slots[s] = SlotLayout{shapes[s][0], shapes[s][1], shapes[s][2], dtype, total, 0};
    total += align_up(rows * shapes[s][1] * dtype_size(dtype));
    if (dtype == DType::kFloat8E4M3) {
      slots[s].scale_offset = total;
      total += align_up(rows * sizeof(float));
    }
  }
  return total;
}

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
                    &logits, &sampled_logprob, &top_ids, &top_logprobs})
    ArenaPlan::place(*t, base, device);
}

Engine::MemoryPlan Engine::memory_plan(const ModelConfig& config, const EngineOptions& options) {
  config.validate();
  validate_options(options);
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
  validate_options(options_);
  if (backend_->device() == Device::kCpu) {
    if (options_.num_threads > 0) backend_->set_threads(options_.num_threads);
    else thread_tuner_ = std::make_unique<ThreadTuner>(ThreadTuner::available_threads());
  }

  // ---- weights: one arena, slot after slot ----
  weight_bytes_ = plan_weights(config_, options_, slots_);
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) rows_loaded_[s].assign(slots_[s].count, 0);
  weight_arena_ = backend_->allocate(weight_bytes_);

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

// ---- weights ------------------------------------------------------------------

void Engine::load_weight(const std::string& slot_name, int64_t layer, int64_t expert,
                         int64_t row_offset, const void* src, DType src_dtype, int64_t rows,
                         int64_t cols, const float* src_row_scales) {
  const auto* found = std::find(std::begin(kSlotNames), std::end(kSlotNames), slot_name);
  MX_CHECK(found != std::end(kSlotNames), Error, "load_weight: unknown slot '" << slot_name << "'");
  const int s = static_cast<int>(found - std::begin(kSlotNames));
  const SlotLayout& slot = slots_[s];
  const bool per_expert = s == int(Slot::kW13) || s == int(Slot::kW2);
  const int64_t layers = slot.count == 1 ? 1 : config_.num_layers;
  const int64_t experts = per_expert ? config_.num_experts : 1;
  MX_CHECK(layer >= 0 && layer < layers && expert >= 0 && expert < experts, ShapeError,
           slot_name << ": layer " << layer << " / expert " << expert << " outside " << layers
                     << " layers / " << experts << " experts");
  MX_CHECK(cols == slot.cols && rows >= 1 && row_offset >= 0 && row_offset + rows <= slot.rows,
           ShapeError,
           slot_name << ": block [" << rows << ", " << cols << "] at row " << row_offset
                     << " does not fit the slot's [" << slot.rows << ", " << slot.cols << "]");
  const bool src_fp8 = src_dtype == DType::kFloat8E4M3;
  MX_CHECK(is_float(src_dtype) || (src_fp8 && src_row_scales), ShapeError,
           slot_name << ": unsupported source dtype " << dtype_name(src_dtype)
                     << (src_fp8 ? " without row scales" : ""));
  const int64_t instance = layer * experts + expert;
  const size_t first_row = size_t(instance) * slot.rows + row_offset;
  char* arena = static_cast<char*>(weight_arena_);
  std::vector<char> staging(size_t(rows) * cols * dtype_size(slot.dtype));
  std::vector<float> values;  // the block widened to float32, when it must be converted from FP8 or to it
  if (src_fp8 != (slot.dtype == DType::kFloat8E4M3)) {
    values.resize(size_t(rows) * cols);
    if (src_fp8) dequantize_rows_e4m3(static_cast<const uint8_t*>(src), src_row_scales, rows, cols, values.data());
    else convert_host(src, src_dtype, values.data(), DType::kFloat32, rows * cols);
  }
  if (slot.dtype == DType::kFloat8E4M3) {
    std::vector<float> scales(rows);
    if (src_fp8) {
      std::memcpy(staging.data(), src, staging.size());
      std::copy(src_row_scales, src_row_scales + rows, scales.begin());
    } else {
      quantize_rows_e4m3(values.data(), rows, cols, reinterpret_cast<uint8_t*>(staging.data()), scales.data());
    }
    backend_->copy_from_host(arena + slot.scale_offset + first_row * sizeof(float), scales.data(),
                             scales.size() * sizeof(float));
  } else if (src_fp8) {
    convert_host(values.data(), DType::kFloat32, staging.data(), slot.dtype, rows * cols);
  } else {
    convert_host(src, src_dtype, staging.data(), slot.dtype, rows * cols);
  }
  backend_->copy_from_host(arena + slot.offset + first_row * slot.cols * dtype_size(slot.dtype), staging.data(),
                           staging.size());
  rows_loaded_[s][instance] += rows;
}

std::vector<std::string> Engine::missing_weights() const {
  std::vector<std::string> missing;
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    for (size_t i = 0; i < rows_loaded_[s].size(); ++i) {
      if (rows_loaded_[s][i] != slots_[s].rows)
        missing.push_back(std::string(kSlotNames[s]) + "[" + std::to_string(i) + "]: " +
                          std::to_string(rows_loaded_[s][i]) + " of " +
                          std::to_string(slots_[s].rows) + " rows loaded");
    }
  }
  return missing;
}

void Engine::init_random(uint64_t seed) {
  const float sqrt3 = std::sqrt(3.0f);
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const SlotLayout& slot = slots_[s];
    Tensor all(static_cast<char*>(weight_arena_) + slot.offset, slot.dtype, backend_->device(),
               {slot.count * slot.rows * slot.cols});
    const Slot kind = static_cast<Slot>(s);
    float low = 0.5f, high = 1.5f;  // norms
    if (kind == Slot::kEmbed || kind == Slot::kRouter) {
      low = -sqrt3, high = sqrt3;
    } else if (kind != Slot::kFinalNorm && kind != Slot::kAttnNorm && kind != Slot::kFfnNorm) {
      high = sqrt3 / std::sqrt(static_cast<float>(slot.cols)), low = -high;
    }
    if (slot.dtype == DType::kFloat8E4M3) {  // values of std 1 times row scales in [0.5, 1.5] x the std
      Tensor scales(static_cast<char*>(weight_arena_) + slot.scale_offset, DType::kFloat32, backend_->device(),
                    {slot.count * slot.rows});
      backend_->fill_uniform(scales, ~(seed * 16 + s), 0.5f * high / sqrt3, 1.5f * high / sqrt3);
      high = sqrt3, low = -sqrt3;
    }
    backend_->fill_uniform(all, seed * 16 + s, low, high);
    std::fill(rows_loaded_[s].begin(), rows_loaded_[s].end(), slot.rows);
  }
  backend_->synchronize();
}

Tensor Engine::weight(Slot slot, int64_t layer) const {
  const SlotLayout& s = slots_[static_cast<int>(slot)];
  const bool per_expert = slot == Slot::kW13 || slot == Slot::kW2;
  const int64_t instance = per_expert ? layer * config_.num_experts : (s.count == 1 ? 0 : layer);
  char* arena = static_cast<char*>(weight_arena_);
  void* data = arena + s.offset + size_t(instance) * s.rows * s.cols * dtype_size(s.dtype);
  Tensor t = per_expert ? Tensor(data, s.dtype, backend_->device(), {config_.num_experts, s.rows, s.cols})
                        : Tensor(data, s.dtype, backend_->device(), {s.rows, s.cols});
  if (s.dtype == DType::kFloat8E4M3)
    t.row_scales = reinterpret_cast<const float*>(arena + s.scale_offset) + size_t(instance) * s.rows;
  return t;
}

Tensor Engine::norm_weight(Slot slot, int64_t layer) const {
  Tensor t = weight(slot, layer);
  return Tensor(t.data, t.dtype, t.device, {t.shape[1]});
}

KvLayer Engine::kv_layer(int64_t layer) const {
  const size_t pool = kv_bytes_ / (2 * config_.num_layers);
  KvLayer kv;
  kv.k = static_cast<char*>(kv_arena_) + (2 * layer) * pool;
  kv.v = static_cast<char*>(kv_arena_) + (2 * layer + 1) * pool;
  kv.dtype = options_.activation_dtype;
  kv.num_pages = kv_.num_pages();
  kv.page_size = kv_.page_size();
  return kv;
}

// ---- forward ------------------------------------------------------------------

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

void Engine::append(int sequence, const int32_t* tokens, int64_t n, bool all_logits, float* out) {
  MX_CHECK(out, ShapeError, "append: no output buffer");
  forward(sequence, tokens, n, all_logits, out);
}

int64_t Engine::grow(int sequence, const int32_t* tokens, int64_t n) {
  MX_CHECK(n >= 1, ShapeError, "append: no tokens given");
  for (int64_t i = 0; i < n; ++i)
    MX_CHECK(tokens[i] >= 0 && tokens[i] < config_.vocab_size, TokenError,
             "token id " << tokens[i] << " at index " << i << " is outside the vocabulary [0, "
                         << config_.vocab_size << ")");
  const int64_t start = kv_.length(sequence);
  MX_CHECK(start + n <= options_.max_context, ContextOverflowError,
           "context overflow: " << start << " cached + " << n << " new tokens exceed max_context "
                                << options_.max_context);
  kv_.resize(sequence, start + n);
  return start;
}

void Engine::forward(int sequence, const int32_t* tokens, int64_t n, bool all_logits, float* host_out) {
  stop_decodes_on(sequence);
  const int64_t start = grow(sequence, tokens, n);
  try {
    for (int64_t done = 0; done < n; done += options_.max_batch_tokens) {
      const int64_t count = std::min(options_.max_batch_tokens, n - done);
      const int64_t rows = all_logits ? count : (done + count == n ? 1 : 0);
      run_chunk(sequence, tokens + done, count, start + done, rows);
      if (host_out && rows > 0)
        backend_->copy_to_host(host_out + (all_logits ? done * config_.vocab_size : 0), work_.logits.data,
                               size_t(rows) * config_.vocab_size * sizeof(float));
    }
  } catch (...) {
    kv_.resize(sequence, start);
    throw;
  }
}

// ---- sampling -----------------------------------------------------------------

int Engine::create_sampler(const SamplingParams& params, uint64_t seed, const int32_t* prompt, int64_t n) {
  params.validate();
  const int64_t V = config_.vocab_size;
  std::vector<int32_t> state(2 * V + 2, 0);  // seen, counts, the draw counter, the last token
  for (int64_t i = 0; i < n; ++i) {
    MX_CHECK(prompt[i] >= 0 && prompt[i] < V, TokenError,
             "token id " << prompt[i] << " is outside the vocabulary [0, " << V << ")");
    state[prompt[i]] = 1;
  }
  SamplerState s{params, seed, nullptr, nullptr, {-1, -1}, {-1, -1}, false, -1, 0, 0};
  try {
    s.state = backend_->allocate(state.size() * sizeof(int32_t));
    backend_->copy_from_host(s.state, state.data(), state.size() * sizeof(int32_t));
    s.slots = static_cast<int32_t*>(backend_->allocate_host(2 * step_slot_words() * sizeof(int32_t)));
    for (int& event : s.events) event = backend_->create_event();
  } catch (...) {
    for (int event : s.events)
      if (event >= 0) backend_->release_event(event);
    if (s.slots) backend_->release_host(s.slots);
    if (s.state) backend_->release(s.state);
    throw;
  }
  samplers_[next_sampler_] = s;
  return next_sampler_++;
}

Engine::SamplerState& Engine::find_sampler(int sampler, const char* caller) {
  auto found = samplers_.find(sampler);
  MX_CHECK(found != samplers_.end(), Error, caller << ": no sampler " << sampler);
  return found->second;
}

void Engine::release_sampler(int sampler) {
  SamplerState& s = find_sampler(sampler, "release_sampler");
  try {
    stop_decode(s);
  } catch (...) {  // a device error: the sampler goes all the same
  }
  for (int slot = 0; slot < 2; ++slot) {
    backend_->release_graph(s.graphs[slot]);
    backend_->release_event(s.events[slot]);
  }
  backend_->release_host(s.slots);
  backend_->release(s.state);
  samplers_.erase(sampler);
}

void Engine::enqueue_sample(SamplerState& s, int32_t* out) {
  const int64_t V = config_.vocab_size, top_n = std::min<int64_t>(s.params.logprobs, V);
  Tensor logits(work_.logits.data, DType::kFloat32, work_.logits.device, {V});
  Tensor state(s.state, DType::kInt32, work_.logits.device, {2 * V + 1});
  Tensor token(static_cast<int32_t*>(s.state) + 2 * V + 1, DType::kInt32, work_.logits.device, {1});
  Tensor top_ids = work_.top_ids.rows(0, top_n), top_logprobs = work_.top_logprobs.rows(0, top_n);
  backend_->sample(logits, s.params, s.seed, state, token, work_.sampled_logprob, top_ids, top_logprobs);
  backend_->copy_to_host_async(out, token.data, sizeof(int32_t));
  backend_->copy_to_host_async(out + 1, work_.sampled_logprob.data, sizeof(float));
  backend_->copy_to_host_async(out + 2, work_.top_ids.data, kMaxLogprobs * sizeof(int32_t));
  backend_->copy_to_host_async(out + 2 + kMaxLogprobs, work_.top_logprobs.data, kMaxLogprobs * sizeof(float));
}

SampledToken Engine::read_sample(const SamplerState& s, const int32_t* out) const {
  const int64_t top_n = std::min<int64_t>(s.params.logprobs, config_.vocab_size);
  SampledToken result{out[0], 0.0f, std::vector<int32_t>(out + 2, out + 2 + top_n), std::vector<float>(top_n)};
  std::memcpy(&result.logprob, out + 1, sizeof(float));
  if (top_n > 0) std::memcpy(result.top_logprobs.data(), out + 2 + kMaxLogprobs, top_n * sizeof(float));
  return result;
}

SampledToken Engine::append_sample(int sequence, const int32_t* tokens, int64_t n, int sampler) {
  SamplerState& s = find_sampler(sampler, "append_sample");
  stop_decode(s);
  forward(sequence, tokens, n, false, nullptr);
  int32_t* out = step_output(s, s.next_slot);
  enqueue_sample(s, out);
  backend_->synchronize();
  s.sequence = sequence;
  return read_sample(s, out);
}

SampledToken Engine::decode_next(int sequence, int sampler, bool queue_ahead) {
  SamplerState& s = find_sampler(sampler, "decode_next");
  MX_CHECK(s.sequence == sequence, Error,
           "decode_next: sampler " << sampler << " drew its last token on sequence " << s.sequence << ", not "
                                   << sequence << " (append_sample draws the first)");
  if (s.queued == 0) queue_decode_step(sequence, s);
  if (queue_ahead && s.queued == 1 && backend_->asynchronous()) {
    try {
      queue_decode_step(sequence, s);
    } catch (const ContextOverflowError&) {  // no room for it: the step after the next will say so
    } catch (const KvCacheFullError&) {
    }
  }
  const int oldest = s.next_slot ^ (s.queued & 1);
  try {
    backend_->wait_event(s.events[oldest]);
  } catch (...) {
    stop_decode(s);
    throw;
  }
  --s.queued;
  return read_sample(s, step_output(s, oldest));
}

void Engine::queue_decode_step(int sequence, SamplerState& s) {
  const int64_t start = kv_.length(sequence);
  MX_CHECK(start + 1 <= options_.max_context, ContextOverflowError,
           "context overflow: " << start << " cached + 1 new token exceed max_context " << options_.max_context);
  kv_.resize(sequence, start + 1);
  const int slot = s.next_slot;
  try {
    // The slot was last used two steps ago, whose outputs the host has read.
    int32_t* inputs = step_slot(s, slot);
    const std::vector<int32_t>& pages = kv_.pages(sequence);
    const int64_t max_pages = work_.page_table.shape[0];
    inputs[0] = static_cast<int32_t>(start);
    std::copy(pages.begin(), pages.end(), inputs + 1);
    std::fill(inputs + 1 + pages.size(), inputs + 1 + max_pages, 0);
    auto enqueue_step = [&] {
      const int32_t* last_token = static_cast<int32_t*>(s.state) + 2 * config_.vocab_size + 1;
      backend_->copy_async(work_.ids.data, last_token, sizeof(int32_t));
      backend_->copy_from_host_async(work_.positions.data, inputs, sizeof(int32_t));
      backend_->copy_from_host_async(work_.page_table.data, inputs + 1, max_pages * sizeof(int32_t));
      enqueue_forward(1, 1);
      enqueue_sample(s, step_output(s, slot));
    };
    if (s.graphs[slot] >= 0) {
      backend_->run_graph(s.graphs[slot]);
    } else if (!s.stepped || !options_.graphs || !backend_->supports_graphs()) {
      enqueue_step();  // the first step runs directly, so buffers grow before any recording
    } else {
      backend_->begin_graph();
      try {
        enqueue_step();
        s.graphs[slot] = backend_->end_graph();
      } catch (...) {
        backend_->abort_graph();
        throw;
      }
      backend_->run_graph(s.graphs[slot]);
    }
    backend_->record_event(s.events[slot]);
  } catch (...) {
    kv_.resize(sequence, start);
    throw;
  }
  s.stepped = true;
  s.next_slot ^= 1;
  ++s.queued;
}

void Engine::stop_decode(SamplerState& s) {
  if (s.queued == 0) return;
  const int queued = s.queued;
  s.queued = 0;
  kv_.resize(s.sequence, kv_.length(s.sequence) - queued);
  backend_->synchronize();
}

void Engine::stop_decodes_on(int sequence) {
  for (auto& entry : samplers_)
    if (entry.second.queued > 0 && entry.second.sequence == sequence) stop_decode(entry.second);
}

void Engine::stage_inputs(int sequence, const int32_t* tokens, int64_t n, int64_t start) {
  backend_->synchronize();  // earlier copies out of step_in_ are done
  const int64_t T = options_.max_batch_tokens, max_pages = work_.page_table.shape[0];
  const std::vector<int32_t>& pages = kv_.pages(sequence);
  std::copy(tokens, tokens + n, step_in_);
  for (int64_t i = 0; i < n; ++i) step_in_[T + i] = static_cast<int32_t>(start + i);
  std::copy(pages.begin(), pages.end(), step_in_ + 2 * T);
  std::fill(step_in_ + 2 * T + pages.size(), step_in_ + 2 * T + max_pages, 0);
}

void Engine::enqueue_input_copies(int64_t n) {
  const int64_t T = options_.max_batch_tokens;
  backend_->copy_from_host_async(work_.ids.data, step_in_, n * sizeof(int32_t));
  backend_->copy_from_host_async(work_.positions.data, step_in_ + T, n * sizeof(int32_t));
  backend_->copy_from_host_async(work_.page_table.data, step_in_ + 2 * T, work_.page_table.shape[0] * sizeof(int32_t));
}

void Engine::run_chunk(int sequence, const int32_t* tokens, int64_t n, int64_t start, int64_t logit_rows) {
  stage_inputs(sequence, tokens, n, start);
  enqueue_input_copies(n);
  enqueue_forward(n, logit_rows);
}

int Engine::num_threads() const {
  if (backend_->device() != Device::kCpu) return 0;
  return thread_tuner_ ? thread_tuner_->best() : options_.num_threads;
}

void Engine::enqueue_forward(int64_t n, int64_t logit_rows) {
  if (!thread_tuner_) return enqueue_model(n, logit_rows);
  // The CPU's threads: decode steps run and time the tuner's choice, other chunks its best so far.
  backend_->set_threads(n == 1 ? thread_tuner_->threads() : thread_tuner_->best());
  const auto start = std::chrono::steady_clock::now();
  enqueue_model(n, logit_rows);
  if (n == 1) thread_tuner_->record(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  else thread_tuner_->other_work_ran();
}

void Engine::enqueue_model(int64_t n, int64_t logit_rows) {
  const ModelConfig& c = config_;
  Backend& b = *backend_;
  const AttentionShape shape{int(c.num_heads), int(c.num_kv_heads), int(c.head_dim)};
  const int k = int(c.experts_per_token);
  // The whole table, as a recorded decode step sees it: entries past the sequence's pages are
  // never read (positions bound every read), and the attention's work split stays the same.
  Tensor ids = work_.ids.rows(0, n), pos = work_.positions.rows(0, n), table = work_.page_table;
  Tensor x = work_.residual.rows(0, n), h = work_.normed.rows(0, n), qkv = work_.qkv.rows(0, n);
  Tensor attn = work_.attn.rows(0, n), delta = work_.delta.rows(0, n);
  const Routing& all_routing = work_.routing;
  Routing routing{all_routing.logits.rows(0, n),
                  all_routing.expert_ids.rows(0, n),
                  all_routing.weights.rows(0, n),
                  all_routing.expert_offsets,
                  all_routing.permuted_to_expanded.rows(0, n * k),
                  all_routing.expanded_to_permuted.rows(0, n * k),
                  all_routing.gathered.rows(0, n * k)};
  ExpertBuffers experts{work_.experts.gate_up.rows(0, n * k), work_.experts.act.rows(0, n * k),
                        work_.experts.out.rows(0, n * k)};

  b.embedding(weight(Slot::kEmbed, 0), ids, x);
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const KvLayer kv = kv_layer(layer);
    if (layer == 0)
      b.add_rmsnorm(x, nullptr, norm_weight(Slot::kAttnNorm, 0), c.rms_norm_eps, h);
    else  // the previous layer's experts into the residual stream
      b.moe_unpermute_add_rmsnorm(experts.out, routing.expanded_to_permuted, routing.weights, delta, x,
                                  norm_weight(Slot::kAttnNorm, layer), c.rms_norm_eps, h);
    b.matmul(h, weight(Slot::kWqkv, layer), qkv);
    b.rope_attention(qkv, shape, pos, c.rope_theta, kv, table, attn);
    b.matmul(attn, weight(Slot::kWo, layer), delta);
    b.add_rmsnorm_moe(x, delta, norm_weight(Slot::kFfnNorm, layer), c.rms_norm_eps, h, weight(Slot::kRouter, layer),
                      weight(Slot::kW13, layer), weight(Slot::kW2, layer), routing, experts);
  }
  if (logit_rows == 0) return;  // a prefill chunk whose logits nobody reads
  // Only the rows whose logits are wanted take the last layer's experts, the final norm and lm_head.
  const int64_t first = n - logit_rows;
  Tensor x_out = x.rows(first, logit_rows), delta_out = delta.rows(first, logit_rows);
  Tensor e2p_out = routing.expanded_to_permuted.rows(first * k, logit_rows * k);
  Tensor weights_out = routing.weights.rows(first, logit_rows);
  Tensor h_out = h.rows(first, logit_rows), logits = work_.logits.rows(0, logit_rows);
  b.moe_unpermute_add_rmsnorm(experts.out, e2p_out, weights_out, delta_out, x_out, norm_weight(Slot::kFinalNorm, 0),
                              c.rms_norm_eps, h_out);
  b.matmul(h_out, weight(Slot::kLmHead, 0), logits);
}

}  // namespace mixtral
