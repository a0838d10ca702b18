// The CUDA runtime of the backend: one device, one non-blocking stream and a
// cuBLAS handle bound to it with its own workspace, plus a pinned host
// staging buffer through which weights and inputs stream to the device.
#pragma once

#include <string>

#include "cuda/cuda_check.cuh"

namespace mixtral::cuda {

class Runtime {
 public:
  explicit Runtime(int device);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  // Host -> device through the pinned staging buffer, chunk by chunk (two halves, so the
  // copy of one chunk overlaps the memcpy into the other); returns when the data is on the device.
  void upload(void* device_dst, const void* host_src, size_t bytes);
  // Device -> host after the work queued on the stream; returns when host_dst holds the data.
  void download(void* host_dst, const void* device_src, size_t bytes);

 private:
  void release();  // frees whatever the constructor made

  static constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS' recommendation for Hopper
  static constexpr size_t kStagingBytes = 64u << 20;
  int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* workspace_ = nullptr;
  char* staging_ = nullptr;  // pinned, kStagingBytes
  cudaEvent_t staging_free_[2] = {nullptr, nullptr};
};

// "<count> devices; device 0: <name>, sm_<cc>, <SMs> SMs, <GiB> GiB; cuBLAS <version>".
std::string describe_devices();

}  // namespace mixtral::cuda
