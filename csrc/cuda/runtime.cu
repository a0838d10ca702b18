// Runtime (cuda/runtime.cuh): the stream, cuBLAS handle and workspace, and the staged upload; kernel_limits and
// throw_launch_error (cuda/cuda_check.cuh); describe_devices; and the library's C entry points
// (core/cuda_library.h), the probe and the backend factory, so the core loads this library only when a caller
// asks for the GPU. No kernels here.
#include "cuda/runtime.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "core/cuda_library.h"
#include "cuda/cuda_backend.cuh"

namespace mixtral::cuda {

Runtime::Runtime(int device) : device_(device) {
  CUDA_CHECK(cudaSetDevice(device_));
  try {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&cublas_));
    CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
    CUBLAS_CHECK(cublasSetWorkspace(cublas_, workspace_, kWorkspaceBytes));
    CUDA_CHECK(cudaMallocHost(&staging_, kStagingBytes));
    for (cudaEvent_t& event : staging_free_) CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  } catch (...) {
    release();
    throw;
  }
}

Runtime::~Runtime() { release(); }

void Runtime::release() {
  for (cudaEvent_t event : staging_free_)
    if (event) cudaEventDestroy(event);
  if (staging_) cudaFreeHost(staging_);
  if (cublas_) cublasDestroy(cublas_);  // before its workspace
  if (workspace_) cudaFree(workspace_);
  if (stream_) cudaStreamDestroy(stream_);
}

void Runtime::upload(void* device_dst, const void* host_src, size_t bytes) {
  const size_t half = kStagingBytes / 2;
  for (size_t done = 0, chunk = 0; done < bytes; done += half, ++chunk) {
    const size_t n = std::min(half, bytes - done);
    char* buffer = staging_ + (chunk % 2) * half;
    CUDA_CHECK(cudaEventSynchronize(staging_free_[chunk % 2]));  // the copy out of this half is done
    std::memcpy(buffer, static_cast<const char*>(host_src) + done, n);
    CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(device_dst) + done, buffer, n, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaEventRecord(staging_free_[chunk % 2], stream_));
  }
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void Runtime::download(void* host_dst, const void* device_src, size_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

KernelLimits kernel_limits(const void* kernel) {
  cudaFuncAttributes attributes{};
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return {attributes.maxThreadsPerBlock, attributes.numRegs, attributes.sharedSizeBytes,
          size_t(attributes.maxDynamicSharedSizeBytes)};
}

void throw_launch_error(cudaError_t status, const void* kernel, dim3 block, size_t shared_bytes, const char* file,
                        int line) {
  if (status == cudaErrorLaunchOutOfResources || status == cudaErrorInvalidValue) {
    const KernelLimits limits = kernel_limits(kernel);
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    const bool too_many_threads = threads > uint64_t(limits.max_threads);
    if (too_many_threads || shared_bytes > limits.max_dynamic_shared) {
      cudaGetLastError();  // a refused configuration queues nothing: the device stays usable
      std::ostringstream message;
      if (too_many_threads)
        message << "a kernel launch of " << threads << " threads per block: its " << limits.registers
                << " registers per thread allow " << limits.max_threads;
      else
        message << "a kernel launch with " << shared_bytes << " bytes of dynamic shared memory: the kernel may take "
                << limits.max_dynamic_shared;
      throw ShapeError(message.str());
    }
  }
  throw_cuda_error(status, "cudaLaunchKernel(kernel, grid, block, pointers, shared_bytes, stream)", file, line);
}

std::string describe_devices() {
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  std::string summary = std::to_string(count) + " device(s)";
  if (count == 0) return summary;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  char line[512];
  std::snprintf(line, sizeof(line), "; device 0: %s, sm_%d%d, %d SMs, %.1f GiB", prop.name,
                prop.major, prop.minor, prop.multiProcessorCount,
                static_cast<double>(prop.totalGlobalMem) / (1u << 30));
  summary += line;
  Runtime runtime(0);  // proves the stream, the cuBLAS handle and the staging buffer can be made
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

extern "C" MX_EXPORT int mixtral_ext_cuda_backend_abi() { return mixtral::kBackendAbi; }

extern "C" MX_EXPORT mixtral::Backend* mixtral_ext_cuda_create_backend(int device) {
  return new mixtral::cuda::CudaBackend(device);  // throws DeviceError; the core catches it
}
