// The int4 group quantization declared in core/int4.h, on the host.
#include "core/int4.h"

#include <algorithm>
#include <cmath>

#include "core/tensor.h"

namespace mixtral {

void permute_int4_columns(const uint8_t* packed, int64_t rows, int64_t cols, const int32_t* column_order,
                          uint8_t* out) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = packed + r * (cols / 2);
    for (int64_t j = 0; j < cols; j += 2)
      out[r * (cols / 2) + j / 2] =
          static_cast<uint8_t>(int4_code(row, column_order[j]) | (int4_code(row, column_order[j + 1]) << 4));
  }
}

void quantize_rows_int4(const float* src, int64_t rows, int64_t cols, int64_t group_size, uint8_t* codes,
                        uint16_t* scales, uint8_t* zeros) {
  const int64_t groups = int4_groups(cols, group_size);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * cols;
    uint8_t* packed = codes + r * (cols / 2);
    std::fill(packed, packed + cols / 2, uint8_t(0));
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * group_size, end = std::min(cols, begin + group_size);
      float low = 0.0f, high = 0.0f;
      for (int64_t c = begin; c < end; ++c) low = std::min(low, row[c]), high = std::max(high, row[c]);
      uint16_t scale_bits = float_to_fp16((high - low) / 15.0f);
      float scale = fp16_to_float(scale_bits);
      // An all-zero group, or a range whose scale float16 cannot hold (below 2^-24, or past 65504):
      // scale 1, then codes clamp.
      if (!(scale > 0.0f) || !std::isfinite(scale)) scale_bits = float_to_fp16(1.0f), scale = 1.0f;
      const float zero = std::min(15.0f, std::max(0.0f, std::nearbyint(-low / scale)));
      scales[r * groups + g] = scale_bits;
      zeros[r * groups + g] = static_cast<uint8_t>(zero);
      for (int64_t c = begin; c < end; ++c) {
        const int code = static_cast<int>(std::min(15.0f, std::max(0.0f, std::nearbyint(row[c] / scale) + zero)));
        packed[c / 2] |= static_cast<uint8_t>(code << (4 * (c % 2)));
      }
    }
  }
}

void dequantize_rows_int4(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t rows,
                          int64_t cols, int64_t group_size, float* out) {
  const int64_t groups = int4_groups(cols, group_size);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = r * groups + c / group_size;
      out[r * cols + c] = float(int4_code(codes + r * (cols / 2), c) - zeros[g]) * fp16_to_float(scales[g]);
    }
}

}  // namespace mixtral
