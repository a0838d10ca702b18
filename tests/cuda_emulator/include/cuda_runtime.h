// The CUDA emulator's stand-in for cuda_runtime.h. With it (and the other
// headers here) the host C++ compiler builds the CUDA backend's own sources,
// csrc/cuda/*.cu, into a library that runs on the CPU, so the GPU tests check
// the kernels and the cuBLAS calls on machines without a GPU
// (tests/cuda_emulator/CMakeLists.txt, tests/run_cuda_emulator.sh).
//
// The model: the blocks of a grid run in a shuffled order, three at a time on three host threads
// (atomics and fences are the host's; one at a time in the sanitized build, whose static shared
// arrays ASan must guard); the threads of a block run as fibers of one host thread, each until it
// reaches a barrier
// (__syncthreads, __syncwarp, a warp shuffle or ballot, a warp-wide PTX
// instruction: mma.sync or ldmatrix). cp.async copies land when their thread
// waits for them, and their destination holds NaN bytes until then.
// Static __shared__ arrays are statics, thread_local where blocks run on several threads; the
// dynamic shared memory is a buffer filled with NaN bytes at the start of
// every block. Launches and cudaFuncSetAttribute are checked as the runtime
// checks them, with each kernel's registers and static shared memory as nvcc
// compiles it for sm_90a (kernel_resources.py; a kernel missing from that table
// cannot be launched). Device memory is host memory counted against an emulated
// capacity. A stream's operations run in order, as late as a GPU may run them:
// when the host waits for them (stream or event synchronize, a copy into
// pageable memory, cudaFree), so a host that touches pinned memory before the
// device is done with it sees the difference. While a stream is captured into a
// graph its operations are recorded, and they run when the graph does.
#pragma once

#define MIXTRAL_EXT_CUDA_EMULATOR 1

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#ifdef CUDA_EMULATOR_ONE_BLOCK_AT_A_TIME
#define __shared__ static  // the sanitized build: ASan guards static arrays (not thread_local ones)
#else
#define __shared__ static thread_local  // one block per host thread at a time: its own arrays
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- the runtime API (the subset the backend uses) ------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
typedef struct CUgraph_st* cudaGraph_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;

struct cudaFuncAttributes {  // the fields the backend reads
  size_t sharedSizeBytes;         // static __shared__ bytes
  int maxThreadsPerBlock;         // what the kernel's registers allow
  int numRegs;                    // per thread
  int maxDynamicSharedSizeBytes;  // cudaFuncAttributeMaxDynamicSharedMemorySize
};

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor, multiProcessorCount;
};

const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel);
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);

template <typename T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
template <typename T>
cudaError_t cudaMallocHost(T** ptr, size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(ptr), bytes);
}

// ---- the emulator's entry points ------------------------------------------------------------

namespace cuda_emulator {

struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
extern thread_local const ThreadContext* current_thread;  // of the running fiber

void sync_block();                                   // __syncthreads
void sync_warp();                                    // __syncwarp: the live lanes of the warp meet
uint64_t exchange_in_warp(uint64_t value, int lane);  // every lane offers a value, gets lane's
unsigned ballot_in_warp(bool predicate);
unsigned char* dynamic_shared();
// A fault of the running thread (a misaligned ldmatrix row, ...): the launch fails with error once
// the grid is done, and the error stays, as a GPU's context does after a kernel fault.
void fault(cudaError_t error, const char* what);

// Runs body once per thread of the grid on `stream` (now, or when a captured graph is launched).
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   std::function<void()> body);
// Runs fn on the stream: now, or at every launch of the graph being captured on it.
cudaError_t enqueue(cudaStream_t stream, std::function<void()> fn);

template <typename T>
T shuffle(T value, int lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle: a word at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange_in_warp(bits, lane);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename... Params, size_t... I>
cudaError_t launch_unpacked(void (*kernel)(Params...), dim3 grid, dim3 block, void** args, size_t shared_bytes,
                            cudaStream_t stream, std::index_sequence<I...>) {
  std::tuple<std::decay_t<Params>...> values(*static_cast<std::decay_t<Params>*>(args[I])...);
  return launch(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, stream,
                [kernel, values] { std::apply(kernel, values); });
}

}  // namespace cuda_emulator

template <typename... Params>
cudaError_t cudaLaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, void** args, size_t shared_bytes = 0,
                             cudaStream_t stream = nullptr) {
  return cuda_emulator::launch_unpacked(kernel, grid, block, args, shared_bytes, stream,
                                        std::index_sequence_for<Params...>{});
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- device code --------------------------------------------------------------------------

#define threadIdx (::cuda_emulator::current_thread->thread_idx)
#define blockIdx (::cuda_emulator::current_thread->block_idx)
#define blockDim (::cuda_emulator::current_thread->block_dim)
#define gridDim (::cuda_emulator::current_thread->grid_dim)

inline void __syncthreads() { cuda_emulator::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emulator::sync_warp(); }

inline int emulated_lane() {
  const auto& t = *cuda_emulator::current_thread;
  return static_cast<int>((t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z)) % 32);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return cuda_emulator::shuffle(value, emulated_lane() ^ lane_mask);
}
template <typename T>
T __shfl_sync(unsigned, T value, int lane) {
  return cuda_emulator::shuffle(value, lane & 31);
}
inline unsigned __ballot_sync(unsigned, int predicate) { return cuda_emulator::ballot_in_warp(predicate != 0); }
inline int __popc(unsigned value) { return __builtin_popcount(value); }
inline unsigned __float_as_uint(float value) {
  unsigned bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
// Blocks run on several host threads at once: device-wide fences and atomics are the host's.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
template <typename T>
T __ldcg(const T* address) {  // a load that bypasses L1: reads what other blocks wrote before their fence
  T value;
  __atomic_load(address, &value, __ATOMIC_RELAXED);
  return value;
}
inline unsigned char* emulated_dynamic_shared_memory() { return cuda_emulator::dynamic_shared(); }

// The PTX instructions of csrc/cuda/ptx.cuh, with the fragment layouts described there: warp-wide
// (the lanes meet), on 16-bit elements (float16 when `float16`, else bfloat16).
void emulated_mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool float16);
void emulated_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool transpose);
// Per thread: a copy's destination holds NaN bytes until a wait lands its group.
void emulated_cp_async_16(void* shared, const void* global, bool present);
void emulated_cp_async_commit();
void emulated_cp_async_wait(int pending);

// CUDA's min and max overloads for device code.
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
