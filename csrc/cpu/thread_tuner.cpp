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
  if (index != settled_) counts_[index].timed = 0;  // a try is judged on its own steps
  running_ = index;
  steps_running_ = 0;
  team_resized_ = true;
}

void ThreadTuner::other_work_ran() {
  if (running_ != settled_) team_resized_ = true;  // it ran with best() threads, the next step resizes back
}

void ThreadTuner::record(double seconds) {
  ++step_;
  ++steps_running_;
  if (team_resized_) {
    team_resized_ = false;
    return;
  }
  Count& count = counts_[running_];
  const double settled_median = counts_[settled_].median();

  if (running_ != settled_) {  // a try
    count.recent[count.timed++ % kWindow] = seconds;
    if (seconds > kStallFactor * settled_median) {  // a stall, or far slower: over at once
      count.back_off();
      return run(settled_);
    }
    const bool slower = count.median() >= kSwitchBelow * settled_median;
    const bool decided = steps_running_ >= kProbeSteps || (slower && count.timed >= kEarlyVerdict);
    if (!decided) return;
    if (slower) {
      count.back_off();
    } else {
      settled_ = running_;
      last_stall_ = -kStallSpan - 1;
    }
    return run(settled_);
  }

  const bool stall = count.threads > 1 && count.timed >= kEarlyVerdict && seconds > kStallFactor * settled_median;
  count.recent[count.timed++ % kWindow] = seconds;
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
