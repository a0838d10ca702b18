// The host dtype conversion declared in core/tensor.h.
#include "core/tensor.h"

namespace mixtral {

void convert_host(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  MX_CHECK(is_float(src_dtype) && is_float(dst_dtype), ShapeError,
           "convert: float dtypes only, got " << dtype_name(src_dtype) << " -> "
                                              << dtype_name(dst_dtype));
  if (n == 0) return;  // an empty array's buffer may be null
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(src_dtype));
    return;
  }
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) store_scalar(dst, dst_dtype, i, load_scalar(src, src_dtype, i));
}

}  // namespace mixtral
