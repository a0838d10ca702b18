// Sampling on the device and the pipelined decode loop: a sampler per generation (its state on the
// device), append_sample for a prompt, and decode steps that read their input token from that
// state, are queued one ahead of the token the host reads, and are recorded once as graphs.
#include <algorithm>
#include <cstring>

#include "engine/engine.h"

namespace mixtral {

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

}  // namespace mixtral
