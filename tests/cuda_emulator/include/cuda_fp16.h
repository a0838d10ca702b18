// The CUDA emulator's stand-in for cuda_fp16.h (see cuda_runtime.h here):
// __half as the compiler's _Float16, with CUDA's round-to-nearest conversions.
#pragma once

#include <cstring>

typedef _Float16 __half;

inline float __half2float(__half value) { return static_cast<float>(value); }
inline __half __float2half_rn(float value) { return static_cast<__half>(value); }
inline unsigned short __half_as_ushort(__half value) {
  unsigned short bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline __half __ushort_as_half(unsigned short bits) {
  __half value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
