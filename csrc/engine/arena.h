// The engine's arenas: tensors handed out at 256-byte aligned offsets of one allocation, planned
// first (offsets from 0) and placed once the allocation exists.
#pragma once

#include <initializer_list>

#include "core/tensor.h"

namespace mixtral {

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Hands out aligned tensors from one allocation, sized in a first pass.
class ArenaPlan {
 public:
  Tensor add(DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t(reinterpret_cast<void*>(bytes_), dtype, Device::kCpu, dims);
    bytes_ += align_up(t.nbytes());
    return t;
  }
  size_t bytes() const { return bytes_; }
  // Turns the planned offsets into pointers into `base` on `device`.
  static void place(Tensor& t, void* base, Device device) {
    t.data = static_cast<char*>(base) + reinterpret_cast<size_t>(t.data);
    t.device = device;
  }

 private:
  size_t bytes_ = 0;
};

}  // namespace mixtral
