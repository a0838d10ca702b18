// Token sampling, shared by every backend: the settings, the counter-based
// uniform draw, and the host implementation (the CPU backend's op and the
// twin of the CUDA kernel). Steps, in order (OpenAI/vLLM conventions):
//   1. penalties: repetition_penalty over prompt and output tokens (divides a
//      positive logit, multiplies a negative one); presence_penalty and
//      frequency_penalty over output tokens (logit -= presence + frequency * count)
//   2. logprobs are reported from log_softmax of the raw model logits
//   3. temperature 0: argmax (ties to the lower id); else logits / temperature,
//      softmax, keep the top_k, then the smallest most-likely set whose mass
//      reaches top_p, then the tokens with prob >= min_p * max prob; the draw
//      u = uniform01(seed, step) picks the token where the cumulative kept mass
//      passes u * (kept mass), walking the kept tokens in id order on every
//      backend, so a seed draws the same tokens on the CPU and the GPU (up to
//      float rounding at the edge between two tokens).
// State arrays, one per generation: seen [V] int32 (1 for tokens in the prompt
// or the output), counts [V] int32 (times each token was output).
#pragma once

#include <cstdint>
#include <vector>

#include "core/random.h"

namespace mixtral {

constexpr int kMaxLogprobs = 20;

struct SamplingParams {
  float temperature = 1.0f;        // 0: greedy
  int top_k = 0;                   // 0: off
  float top_p = 1.0f;              // (0, 1]
  float min_p = 0.0f;              // [0, 1]
  float repetition_penalty = 1.0f; // > 0, 1: off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int logprobs = 0;                // top-n logprobs to report (<= kMaxLogprobs), 0: only the chosen token's
  void validate() const;           // throws Error naming the first impossible setting
};

struct SampledToken {
  int32_t token;
  float logprob;                       // of the chosen token under the raw model distribution
  std::vector<int32_t> top_tokens;     // the `logprobs` most likely tokens, most likely first
  std::vector<float> top_logprobs;
};

// The logit after the penalties of step 1.
MX_HOST_DEVICE inline float penalized_logit(float logit, int32_t seen, int32_t count, const SamplingParams& p) {
  if (p.repetition_penalty != 1.0f && seen) logit = logit > 0 ? logit / p.repetition_penalty : logit * p.repetition_penalty;
  if (count > 0) logit -= p.presence_penalty + p.frequency_penalty * static_cast<float>(count);
  return logit;
}

// Samples from raw logits [V] on the host and records the token in seen and counts.
SampledToken sample_token(const float* raw, int64_t vocab_size, const SamplingParams& params, uint64_t seed,
                          uint64_t step, int32_t* seen, int32_t* counts);

}  // namespace mixtral
