// What the two binding files (module.cpp, ops_binding.cpp) share: dtype names
// and the backend factory ("cpu", or "cuda" from the CUDA backend library at
// cuda_library).
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "core/backend.h"

namespace mixtral {

DType parse_dtype(const std::string& name);  // "float32", "bfloat16" or "float16"
DType parse_weight_dtype(const std::string& name, DType fallback);  // parse_dtype's, "float8_e4m3", "": fallback
std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& cuda_library);
void bind_ops(pybind11::module_& m);  // mixtral_ext._C.Ops

}  // namespace mixtral
