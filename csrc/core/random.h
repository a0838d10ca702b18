// Counter-based random numbers, the same on the host and on the device: a
// value depends only on (seed, counter), so a kernel draws in any order and
// the CPU and CUDA backends agree draw for draw.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MX_HOST_DEVICE __host__ __device__
#else
#define MX_HOST_DEVICE
#endif

namespace mixtral {

// A uniform double in [0, 1) from (seed, counter): splitmix64 of the pair, 53 bits.
MX_HOST_DEVICE inline double uniform01(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (counter + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

// Element i of a random fill: uniform in [low, high), computed in double and rounded once to float.
// A device compiler may fuse the multiply-add, which changes the double's last bit and so the float
// in about one value of 2^29: the host and the device fill the same bytes (quantized dtypes too,
// whose rounding would turn a float's last-bit difference into a whole step).
MX_HOST_DEVICE inline float uniform_in(uint64_t seed, uint64_t i, float low, float high) {
  return static_cast<float>(low + (static_cast<double>(high) - low) * uniform01(seed, i));
}

}  // namespace mixtral
