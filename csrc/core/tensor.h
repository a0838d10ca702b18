// Tensor views of the C++ core: a pointer, a dtype, a shape of up to 4 dims,
// element strides and the device that owns the memory. A view never owns its
// memory (buffers belong to the engine's arenas). Expert weights may be quantized:
// a float8_e4m3 tensor (core/fp8.h) also points at its float32 scales, one per row,
// and an int4 one (core/int4.h; two codes a byte) at its group scales, zeros and
// column order.
// Also the host-side scalar conversions between float32, bfloat16 and float16
// (round to nearest even).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "core/fp8.h"
#include "core/int4.h"

namespace mixtral {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt32 = 3, kFloat8E4M3 = 4, kInt4 = 5 };
enum class Device : int32_t { kCpu = 0, kCuda = 1 };

// Bytes of one element; int4 has none of its own (two codes share a byte: bytes_of).
inline size_t dtype_size(DType dtype) {
  MX_CHECK(dtype != DType::kInt4, ShapeError, "int4 elements have no byte size of their own");
  if (dtype == DType::kFloat8E4M3) return 1;
  return (dtype == DType::kFloat32 || dtype == DType::kInt32) ? 4 : 2;
}

// Bytes of n elements (int4: n even, two a byte).
inline size_t bytes_of(DType dtype, int64_t n) {
  return dtype == DType::kInt4 ? static_cast<size_t>(n) / 2 : static_cast<size_t>(n) * dtype_size(dtype);
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kInt32: return "int32";
    case DType::kFloat8E4M3: return "float8_e4m3";
    case DType::kInt4: return "int4";
  }
  return "unknown";
}

// The dtypes of activations, and of weights other than quantized ones.
inline bool is_float(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

constexpr int kMaxDims = 4;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device = Device::kCpu;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements
  const float* row_scales = nullptr;         // float8_e4m3 only: [numel / shape[ndim - 1]] on the device
  Int4Groups int4;                           // int4 only: its groups and column order, on the device

  Tensor() = default;
  Tensor(void* data_, DType dtype_, Device device_, std::initializer_list<int64_t> dims)
      : data(data_), dtype(dtype_), device(device_) {
    MX_CHECK(dims.size() <= kMaxDims, ShapeError, "a tensor has at most " << kMaxDims << " dims");
    ndim = static_cast<int>(dims.size());
    int i = 0;
    for (int64_t d : dims) shape[i++] = d;
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= shape[d];
    }
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  size_t nbytes() const { return bytes_of(dtype, numel()); }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  bool contiguous() const {
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != stride) return false;
      stride *= shape[d];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  // Rows [begin, begin + count) of dim 0, still a view of the same memory.
  Tensor rows(int64_t begin, int64_t count) const {
    Tensor t = *this;
    t.data = static_cast<char*>(data) + bytes_of(dtype, begin * strides[0]);
    t.shape[0] = count;
    return t;
  }
  std::string describe() const {
    std::string s = std::string(dtype_name(dtype)) + "[";
    for (int d = 0; d < ndim; ++d) s += (d ? "," : "") + std::to_string(shape[d]);
    return s + "]";
  }
};

// Throws ShapeError unless t has the given dtype and shape (-1 matches any size).
inline void expect(const Tensor& t, const char* name, DType dtype,
                   std::initializer_list<int64_t> dims) {
  bool ok = t.dtype == dtype && t.ndim == static_cast<int>(dims.size()) && t.contiguous();
  int d = 0;
  for (int64_t want : dims) {
    if (ok && want >= 0 && t.shape[d] != want) ok = false;
    ++d;
  }
  if (!ok) {
    std::string want = std::string(dtype_name(dtype)) + "[";
    d = 0;
    for (int64_t w : dims) want += (d++ ? "," : "") + (w < 0 ? std::string("*") : std::to_string(w));
    throw ShapeError(std::string(name) + ": expected contiguous " + want + "], got " + t.describe());
  }
}

// Same as expect() but any float dtype is accepted.
inline void expect_float(const Tensor& t, const char* name, std::initializer_list<int64_t> dims) {
  expect(t, name, is_float(t.dtype) ? t.dtype : DType::kFloat32, dims);
}

// ---- host scalar conversions ------------------------------------------------

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // mantissa * 2^-24
    return sign ? -value : value;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00;        // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00;       // rounds to inf
  if (abs < 0x38800000u) {                            // subnormal or zero in fp16
    if (abs < 0x33000000u) return sign;               // below half the smallest subnormal
    uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    int shift = 126 - static_cast<int>(abs >> 23);    // 14 .. 24
    uint32_t rounded = mantissa >> shift;
    uint32_t rest = mantissa & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (rounded & 1u))) ++rounded;
    return sign | static_cast<uint16_t>(rounded);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float load_scalar(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kInt32: return static_cast<float>(static_cast<const int32_t*>(base)[i]);
    case DType::kFloat8E4M3: return fp8_to_float(static_cast<const uint8_t*>(base)[i]);
    case DType::kInt4: break;
  }
  throw ShapeError(std::string("no scalar access to ") + dtype_name(dtype) + " (core/int4.h unpacks codes)");
}

inline void store_scalar(void* base, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[i] = value; break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(value); break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16(value); break;
    case DType::kInt32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(value); break;
    case DType::kFloat8E4M3: static_cast<uint8_t*>(base)[i] = float_to_fp8(value); break;
    case DType::kInt4: throw ShapeError("no scalar access to int4 (core/int4.h packs codes)");
  }
}

// Converts n float elements between float dtypes on the host.
void convert_host(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

}  // namespace mixtral
