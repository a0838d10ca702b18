// A stand-in for NCCL in the CUDA emulator: the entry points of NCCL's C API that the CUDA backend's
// communicator opens (csrc/cuda/nccl_communicator.cu), exported from the emulator's library, so that
// the tests run a sharded GPU engine's ranks as processes on the CPU (MIXTRAL_EXT_NCCL_LIBRARY names
// this library). The ranks of a group share a POSIX shared-memory file named in the group id:
//   header: joined (ranks that have joined), arrived and phase (a barrier), aborted;
//   then one slot of kSlotBytes per rank.
// ncclAllReduce is enqueued on the stream like a kernel (captured into graphs), and when it runs each
// rank copies its buffer into its slot, waits for all, sums the slots in rank order in float32 (every
// rank the same bytes), writes its output and waits for all again. A rank that does not come within
// kTimeoutSeconds, or an aborted group, fails it, as a device fault.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>

#include "emulator_hooks.h"

namespace {

constexpr size_t kSlotBytes = 4u << 20;
constexpr int kMaxRanks = 8;
constexpr double kTimeoutSeconds = 60.0;
// NCCL's values (nccl.h).
constexpr int kSuccess = 0, kSystemError = 2, kInvalidArgument = 4, kSum = 0;
constexpr int kFloat16 = 6, kFloat32 = 7, kBFloat16 = 9;

struct UniqueId {
  char internal[128];
};

struct Header {
  std::atomic<int> joined, arrived, phase, aborted;
};
constexpr size_t kHeaderBytes = 256;
static_assert(sizeof(Header) <= kHeaderBytes, "the header fits before the slots");

struct Comm {
  Header* header;
  char* slots;  // [world][kSlotBytes]
  int rank, world;
  int phase = 0;  // of the last barrier this rank passed
  std::atomic<bool> aborted{false};
  bool failed = false;  // an all-reduce failed: the device fault is raised (and said) once
};

size_t shared_bytes(int world) { return kHeaderBytes + size_t(world) * kSlotBytes; }

// Waits until `done` or a deadline; false when it passed or the group was aborted.
template <typename Done>
bool wait_for(Comm* c, Done done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(kTimeoutSeconds);
  while (!done()) {
    if (c->aborted || c->header->aborted || std::chrono::steady_clock::now() > deadline) return false;
    sched_yield();
  }
  return true;
}

bool barrier(Comm* c) {
  const int next = c->phase + 1;
  if (c->header->arrived.fetch_add(1) + 1 == c->world) {
    c->header->arrived.store(0);
    c->header->phase.store(next);
  } else if (!wait_for(c, [&] { return c->header->phase.load() == next; })) {
    return false;
  }
  c->phase = next;
  return true;
}

size_t dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

float load(const char* p, size_t i, int dtype) {
  if (dtype == kFloat32) return reinterpret_cast<const float*>(p)[i];
  const uint16_t bits = reinterpret_cast<const uint16_t*>(p)[i];
  if (dtype == kFloat16) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return float(h);
  }
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

void store(char* p, size_t i, float value, int dtype) {
  if (dtype == kFloat32) {
    reinterpret_cast<float*>(p)[i] = value;
    return;
  }
  uint16_t bits;
  if (dtype == kFloat16) {
    const _Float16 h = _Float16(value);
    std::memcpy(&bits, &h, 2);
  } else if (value != value) {  // bfloat16: NaN stays NaN
    bits = 0x7fc0;
  } else {  // bfloat16, rounded to nearest even
    uint32_t wide;
    std::memcpy(&wide, &value, 4);
    bits = uint16_t((wide + 0x7fffu + ((wide >> 16) & 1u)) >> 16);
  }
  reinterpret_cast<uint16_t*>(p)[i] = bits;
}

bool all_reduce_now(Comm* c, const void* send, void* receive, size_t count, int dtype) {
  const size_t bytes = count * dtype_bytes(dtype);
  std::memcpy(c->slots + size_t(c->rank) * kSlotBytes, send, bytes);
  if (!barrier(c)) return false;
  for (size_t i = 0; i < count; ++i) {
    float sum = 0.0f;
    for (int r = 0; r < c->world; ++r) sum += load(c->slots + size_t(r) * kSlotBytes, i, dtype);
    store(static_cast<char*>(receive), i, sum, dtype);
  }
  return barrier(c);
}

}  // namespace

extern "C" {

#define NCCL_STANDIN_EXPORT __attribute__((visibility("default")))

NCCL_STANDIN_EXPORT int ncclGetUniqueId(UniqueId* id) {
  std::memset(id->internal, 0, sizeof(id->internal));
  const std::string name = "/mixtral_ext_nccl_" + std::to_string(getpid()) + "_" + std::to_string(std::random_device{}());
  std::memcpy(id->internal, name.data(), name.size());
  return kSuccess;
}

NCCL_STANDIN_EXPORT int ncclCommInitRank(Comm** comm, int world, UniqueId id, int rank) {
  if (world < 1 || world > kMaxRanks || rank < 0 || rank >= world) return kInvalidArgument;
  const std::string name(id.internal, strnlen(id.internal, sizeof(id.internal)));
  const int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
  if (fd < 0) return kSystemError;
  void* mapped = ftruncate(fd, off_t(shared_bytes(world))) == 0
                     ? mmap(nullptr, shared_bytes(world), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                     : MAP_FAILED;
  close(fd);
  if (mapped == MAP_FAILED) return kSystemError;
  Comm* c = new Comm{static_cast<Header*>(mapped), static_cast<char*>(mapped) + kHeaderBytes, rank, world};
  c->header->joined.fetch_add(1);
  if (!wait_for(c, [&] { return c->header->joined.load() == world; })) {
    munmap(mapped, shared_bytes(world));
    delete c;
    return kSystemError;
  }
  if (rank == 0) shm_unlink(name.c_str());  // every rank has it mapped
  *comm = c;
  return kSuccess;
}

NCCL_STANDIN_EXPORT int ncclAllReduce(const void* send, void* receive, size_t count, int dtype, int op, Comm* comm,
                                      cudaStream_t stream) {
  if (op != kSum || (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) ||
      count * dtype_bytes(dtype) > kSlotBytes)
    return kInvalidArgument;
  cuda_emulator::enqueue(stream, [=] {
    if (!comm->failed && !all_reduce_now(comm, send, receive, count, dtype)) {
      comm->failed = true;
      cuda_emulator::device_fault(cudaErrorLaunchFailure, "NCCL stand-in: an all-reduce's ranks did not all come");
    }
  });
  return kSuccess;
}

NCCL_STANDIN_EXPORT int ncclCommDestroy(Comm* comm) {
  munmap(comm->header, shared_bytes(comm->world));
  delete comm;
  return kSuccess;
}

// Marks the group aborted for every rank; the mapping stays (an all-reduce may be running on another thread).
NCCL_STANDIN_EXPORT int ncclCommAbort(Comm* comm) {
  comm->aborted = true;
  comm->header->aborted.store(1);
  return kSuccess;
}

NCCL_STANDIN_EXPORT const char* ncclGetErrorString(int result) {
  switch (result) {
    case kSuccess: return "no error";
    case kSystemError: return "system error (shared memory, or a rank that did not join)";
    case kInvalidArgument: return "invalid argument";
    default: return "unknown error";
  }
}

}  // extern "C"
