// Host token sampling (see core/sampling.h for the steps and conventions).
#include "core/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace mixtral {

void SamplingParams::validate() const {
  MX_CHECK(std::isfinite(temperature) && temperature >= 0, ShapeError,
           "temperature must be a finite number >= 0, got " << temperature);
  MX_CHECK(top_k >= 0, ShapeError, "top_k must be >= 0 (0 disables it), got " << top_k);
  MX_CHECK(top_p > 0 && top_p <= 1, ShapeError, "top_p must be in (0, 1], got " << top_p);
  MX_CHECK(min_p >= 0 && min_p <= 1, ShapeError, "min_p must be in [0, 1], got " << min_p);
  MX_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0, ShapeError,
           "repetition_penalty must be a finite number > 0, got " << repetition_penalty);
  MX_CHECK(std::isfinite(presence_penalty) && std::fabs(presence_penalty) <= 2, ShapeError,
           "presence_penalty must be in [-2, 2], got " << presence_penalty);
  MX_CHECK(std::isfinite(frequency_penalty) && std::fabs(frequency_penalty) <= 2, ShapeError,
           "frequency_penalty must be in [-2, 2], got " << frequency_penalty);
  MX_CHECK(logprobs >= 0 && logprobs <= kMaxLogprobs, ShapeError, "logprobs must be in [0, " << kMaxLogprobs << "], got " << logprobs);
}

SampledToken sample_token(const float* raw, int64_t vocab_size, const SamplingParams& p, uint64_t seed,
                          uint64_t step, int32_t* seen, int32_t* counts) {
  const int64_t V = vocab_size;
  // Raw log-softmax for the reported logprobs.
  const float raw_max = *std::max_element(raw, raw + V);
  double raw_sum = 0.0;
  for (int64_t i = 0; i < V; ++i) raw_sum += std::exp(double(raw[i]) - raw_max);
  const float log_norm = raw_max + static_cast<float>(std::log(raw_sum));

  std::vector<float> logits(V);
  for (int64_t i = 0; i < V; ++i) logits[i] = penalized_logit(raw[i], seen[i], counts[i], p);

  int32_t chosen;
  if (p.temperature == 0.0f) {
    chosen = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  } else {
    // Candidates: all tokens, or the top_k by logit (ties to the lower id).
    auto higher = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    std::vector<int32_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    if (p.top_k > 0 && p.top_k < V) {
      std::nth_element(order.begin(), order.begin() + p.top_k, order.end(), higher);
      order.resize(p.top_k);
    }
    const double inv_temperature = 1.0 / p.temperature;
    const double top = *std::max_element(logits.begin(), logits.end()) * inv_temperature;
    std::vector<double> prob(V);
    double total = 0.0;
    for (int32_t id : order) total += (prob[id] = std::exp(logits[id] * inv_temperature - top));
    // top_p keeps the shortest most-likely prefix whose mass reaches top_p; min_p drops tokens
    // below min_p times the most likely. Both need the candidates in order, but only up to the
    // cut: sort a prefix, growing it until the cut falls inside.
    int64_t cut = static_cast<int64_t>(order.size());
    if (p.top_p < 1.0f || p.min_p > 0.0f) {
      for (int64_t sorted = std::min<int64_t>(cut, 128);; sorted = std::min<int64_t>(cut, sorted * 8)) {
        std::partial_sort(order.begin(), order.begin() + sorted, order.end(), higher);
        double mass = 0.0;
        int64_t found = -1;
        for (int64_t j = 0; j < sorted && found < 0; ++j) {
          if (prob[order[j]] < p.min_p * prob[order[0]]) found = j;
          else if ((mass += prob[order[j]] / total) >= p.top_p) found = j + 1;
        }
        if (found >= 0 || sorted == cut) {
          if (found >= 0) cut = std::max<int64_t>(found, 1);
          break;
        }
      }
    }
    // The draw walks the kept tokens in id order, as the device sampler does, so both draw the same.
    if (cut < V) std::sort(order.begin(), order.begin() + cut);
    double kept = 0.0;
    for (int64_t j = 0; j < cut; ++j) kept += prob[order[j]];
    const double target = uniform01(seed, step) * kept;
    double cumulative = 0.0;
    chosen = order[cut - 1];  // where rounding leaves the target past the last cumulative sum
    for (int64_t j = 0; j < cut; ++j) {
      if ((cumulative += prob[order[j]]) > target) {
        chosen = order[j];
        break;
      }
    }
  }
  ++counts[chosen];
  seen[chosen] = 1;

  SampledToken result{chosen, raw[chosen] - log_norm, {}, {}};
  if (p.logprobs > 0) {
    std::vector<int32_t> ids(V);
    std::iota(ids.begin(), ids.end(), 0);
    const int64_t n = std::min<int64_t>(p.logprobs, V);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(),
                      [&](int32_t a, int32_t b) { return raw[a] > raw[b] || (raw[a] == raw[b] && a < b); });
    for (int64_t j = 0; j < n; ++j) {
      result.top_tokens.push_back(ids[j]);
      result.top_logprobs.push_back(raw[ids[j]] - log_norm);
    }
  }
  return result;
}

}  // namespace mixtral
