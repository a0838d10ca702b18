// What the CUDA emulator's runtime (emulator.cpp) offers its other parts (nccl_standin.cpp): work
// enqueued on a stream as the runtime runs it (in order, captured into a graph while the stream is
// recorded), and a fault that, like a GPU's, stays for every later check.
#pragma once

#include <functional>

#include "cuda_runtime.h"

namespace cuda_emulator {

cudaError_t enqueue(cudaStream_t stream, std::function<void()> fn);
void device_fault(cudaError_t error, const char* what);

}  // namespace cuda_emulator
