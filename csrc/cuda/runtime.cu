// The CUDA runtime of the backend: device query, the stream and the cuBLAS
// handle with its workspace. Exposed through a C entry point
// (csrc/core/cuda_library.h) so the core loads this library only when a
// caller asks for the GPU; a machine without a driver never maps it.
#include <cstdio>
#include <cstring>
#include <string>

#include "core/cuda_library.h"
#include "cuda/cuda_check.cuh"

namespace mixtral::cuda {

// One device, one stream, one cuBLAS handle bound to that stream.
class Runtime {
 public:
  explicit Runtime(int device) : device_(device) {
    CUDA_CHECK(cudaSetDevice(device_));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&cublas_));
    CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
    CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace_, kWorkspaceBytes));
  }
  ~Runtime() {
    cudaFree(workspace_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }

 private:
  static constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS' recommendation for Hopper
  int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* workspace_ = nullptr;
};

// "<count> devices; device 0: <name>, sm_<cc>, <SMs> SMs, <GiB> GiB; cuBLAS <version>".
std::string describe_devices() {
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  std::string summary = std::to_string(count) + " device(s)";
  if (count == 0) return summary;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  char line[256];
  std::snprintf(line, sizeof(line), "; device 0: %s, sm_%d%d, %d SMs, %.1f GiB", prop.name,
                prop.major, prop.minor, prop.multiProcessorCount,
                static_cast<double>(prop.totalGlobalMem) / (1u << 30));
  summary += line;
  Runtime runtime(0);  // proves the stream and the cuBLAS handle can be made
  int version = 0;
  CUBLAS_CHECK(cublasGetVersion(runtime.cublas(), &version));
  summary += "; cuBLAS " + std::to_string(version);
  return summary;
}

}  // namespace mixtral::cuda

extern "C" MX_EXPORT int mixtral_ext_cuda_probe(char* message, int capacity) {
  int count = -1;
  std::string text;
  try {
    text = mixtral::cuda::describe_devices();
    CUDA_CHECK(cudaGetDeviceCount(&count));
  } catch (const std::exception& error) {
    text = error.what();
    count = -1;
  }
  std::snprintf(message, static_cast<size_t>(capacity), "%s", text.c_str());
  return count;
}
