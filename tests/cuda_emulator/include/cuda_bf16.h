// The CUDA emulator's stand-in for cuda_bf16.h (see cuda_runtime.h here):
// __nv_bfloat16 as the top 16 bits of a float, rounded to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits = 0;
};

inline float __bfloat162float(__nv_bfloat16 value) {
  const uint32_t wide = uint32_t(value.bits) << 16;
  float result;
  std::memcpy(&result, &wide, sizeof(result));
  return result;
}

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t wide;
  std::memcpy(&wide, &value, sizeof(wide));
  __nv_bfloat16 result;
  if ((wide & 0x7fffffffu) > 0x7f800000u) {
    result.bits = uint16_t((wide >> 16) | 0x40);  // NaN stays a (quiet) NaN
  } else {
    result.bits = uint16_t((wide + 0x7fffu + ((wide >> 16) & 1u)) >> 16);
  }
  return result;
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 value) { return value.bits; }
