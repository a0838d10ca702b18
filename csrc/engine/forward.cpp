// The forward pass: the model over the operations of core/backend.h (enqueue_model, first), sharded
// over the ranks of a communicator when there is one, the CPU thread tuner's timing around it
// (enqueue_forward), and a prompt run in chunks of at most max_batch_tokens tokens with their inputs
// staged in pinned memory (forward, run_chunk).
#include <algorithm>
#include <chrono>
#include <utility>

#include "engine/engine.h"

namespace mixtral {

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
                        work_.experts.out.rows(0, n * k), work_.experts.ordered_inputs, options_.first_expert};

  // The model, unfused, for the residual stream x of n tokens:
  //   for each layer:  x = x + attention(rmsnorm(x));  x = x + moe(rmsnorm(x))
  //   logits = lm_head(rmsnorm(x))
  // where moe(h) = sum over the token's top-k experts e of weight_e * w2_e(silu(w1_e h) * w3_e h).
  // The calls below fuse it so: rope_attention appends k and v to the cache and attends in one
  // operation; add_rmsnorm_moe adds attention's output into x, norms it and runs the experts up
  // to their rows of output (routing, permutation, expert GEMMs), unweighted; and the combine of
  // layer i's experts (weighted sum, unpermute, add into x) is done by moe_unpermute_add_rmsnorm
  // together with the next norm: layer i+1's attention norm, or the final norm.
  //
  // Sharded (tensor parallel over the communicator's ranks): each rank holds its heads of wqkv,
  // wo's columns for them, and its slice of every expert's F (w1's and w3's rows, w2's columns), or
  // expert parallel, whole experts of its own (options.first_expert on: every rank routes over all
  // of them, and its moe leaves the rows of the experts it does not hold zero), and everything else
  // whole. Attention's output projection and the experts' combine then give each rank a partial
  // sum of delta, which the ranks sum (all_reduce_sum) before it is added to x: the combine and the
  // next norm run apart around the sum. x, and so the logits, are the same bytes on every rank,
  // and each rank samples the same token.
  const bool sharded = communicator_ != nullptr;  // a world of one too: what the sums cost, measured
  auto combine_experts = [&](const Tensor& e2p, const Tensor& weights, Tensor& delta_rows, Tensor& x_rows,
                             const Tensor& norm, Tensor& h_rows) {
    if (!sharded)
      return b.moe_unpermute_add_rmsnorm(experts.out, e2p, weights, delta_rows, x_rows, norm, c.rms_norm_eps, h_rows);
    b.moe_unpermute(experts.out, e2p, weights, delta_rows);
    communicator_->all_reduce_sum(delta_rows);
    b.add_rmsnorm(x_rows, &delta_rows, norm, c.rms_norm_eps, h_rows);
  };
  b.embedding(weight(Slot::kEmbed, 0), ids, x);
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const KvLayer kv = kv_layer(layer);
    if (layer == 0)
      b.add_rmsnorm(x, nullptr, norm_weight(Slot::kAttnNorm, 0), c.rms_norm_eps, h);
    else  // x += the previous layer's experts, combined
      combine_experts(routing.expanded_to_permuted, routing.weights, delta, x, norm_weight(Slot::kAttnNorm, layer), h);
    b.matmul(h, weight(Slot::kWqkv, layer), qkv);
    b.rope_attention(qkv, shape, pos, c.rope_theta, kv, table, attn);
    b.matmul(attn, weight(Slot::kWo, layer), delta);
    if (sharded) communicator_->all_reduce_sum(delta);
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
  combine_experts(e2p_out, weights_out, delta_out, x_out, norm_weight(Slot::kFinalNorm, 0), h_out);
  b.matmul(h_out, weight(Slot::kLmHead, 0), logits);
}

void Engine::set_communicator(std::shared_ptr<Communicator> communicator) {
  MX_CHECK(!communicator || (communicator->world_size() >= 1 && communicator->rank() >= 0 &&
                             communicator->rank() < communicator->world_size()),
           Error, "set_communicator: rank " << communicator->rank() << " outside a world of "
                                            << communicator->world_size());
  communicator_ = std::move(communicator);
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

}  // namespace mixtral
