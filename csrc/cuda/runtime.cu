// The CUDA runtime (see cuda/runtime.cuh) and the library's C entry points
// (csrc/core/cuda_library.h): the probe, and the factory of the CUDA backend,
// so the core loads this library only when a caller asks for the GPU.
#include "cuda/runtime.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <unordered_map>

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

namespace {

// By kernel alone: the backend runs on one device per process (device 0, as the Python API allows).
std::mutex kernel_limits_mutex;
std::unordered_map<const void*, KernelLimits> known_kernel_limits;

}  // namespace

KernelLimits kernel_limits(const void* kernel) {
  std::lock_guard<std::mutex> lock(kernel_limits_mutex);
  if (auto found = known_kernel_limits.find(kernel); found != known_kernel_limits.end()) return found->second;
  cudaFuncAttributes attributes{};
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const KernelLimits limits{attributes.maxThreadsPerBlock, attributes.numRegs, attributes.sharedSizeBytes,
                            size_t(attributes.maxDynamicSharedSizeBytes)};
  return known_kernel_limits[kernel] = limits;
}

void set_max_dynamic_shared(const void* kernel, int bytes) {
  KernelLimits limits = kernel_limits(kernel);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  limits.max_dynamic_shared = size_t(bytes);
  std::lock_guard<std::mutex> lock(kernel_limits_mutex);
  known_kernel_limits[kernel] = limits;
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

extern "C" MX_EXPORT mixtral::Backend* mixtral_ext_cuda_create_backend(int device) {
  return new mixtral::cuda::CudaBackend(device);  // throws DeviceError; the core catches it
}
