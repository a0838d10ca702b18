// Error checks of the CUDA backend: CUDA_CHECK for runtime calls, CUBLAS_CHECK
// for cuBLAS calls, launch() for kernels. Each throws a mixtral::DeviceError
// (DeviceOutOfMemoryError for allocation failures) naming file, line, the
// failed expression and the library's message; pybind11 turns it into a
// Python exception, so a device error never aborts the process. A launch the
// kernel's registers or shared memory cannot fit is a ShapeError.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <sstream>
#include <tuple>
#include <utility>

#include "core/error.h"

namespace mixtral::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  std::ostringstream message;
  message << "CUDA error at " << file << ":" << line << ": " << expr << ": "
          << cudaGetErrorName(status) << " (" << cudaGetErrorString(status) << ")";
  if (status == cudaErrorMemoryAllocation) throw DeviceOutOfMemoryError(message.str());
  throw DeviceError(message.str());
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* expr, const char* file, int line) {
  std::ostringstream message;
  message << "cuBLAS error at " << file << ":" << line << ": " << expr << ": "
          << cublasGetStatusName(status) << " (" << cublasGetStatusString(status) << ")";
  if (status == CUBLAS_STATUS_ALLOC_FAILED) throw DeviceOutOfMemoryError(message.str());
  throw DeviceError(message.str());
}

}  // namespace mixtral::cuda

#define CUDA_CHECK(expr)                                                                    \
  do {                                                                                      \
    cudaError_t mx_cuda_status_ = (expr);                                                   \
    if (mx_cuda_status_ != cudaSuccess)                                                     \
      ::mixtral::cuda::throw_cuda_error(mx_cuda_status_, #expr, __FILE__, __LINE__);        \
  } while (0)

#define CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                      \
    cublasStatus_t mx_cublas_status_ = (expr);                                              \
    if (mx_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                         \
      ::mixtral::cuda::throw_cublas_error(mx_cublas_status_, #expr, __FILE__, __LINE__);    \
  } while (0)

namespace mixtral::cuda {

// What one kernel allows a launch on the current device (cudaFuncGetAttributes).
struct KernelLimits {
  int max_threads;            // threads per block that its registers (and launch bounds) allow
  int registers;              // per thread
  size_t static_shared;       // bytes of its __shared__ arrays
  size_t max_dynamic_shared;  // bytes a launch may ask for (48 KiB less the static ones, or as opted in)
};
KernelLimits kernel_limits(const void* kernel);

// After cudaLaunchKernel refused a launch with `status`: a ShapeError when the block does not fit
// the kernel's registers or shared memory (the runtime's error cleared, nothing was queued), else
// the DeviceError of the status.
[[noreturn]] void throw_launch_error(cudaError_t status, const void* kernel, dim3 block, size_t shared_bytes,
                                     const char* file, int line);

// kernel<<<grid, block, shared_bytes, stream>>>(args...) through cudaLaunchKernel, the arguments
// converted to the kernel's parameter types first. The runtime checks the configuration; a block
// that the kernel's registers or shared memory cannot fit is a ShapeError, another refused launch
// a DeviceError, at once (nothing is looked up on a launch that succeeds).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: one argument per kernel parameter");
  std::tuple<Params...> values(std::forward<Args>(args)...);
  std::apply(
      [&](auto&... value) {
        void* pointers[] = {static_cast<void*>(&value)...};
        const cudaError_t status = cudaLaunchKernel(kernel, grid, block, pointers, shared_bytes, stream);
        if (status != cudaSuccess)
          throw_launch_error(status, reinterpret_cast<const void*>(kernel), block, shared_bytes, __FILE__, __LINE__);
      },
      values);
}

}  // namespace mixtral::cuda
