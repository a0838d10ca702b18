// Error checks of the CUDA backend: CUDA_CHECK for runtime calls, CUBLAS_CHECK
// for cuBLAS calls, launch() for kernels. Each throws a mixtral::DeviceError
// (DeviceOutOfMemoryError for allocation failures) naming file, line, the
// failed expression and the library's message; pybind11 turns it into a
// Python exception, so a device error never aborts the process. A launch the
// kernel's registers or shared memory cannot fit is a ShapeError before it
// reaches the runtime.
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

// What one kernel allows a launch on the current device (cudaFuncGetAttributes, read once per kernel).
struct KernelLimits {
  int max_threads;            // threads per block that its registers allow
  int registers;              // per thread
  size_t static_shared;       // bytes of its __shared__ arrays
  size_t max_dynamic_shared;  // bytes a launch may ask for (48 KiB less the static ones, or as opted in)
};
KernelLimits kernel_limits(const void* kernel);
// Sets the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, and its limits with it.
void set_max_dynamic_shared(const void* kernel, int bytes);

// kernel<<<grid, block, shared_bytes, stream>>>(args...) through cudaLaunchKernel, the arguments
// converted to the kernel's parameter types first; a block that the kernel's registers or shared
// memory cannot fit is a ShapeError, another bad launch configuration a DeviceError, at once.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: one argument per kernel parameter");
  const KernelLimits limits = kernel_limits(reinterpret_cast<const void*>(kernel));
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  MX_CHECK(threads <= uint64_t(limits.max_threads), ShapeError,
           "a kernel launch of " << threads << " threads per block: its " << limits.registers
                                 << " registers per thread allow " << limits.max_threads);
  MX_CHECK(shared_bytes <= limits.max_dynamic_shared, ShapeError,
           "a kernel launch with " << shared_bytes << " bytes of dynamic shared memory: the kernel may take "
                                   << limits.max_dynamic_shared);
  std::tuple<Params...> values(std::forward<Args>(args)...);
  std::apply(
      [&](auto&... value) {
        void* pointers[] = {static_cast<void*>(&value)...};
        CUDA_CHECK(cudaLaunchKernel(kernel, grid, block, pointers, shared_bytes, stream));
      },
      values);
}

}  // namespace mixtral::cuda
