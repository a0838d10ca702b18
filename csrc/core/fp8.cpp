// The FP8 row quantization declared in core/fp8.h, on the host.
#include "core/fp8.h"

#include <algorithm>
#include <cmath>

namespace mixtral {

void quantize_rows_fp8(const float* src, int64_t rows, int64_t cols, uint8_t* values, float* scales) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * cols;
    float max_abs = 0.0f;
    for (int64_t c = 0; c < cols; ++c) max_abs = std::max(max_abs, std::fabs(row[c]));
    const float scale = max_abs > 0.0f ? max_abs / kFp8Max : 1.0f;
    scales[r] = scale;
    for (int64_t c = 0; c < cols; ++c) values[r * cols + c] = float_to_fp8(row[c] / scale);
  }
}

void dequantize_rows_fp8(const uint8_t* values, const float* scales, int64_t rows, int64_t cols, float* out) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = fp8_to_float(values[r * cols + c]) * scales[r];
}

}  // namespace mixtral
