// int4 expert weights: 4-bit codes with a float16 scale and an integer zero point per group of
// input columns, the same on the host and on the device. A weight w [rows, cols] (out x in) is
//   codes   [rows, cols / 2] bytes: column 2b in the low nibble of byte b, 2b + 1 in the high one
//   scales  [rows, groups] float16 bits, groups = ceil(cols / group_size) (the last may be short)
//   zeros   [rows, groups] uint8, in code units (0..16: GPTQ's zeros reach 16)
// and w[r, c] = (code[r, c] - zero[r, g]) * scale[r, g] with g = c / group_size.
// Act order (GPTQ desc_act, compressed-tensors' group order) assigns groups per input column in
// any order; the engine stores such a weight with its columns sorted by group, so that groups are
// contiguous again, and keeps that column order (input_order [cols] int32: stored column j is
// input column input_order[j]): the operations gather x to match once per expert (core/backend.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/random.h"  // MX_HOST_DEVICE

namespace mixtral {

// The group size of int4 quantization at load (expert_dtype "int4" on a float checkpoint).
constexpr int kInt4QuantizeGroupSize = 128;

// Where an int4 weight's groups and column order are (device pointers in a Tensor, core/tensor.h).
struct Int4Groups {
  const uint16_t* scales = nullptr;      // [E * N, groups] float16 bits
  const uint8_t* zeros = nullptr;        // [E * N, groups]
  const int32_t* input_order = nullptr;  // [E, segments, K], or null: every column in its own place
  int32_t group_size = 0;
  int32_t segments = 1;  // row segments with their own column order: rows [s N / S, (s + 1) N / S)
};

inline int64_t int4_groups(int64_t cols, int64_t group_size) { return (cols + group_size - 1) / group_size; }

MX_HOST_DEVICE inline int int4_code(const uint8_t* packed_row, int64_t col) {
  return (packed_row[col / 2] >> (4 * (col % 2))) & 0xF;
}

// Byte b of a random int4 fill (Backend::fill_uniform): codes 2b and 2b + 1, each
// floor(uniform_in(seed, code index, low, high)) clamped to 0..15.
MX_HOST_DEVICE inline uint8_t int4_uniform_byte(uint64_t seed, uint64_t b, float low, float high) {
  int codes[2];
  for (int i = 0; i < 2; ++i) {
    const int code = static_cast<int>(floorf(uniform_in(seed, 2 * b + i, low, high)));
    codes[i] = code < 0 ? 0 : (code > 15 ? 15 : code);
  }
  return static_cast<uint8_t>(codes[0] | (codes[1] << 4));
}

// Reorders the columns of rows x cols packed codes: column j of out is column column_order[j] of packed.
void permute_int4_columns(const uint8_t* packed, int64_t rows, int64_t cols, const int32_t* column_order,
                          uint8_t* out);

// Quantizes rows x cols float32 values (cols even) group by group: the range [min(w, 0), max(w, 0)]
// of each group in 15 steps, the scale rounded to float16 first and the zero to an integer, each
// code round(w / scale) + zero clamped to 0..15.
void quantize_rows_int4(const float* src, int64_t rows, int64_t cols, int64_t group_size, uint8_t* codes,
                        uint16_t* scales, uint8_t* zeros);
// The reverse: out[r, c] = (code - zero) * scale in float32.
void dequantize_rows_int4(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t rows,
                          int64_t cols, int64_t group_size, float* out);

}  // namespace mixtral
