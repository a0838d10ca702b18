// Host token sampling (see core/sampling.h for the steps and conventions).
#include "core/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace mixtral {

namespace {

// A sampling candidate: its penalized logit, id, and probability before normalization.
struct Candidate {
  float logit;
  int32_t id;
  double prob;
};

// The order of every cut: the larger logit first, ties to the lower id.
bool higher(const Candidate& a, const Candidate& b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); }

// Moves the shortest most-likely prefix whose mass reaches `target` to the front of `candidates`, and returns its
// length (all of them where rounding leaves their mass short of it). Quickselect carrying the mass above the
// range: expected linear time, where sorting the candidates cost milliseconds at Mixtral's vocabulary.
size_t most_likely_prefix(std::vector<Candidate>& candidates, double target) {
  constexpr size_t kSortBelow = 64;
  size_t lo = 0, hi = candidates.size();  // the prefix ends in (lo, hi]; everything before lo is in it
  double above = 0.0;                     // the mass before lo
  while (hi - lo > kSortBelow) {
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(candidates.begin() + lo, candidates.begin() + mid, candidates.begin() + hi, higher);
    double upper = 0.0;
    for (size_t j = lo; j < mid; ++j) upper += candidates[j].prob;
    if (above + upper >= target) {
      hi = mid;
    } else {
      above += upper;
      lo = mid;
    }
  }
  std::sort(candidates.begin() + lo, candidates.begin() + hi, higher);
  for (size_t j = lo; j < hi; ++j)
    if ((above += candidates[j].prob) >= target) return j + 1;
  return hi;
}

}  // namespace

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
  for (int64_t i = 0; i < V; ++i) raw_sum += std::exp(raw[i] - raw_max);
  const float log_norm = raw_max + static_cast<float>(std::log(raw_sum));

  std::vector<float> logits(V);
  for (int64_t i = 0; i < V; ++i) {
    const float logit = penalized_logit(raw[i], seen[i], counts[i], p);
    logits[i] = std::isnan(logit) ? -INFINITY : logit;  // never drawn, and the cuts' order stays strict
  }
  const int32_t top_id = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());

  int32_t chosen = top_id;  // greedy; and the draw's answer should rounding leave its target past the end
  if (p.temperature > 0.0f && logits[top_id] > -INFINITY) {
    // Candidates: all tokens, or the top_k by logit; "higher" is the order of every cut (ties to the lower id).
    std::vector<Candidate> candidates(V);
    for (int64_t i = 0; i < V; ++i) candidates[i] = {logits[i], static_cast<int32_t>(i), 0.0};
    if (p.top_k > 0 && p.top_k < V) {
      std::nth_element(candidates.begin(), candidates.begin() + p.top_k, candidates.end(), higher);
      candidates.resize(p.top_k);
    }
    // Unnormalized probabilities in float, as on the device; the most likely token's exactly 1 (and
    // the others 0, not NaN, at a temperature whose inverse overflows).
    const float top = logits[top_id];
    double total = 0.0;
    for (Candidate& c : candidates) total += (c.prob = std::exp((c.logit - top) / p.temperature));
    // min_p drops the tokens below min_p times the most likely; top_p keeps the shortest most-likely set
    // whose mass reaches top_p.
    if (p.min_p > 0.0f)
      candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                      [&](const Candidate& c) { return c.prob < p.min_p; }),
                       candidates.end());
    const size_t kept = p.top_p < 1.0f ? most_likely_prefix(candidates, p.top_p * total) : candidates.size();
    // The draw walks the kept tokens in id order, as the device sampler does, so both draw the same.
    std::vector<double> kept_prob(V, 0.0);
    double kept_mass = 0.0;
    int32_t last_kept = 0;
    for (size_t j = 0; j < kept; ++j) {
      kept_prob[candidates[j].id] = candidates[j].prob;
      kept_mass += candidates[j].prob;
      last_kept = std::max(last_kept, candidates[j].id);
    }
    const double target = uniform01(seed, step) * kept_mass;
    double cumulative = 0.0;
    for (int32_t id = 0; id <= last_kept; ++id) {
      if ((cumulative += kept_prob[id]) > target) {
        chosen = id;
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
    auto rank = [&](int32_t id) { return std::isnan(raw[id]) ? -INFINITY : raw[id]; };  // a strict order
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
      return rank(a) > rank(b) || (rank(a) == rank(b) && a < b);
    });
    for (int64_t j = 0; j < n; ++j) {
      result.top_tokens.push_back(ids[j]);
      result.top_logprobs.push_back(raw[ids[j]] - log_norm);
    }
  }
  return result;
}

}  // namespace mixtral
