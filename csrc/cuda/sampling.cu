// Token sampling on the device: sample of core/backend.h, by the steps of core/sampling.h (its host function
// sample_token is the twin); launch_sample of cuda/kernels.cuh. logits [V] float32; state [2V + 1] int32: seen [V],
// counts [V], the draw counter; token [1], logprob [1], top_ids and top_logprobs [min(logprobs, V)].
//
// sample_kernel:
//   grid:   one block.
//   block:  kThreads (1024) threads; thread i owns the ids [i * chunk, (i + 1) * chunk), chunk = ceil(V / 1024).
//   shared: static range_mass float[1024], chosen_shared, kept_mass, and block_reduce's float[32] and Best[32]:
//           about 4.4 KiB; no dynamic.
//   phases: 1. The raw log-softmax normaliser (block max, block sum), for the logprobs.
//           2. The penalised logits (NaN as -inf) and their best, ties to the lower id; temperature 0 or all -inf:
//              that token (all -inf: token 0, as on the host).
//           3. Else top_k and top_p become thresholds, found by bisection over the order-preserving integer keys of
//              the floats (32 rounds each, exact up to ties); min_p raises the probability threshold.
//           4. The draw: thread 0 makes exclusive prefix sums of the threads' kept masses in id order; the thread
//              whose range holds uniform01(seed, step) * kept mass walks its kept ids in order (rounding past the
//              end: the most likely token).
//           5. The top-n raw logprobs, most likely first; thread 0 writes the token and its logprob, records it in
//              seen and counts and advances the counter: the logits never leave the GPU, a captured step needs no
//              host input.
//
// Limits: V below 2^30 (int indices up to 2V; launch_sample refuses more); params as SamplingParams::validate allows.
#include <cmath>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

constexpr int kThreads = 1024;

// Unsigned keys ordered as the floats are (negative floats below positive ones).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct Best {
  float value;
  int32_t index;
};

// The larger value, ties to the lower index (a functor, as block_reduce takes it).
struct Better {
  __device__ Best operator()(Best a, Best b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

__device__ __forceinline__ Best shuffle_xor(Best v, int lane_mask) {
  return Best{__shfl_xor_sync(0xffffffffu, v.value, lane_mask), __shfl_xor_sync(0xffffffffu, v.index, lane_mask)};
}

__device__ Best block_best(Best v) { return block_reduce(v, Best{-INFINITY, INT32_MAX}, Better{}); }

// The largest key t with measure(t) >= goal, for a measure that does not grow with t.
template <typename Measure>
__device__ uint32_t largest_key_reaching(float goal, Measure measure) {
  uint64_t low = 0, high = 0xFFFFFFFFull;
  while (low < high) {
    const uint64_t mid = low + (high - low + 1) / 2;
    if (measure(static_cast<uint32_t>(mid)) >= goal) low = mid;
    else high = mid - 1;
  }
  return static_cast<uint32_t>(low);
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float* raw, int vocab, SamplingParams p, uint64_t seed,
                                                          int32_t* state, int32_t* token_out, float* logprob_out,
                                                          int32_t* top_ids, float* top_logprobs) {
  int32_t* seen = state;
  int32_t* counts = state + vocab;
  const uint64_t step = static_cast<uint32_t>(state[2 * vocab]);
  __shared__ float range_mass[kThreads];
  __shared__ int32_t chosen_shared;
  __shared__ float kept_mass;
  const int tid = threadIdx.x;
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
  auto adjusted = [&](int i) {  // NaN as -inf: never drawn, as on the host
    const float logit = penalized_logit(raw[i], seen[i], counts[i], p);
    return logit != logit ? -INFINITY : logit;  // NaN
  };

  // Raw log-softmax normaliser, for the logprobs.
  Best raw_best{-INFINITY, INT32_MAX};
  for (int i = begin; i < end; ++i) raw_best = Better{}(raw_best, Best{raw[i], i});
  const float raw_max = block_best(raw_best).value;
  float raw_sum = 0.0f;
  for (int i = begin; i < end; ++i) raw_sum += expf(raw[i] - raw_max);
  const float log_norm = raw_max + logf(block_sum(raw_sum));

  Best adjusted_best{-INFINITY, INT32_MAX};  // all -inf: token 0, as on the host
  for (int i = begin; i < end; ++i) adjusted_best = Better{}(adjusted_best, Best{adjusted(i), i});
  const Best top = block_best(adjusted_best);
  if (p.temperature == 0.0f || top.value == -INFINITY) {
    if (tid == 0) chosen_shared = top.index;
  } else {
    uint32_t logit_key = 0;  // top_k: keep logits whose key is at least this
    if (p.top_k > 0 && p.top_k < vocab) {
      logit_key = largest_key_reaching(static_cast<float>(p.top_k), [&](uint32_t key) {
        float count = 0.0f;
        for (int i = begin; i < end; ++i) count += order_key(adjusted(i)) >= key ? 1.0f : 0.0f;
        return block_sum(count);
      });
    }
    auto prob = [&](int i, float logit) {  // relative to the most likely token (which has 1, at any temperature)
      return order_key(logit) >= logit_key ? expf((logit - top.value) / p.temperature) : 0.0f;
    };
    float mass = 0.0f;
    for (int i = begin; i < end; ++i) mass += prob(i, adjusted(i));
    const float total = block_sum(mass);
    uint32_t prob_key = 0;  // top_p and min_p: keep probabilities whose key is at least this
    if (p.top_p < 1.0f) {
      prob_key = largest_key_reaching(p.top_p * total, [&](uint32_t key) {
        float kept = 0.0f;
        for (int i = begin; i < end; ++i) {
          const float q = prob(i, adjusted(i));
          kept += order_key(q) >= key ? q : 0.0f;
        }
        return block_sum(kept);
      });
    }
    if (p.min_p > 0.0f) prob_key = max(prob_key, order_key(p.min_p));
    auto kept_prob = [&](int i) {
      const float q = prob(i, adjusted(i));
      return q > 0.0f && order_key(q) >= prob_key ? q : 0.0f;
    };
    float own = 0.0f;
    for (int i = begin; i < end; ++i) own += kept_prob(i);
    range_mass[tid] = own;
    __syncthreads();
    if (tid == 0) {  // exclusive prefix sums of the threads' ranges, in id order
      float running = 0.0f;
      for (int t = 0; t < kThreads; ++t) {
        const float m = range_mass[t];
        range_mass[t] = running;
        running += m;
      }
      kept_mass = running;
      chosen_shared = top.index;  // kept; the answer should rounding leave the target past the end
    }
    __syncthreads();
    const float target = static_cast<float>(uniform01(seed, step)) * kept_mass;  // in exactly one thread's range
    float cumulative = range_mass[tid];
    if (own > 0.0f && cumulative <= target && target < cumulative + own) {
      for (int i = begin; i < end; ++i) {
        const float q = kept_prob(i);
        if (q > 0.0f && (cumulative += q) > target) {
          chosen_shared = i;
          break;
        }
      }
    }
  }
  __syncthreads();
  const int32_t chosen = chosen_shared;

  // The n most likely tokens under the raw logits, most likely first.
  int32_t previous = -1;
  float previous_value = INFINITY;
  for (int j = 0; j < p.logprobs && j < vocab; ++j) {
    Best best{-INFINITY, INT32_MAX};
    for (int i = begin; i < end; ++i) {
      const bool after = raw[i] < previous_value || (raw[i] == previous_value && i > previous);
      if (after) best = Better{}(best, Best{raw[i], i});
    }
    best = block_best(best);
    if (tid == 0) top_ids[j] = best.index, top_logprobs[j] = best.value - log_norm;
    previous = best.index, previous_value = best.value;
  }
  __syncthreads();  // every thread is done reading seen and counts
  if (tid == 0) {
    *token_out = chosen;
    *logprob_out = raw[chosen] - log_norm;
    counts[chosen] += 1;
    seen[chosen] = 1;
    state[2 * vocab] += 1;  // the next draw
  }
}

}  // namespace

void launch_sample(const float* logits, int64_t vocab, const SamplingParams& params, uint64_t seed, int32_t* state,
                   int32_t* token, float* logprob, int32_t* top_ids, float* top_logprobs, cudaStream_t stream) {
  MX_CHECK(vocab < (int64_t(1) << 30), ShapeError, "sample: vocabulary " << vocab << " past 2^30 (int indices)");
  launch(sample_kernel, 1, kThreads, 0, stream, logits, static_cast<int>(vocab), params, seed, state, token, logprob,
         top_ids, top_logprobs);
}

}  // namespace mixtral::cuda
