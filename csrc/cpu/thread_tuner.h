// How many threads the CPU backend's ops use when the user sets none (num_threads 0), chosen by
// timing decode steps among the available cores halved down to one (say 16, 8, 4, 2, 1).
// Why measure rather than take every core: each op splits its rows evenly over the threads and
// waits for the last, so when another process takes a core, a step now and then waits for a thread
// the OS has set aside (a stall: 2 threads beside one busy process on 2 cores stall for 100 ms in
// about 1 step of 25, and run at a quarter of one thread's speed). The best count changes as the
// other load comes and goes, and short timings cannot see rare stalls, so the tuner:
// - settles on a count (at first, the most threads) and runs it;
// - leaves it for the next count down when two of its steps within kStallSpan steps stall (each
//   over kStallFactor times its median);
// - tries a neighbour (alternately fewer and more threads) for kProbeSteps steps once `wait` steps
//   have passed since the last change, judged on the try's own steps: a step over kStallFactor times
//   the settled count's median ends it at once, a median at or above kSwitchBelow times the settled
//   count's after kEarlyVerdict timed steps ends it there, and a median below that at the end settles
//   on the neighbour. A count that failed a try waits twice as long before its next (kFirstWait up to
//   kMaxWait steps), and one left for its stalls at least kLeftWait (a try that stalls costs the
//   stall, some 50 steps' time).
// The first step after a change of count is not timed (the thread team resizes), nor, during a try,
// the first after other work (a prefill chunk, run with best() threads).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mixtral {

class ThreadTuner {
 public:
  explicit ThreadTuner(int max_threads);
  static int available_threads();  // OpenMP's default: OMP_NUM_THREADS, else the cores this process may use
  int threads() const { return counts_[running_].threads; }  // for the next decode step
  int best() const { return counts_[settled_].threads; }      // the count settled on (for prefill chunks)
  void record(double seconds);  // the decode step just run with threads() threads took this long
  void other_work_ran();        // work other than a decode step ran, with best() threads

  static constexpr int kWindow = 16, kProbeSteps = 16, kEarlyVerdict = 4, kStallSpan = 64;
  static constexpr int kFirstWait = 32, kLeftWait = 512, kMaxWait = 4096;
  static constexpr double kStallFactor = 4.0, kSwitchBelow = 0.8;

 private:
  struct Count {
    int threads;
    std::array<double, kWindow> recent{};  // seconds of its last timed steps, a ring
    int timed = 0;
    int wait = kFirstWait;
    double median() const;
    void back_off(int at_least = 0);  // wait twice as long before the next try, and at least this
  };
  void run(size_t index);
  std::vector<Count> counts_;  // most threads first
  size_t settled_ = 0, running_ = 0;
  int64_t step_ = 0;                 // steps recorded
  int64_t steps_running_ = 0;        // since running_ last changed
  int64_t last_stall_ = -kStallSpan - 1;  // step of the settled count's last stall
  bool try_fewer_ = true;            // which neighbour is tried first
  bool team_resized_ = true;         // the next step is not timed
};

}  // namespace mixtral
