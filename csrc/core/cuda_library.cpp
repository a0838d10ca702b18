// Opening the CUDA backend library at run time (see core/cuda_library.h).
#include "core/cuda_library.h"

#include <dlfcn.h>

namespace mixtral {

CudaProbe probe_cuda_library(const std::string& path) {
  void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!library) return {-1, std::string("cannot load the CUDA backend: ") + dlerror()};
  using ProbeFn = int (*)(char*, int);
  auto probe = reinterpret_cast<ProbeFn>(dlsym(library, "mixtral_ext_cuda_probe"));
  if (!probe) return {-1, "the CUDA backend library has no mixtral_ext_cuda_probe"};
  char message[512] = {0};
  const int count = probe(message, sizeof(message));
  return {count, message};  // the library stays mapped: later calls reuse it
}

}  // namespace mixtral
