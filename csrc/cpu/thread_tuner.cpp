// The CPU backend's thread count by measurement (cpu/thread_tuner.h has the rules).
#include "cpu/thread_tuner.h"

#include <omp.h>

#include <algorithm>

#include "core/error.h"

namespace mixtral {

ThreadTuner::ThreadTuner(int max_threads) {
  MX_CHECK(max_threads >= 1, ShapeError, "thread tuner: need at least one thread, got " << max_threads);
  for (int t = max_threads;; t /= 2) {
    counts_.push_back(Count{t});
    if (t == 1) break;
  }
}

int ThreadTuner::available_threads() { return omp_get_max_threads(); }

double ThreadTuner::Count::median() const {
  const int n = std::min(timed, kWindow);
  std::array<double, kWindow> sorted = recent;
  std::nth_element(sorted.begin(), sorted.begin() + n / 2, sorted.begin() + n);
  return sorted[n / 2];
}

void ThreadTuner::Count::back_off(int at_least) { wait = std::min(std::max(2 * wait, at_least), kMaxWait); }

void ThreadTuner::run(size_t index) {
  running_ = index;
  steps_running_ = 0;
}

void ThreadTuner::record(double seconds) {
  ++step_;
  Count& count = counts_[running_];
  if (++steps_running_ == 1) return;  // the team resized
  const bool stall = count.threads > 1 && count.timed >= 4 && seconds > kStallFactor * count.median();
  count.recent[count.timed++ % kWindow] = seconds;

  if (running_ != settled_) {  // a try
    if (stall) {
      count.back_off();
      return run(settled_);
    }
    const bool slower = count.median() >= kSwitchBelow * counts_[settled_].median();
    const bool decided = steps_running_ >= kProbeSteps || (slower && steps_running_ > kEarlyVerdict);
    if (!decided) return;
    if (!slower) {
      settled_ = running_;
      last_stall_ = -kStallSpan - 1;
    } else {
      count.back_off();
    }
    return run(settled_);
  }

  if (stall) {
    if (step_ - last_stall_ <= kStallSpan && settled_ + 1 < counts_.size()) {
      count.back_off(kLeftWait);
      settled_ += 1;
      last_stall_ = -kStallSpan - 1;
      return run(settled_);
    }
    last_stall_ = step_;
  }
  const size_t fewer = settled_ + 1, more = settled_ - 1;
  const bool can_fewer = fewer < counts_.size() && steps_running_ >= counts_[fewer].wait;
  const bool can_more = settled_ > 0 && steps_running_ >= counts_[more].wait;
  if (can_fewer && (try_fewer_ || !can_more)) {
    try_fewer_ = false;
    run(fewer);
  } else if (can_more) {
    try_fewer_ = true;
    run(more);
  }
}

}  // namespace mixtral
