// The CUDA backend's own sources (csrc/cuda), built by the host compiler
// against the emulator's headers (include/ here) into
// libmixtral_ext_cuda_emulator.so.
#include "cuda/attention_tc.cu"
#include "cuda/cuda_backend.cu"
#include "cuda/kernels.cu"
#include "cuda/runtime.cu"
#include "cuda/sampling.cu"
