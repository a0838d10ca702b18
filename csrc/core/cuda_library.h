// The boundary between the core and the CUDA backend library
// (libmixtral_ext_cuda.so), which is opened with dlopen only when a caller
// asks for the GPU, so the package imports on machines without CUDA.
#pragma once

#include <memory>
#include <string>

#include "core/backend.h"

extern "C" {
// Writes a one-line description of the devices (or of the failure) into
// message; returns the number of CUDA devices, or -1 when none can be used.
int mixtral_ext_cuda_probe(char* message, int capacity);
// A new CUDA backend on `device` (owned by the caller); throws DeviceError.
mixtral::Backend* mixtral_ext_cuda_create_backend(int device);
}

namespace mixtral {

struct CudaProbe {
  int device_count;     // -1 when the library, driver or runtime is unusable
  std::string summary;  // what was found, or why nothing was
};

// Opens the CUDA backend library at `path` and asks it about the devices.
CudaProbe probe_cuda_library(const std::string& path);

// Opens the CUDA backend library at `path` and makes a backend on `device`.
std::unique_ptr<Backend> create_cuda_backend(const std::string& path, int device);

}  // namespace mixtral
