// FP8 expert weights: the OCP E4M3 ("E4M3FN") byte format and its per-row scaling, the same on
// the host and on the device. A byte is sign, 4 exponent bits (bias 7) and 3 mantissa bits:
// normals (1 + m/8) 2^(e-7) up to 448, subnormals m 2^-9, no infinities, and S.1111.111 is NaN
// (never stored by the quantizer). A quantized weight [rows, cols] keeps one float32 scale per
// row: w[r, c] ~ e4m3(q[r, c]) * scale[r], scale = max |w[r, :]| / 448 (1 for an all-zero row).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/random.h"  // MX_HOST_DEVICE

namespace mixtral {

constexpr float kFp8Max = 448.0f;

// The bits of a float32 and back, on the host and the device (also used by core/tensor.h).
template <typename To, typename From>
MX_HOST_DEVICE inline To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To result;
  memcpy(&result, &value, sizeof(To));
  return result;
}
MX_HOST_DEVICE inline uint32_t float_bits(float f) { return bit_cast<uint32_t>(f); }
MX_HOST_DEVICE inline float bits_float(uint32_t u) { return bit_cast<float>(u); }

// Rounds to the nearest E4M3 value (ties to even); finite values beyond 448 saturate to +-448.
MX_HOST_DEVICE inline uint8_t float_to_fp8(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7f;  // NaN
  const float a = bits_float(magnitude);
  if (a < 0.015625f)  // below 2^-6: a subnormal step of 2^-9 (the rounding may reach 2^-6, byte 8)
    return sign | static_cast<uint8_t>(rintf(a * 512.0f));
  uint32_t r = magnitude - (120u << 23);   // exponent bias 127 -> 7
  r += 0x7ffffu + ((r >> 20) & 1u);        // round the 23-bit mantissa to 3 bits, ties to even
  r >>= 20;
  return sign | static_cast<uint8_t>(r > 0x7eu ? 0x7eu : r);
}

MX_HOST_DEVICE inline float fp8_to_float(uint8_t b) {
  const uint32_t exponent = (b >> 3) & 0xfu, mantissa = b & 0x7u;
  float magnitude;
  if (exponent == 0xfu && mantissa == 0x7u) magnitude = NAN;
  else if (exponent == 0) magnitude = static_cast<float>(mantissa) * (1.0f / 512.0f);
  else magnitude = bits_float(((exponent + 120u) << 23) | (mantissa << 20));
  return (b & 0x80u) ? -magnitude : magnitude;
}

// Quantizes rows x cols float32 values row by row into E4M3 bytes and one scale per row (above).
void quantize_rows_fp8(const float* src, int64_t rows, int64_t cols, uint8_t* values, float* scales);
// The reverse: out[r, c] = e4m3(values[r, c]) * scales[r] in float32.
void dequantize_rows_fp8(const uint8_t* values, const float* scales, int64_t rows, int64_t cols, float* out);

}  // namespace mixtral
