// Token sampling on the host from float32 logits [V] (the CPU path; the CUDA
// backend will run the same steps on the device, with this as its twin).
// Steps, in order (OpenAI/vLLM conventions):
//   1. penalties: repetition_penalty over prompt and output tokens (divides a
//      positive logit, multiplies a negative one); presence_penalty and
//      frequency_penalty over output tokens (logit -= presence + frequency * count)
//   2. logprobs are reported from log_softmax of the raw model logits
//   3. temperature 0: argmax (ties to the lower id); else logits / temperature,
//      softmax, keep the top_k, then the smallest top-probability set reaching
//      top_p, then tokens with prob >= min_p * max prob; renormalise and draw
//      with a seeded generator. Only the part of the vocabulary up to the cut
//      is sorted, so a draw costs O(V) plus a short partial sort.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace mixtral {

struct SamplingParams {
  float temperature = 1.0f;        // 0: greedy
  int top_k = 0;                   // 0: off
  float top_p = 1.0f;              // (0, 1]
  float min_p = 0.0f;              // [0, 1]
  float repetition_penalty = 1.0f; // > 0, 1: off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int logprobs = 0;                // top-n logprobs to report, 0: only the chosen token's
  void validate() const;           // throws Error naming the first impossible setting
};

struct SampledToken {
  int32_t token;
  float logprob;                       // of the chosen token under the raw model distribution
  std::vector<int32_t> top_tokens;     // the `logprobs` most likely tokens, most likely first
  std::vector<float> top_logprobs;
};

class Sampler {
 public:
  Sampler(int64_t vocab_size, const SamplingParams& params, uint64_t seed);
  int64_t vocab_size() const { return vocab_size_; }
  void add_prompt(const int32_t* tokens, int64_t n);  // tokens seen by repetition_penalty
  // Draws the next token from logits [vocab_size] and records it as output.
  SampledToken sample(const float* logits);

 private:
  int64_t vocab_size_;
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> seen_;           // [V] in prompt or output
  std::vector<int32_t> output_counts_;  // [V]
};

}  // namespace mixtral
