// Opening the CUDA backend library at run time (see core/cuda_library.h).
#include "core/cuda_library.h"

#include <dlfcn.h>

namespace mixtral {

namespace {

// The library stays mapped once opened: later calls reuse it.
void* symbol(const std::string& path, const char* name) {
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!library) throw DeviceError(std::string("cannot load the CUDA backend: ") + dlerror());
  void* found = dlsym(library, name);
  if (!found) throw DeviceError(path + " has no " + name);
  return found;
}

// Throws DeviceError unless the library was built from this core's version of core/backend.h.
void check_abi(const std::string& path) {
  using AbiFn = int (*)();
  const int abi = reinterpret_cast<AbiFn>(symbol(path, "mixtral_ext_cuda_backend_abi"))();
  if (abi != kBackendAbi)
    throw DeviceError(path + " was built for backend interface " + std::to_string(abi) + ", this core has " +
                      std::to_string(kBackendAbi) + ": rebuild the two together");
}

}  // namespace

CudaProbe probe_cuda_library(const std::string& path) {
  using ProbeFn = int (*)(char*, int);
  ProbeFn probe;
  try {
    check_abi(path);
    probe = reinterpret_cast<ProbeFn>(symbol(path, "mixtral_ext_cuda_probe"));
  } catch (const DeviceError& e) {
    return {-1, e.what()};
  }
  char message[512] = {0};
  const int count = probe(message, sizeof(message));
  return {count, message};
}

std::unique_ptr<Backend> create_cuda_backend(const std::string& path, int device) {
  check_abi(path);
  using CreateFn = Backend* (*)(int);
  auto create = reinterpret_cast<CreateFn>(symbol(path, "mixtral_ext_cuda_create_backend"));
  return std::unique_ptr<Backend>(create(device));
}

}  // namespace mixtral
