// The CUDA emulator's runtime (declared in include/cuda_runtime.h and
// include/cublas_v2.h here): fibers for the threads of a block, barriers
// between them, device memory, streams (work queued until the host waits for
// it), graph capture and replay, events, and the cuBLAS GEMMs. One emulated
// device; one operation runs at a time, and a kernel's blocks run on three host
// threads at once (BlockRunners), each pulling the next of a shuffled order.
//
// A block of N threads is N fibers on the host thread that runs it, each
// with its own stack, switched by cuda_emulator_switch (x86-64). The scheduler
// runs every ready fiber until it blocks at a barrier or returns, alternating
// forward and backward order on each round (so a missing barrier between a
// write and a read of another thread shows up whichever of the two comes
// first), then releases a warp whose live lanes all wait at a warp barrier,
// else the block when all its live threads wait at __syncthreads. Nothing to
// release while threads still wait is a deadlock: the launch fails, naming it.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <sanitizer/asan_interface.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "emulator_hooks.h"


extern "C" void cuda_emulator_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers on the current stack and its pointer in *save_sp, then
// continues on load_sp, whose registers and return address the same routine saved (or
// initial_stack_pointer laid out).
asm(R"(
  .text
  .p2align 4
  .type cuda_emulator_switch, @function
cuda_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulator_switch, .-cuda_emulator_switch
)");

struct CUstream_st {
  std::deque<std::function<void()>> pending;  // enqueued, not run yet
  uint64_t enqueued = 0, completed = 0;        // operations so far
  bool capturing = false;
  bool capture_invalidated = false;
  std::vector<std::function<void()>> captured;
};
struct CUevent_st {
  CUstream_st* stream = nullptr;  // where it was last recorded, after `position` operations
  uint64_t position = 0;
};
struct CUgraph_st {
  std::vector<std::function<void()>> operations;
};
struct CUgraphExec_st {
  // Shared with the launches still queued: as in CUDA, destroying an instance does not cancel them.
  std::shared_ptr<const std::vector<std::function<void()>>> operations;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace cuda_emulator {

thread_local const ThreadContext* current_thread = nullptr;

namespace {

// The emulated device: an H100/H200-like card.
constexpr int kMaxBlockThreads = 1024;
constexpr int kDefaultShared = 48 << 10;   // static + dynamic shared bytes of a block without opting in
constexpr int kOptInShared = 227 << 10;    // static + dynamic shared bytes of a block at most (opt-in)
constexpr int kRegistersPerBlock = 65536;
constexpr int kRegisterUnitPerWarp = 256;  // registers are given to warps in units of this many
constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kPoisonedAllocationBytes = 64 << 20;  // new allocations up to this size are filled with 0xff

enum class FiberState { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

// A cp.async of 16 bytes, started and not yet landed.
struct AsyncCopy {
  unsigned char* shared;
  const unsigned char* global;
  bool present;  // false: 16 zero bytes
};

struct Fiber {
  void* stack_pointer = nullptr;
  ThreadContext context;
  FiberState state = FiberState::kReady;
  int warp = 0, lane = 0;
  int exchange_parity = 0;                // which of the warp's two exchange buffers this lane uses next
  uint64_t exchanges = 0;                 // shuffles and ballots so far
  std::vector<AsyncCopy> async_copies;    // oldest first
  std::vector<size_t> async_group_ends;   // committed groups, oldest first: ends in async_copies
};

constexpr int kMaxGatherWords = 8;

struct Warp {
  int live = 0, waiting = 0, lanes = 0;
  uint64_t slots[2][32] = {};
  uint64_t slot_exchange[2][32] = {};  // the exchange at which each lane wrote its slot
  uint32_t words[2][32][kMaxGatherWords] = {};
};

// The block being run and everything its fibers share.
struct Executor {
  char* stacks = nullptr;  // kMaxBlockThreads stacks of kStackBytes, each above a guard page
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, at_block_barrier = 0;
  void* scheduler_stack_pointer = nullptr;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  unsigned char* dynamic_shared = nullptr;  // the running launch's, 128-byte aligned, exactly its size
  size_t dynamic_shared_bytes = 0;
  std::string failure;                      // why the running launch failed, if it did
  cudaError_t failure_code = cudaSuccess;

  Executor() {
    const size_t bytes = kStackBytes * kMaxBlockThreads;
    void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
      std::fprintf(stderr, "cuda emulator: cannot map the fiber stacks\n");
      std::abort();
    }
    stacks = static_cast<char*>(memory);
    for (int i = 0; i < kMaxBlockThreads; ++i) mprotect(stacks + i * kStackBytes, 4096, PROT_NONE);
    fibers.resize(kMaxBlockThreads);
    warps.resize(kMaxBlockThreads / 32);
  }
};

std::recursive_mutex& device_mutex() {
  static std::recursive_mutex mutex;
  return mutex;
}

// Each host thread that runs blocks has its own (the fibers of a block run on one host thread).
Executor& executor() {
  static thread_local Executor instance;
  return instance;
}

// The host threads that run the blocks of a grid together with the launching thread: blocks run
// concurrently, each pulling the next block of a shuffled order, so blocks that talk to each other
// (atomics, fences, a last block that merges) meet in interleavings the scheduler varies. Started
// once and never stopped (they wait for work until the process ends).
class BlockRunners {
 public:
  static constexpr int kWorkers = 2;  // with the launching thread: three blocks at a time

  static BlockRunners& instance() {
    static BlockRunners* runners = new BlockRunners;
    return *runners;
  }

  // Runs work() on the calling thread and on every worker; returns when all have returned.
  void run(const std::function<void()>& work) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      work_ = &work;
      busy_ = kWorkers;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  BlockRunners() {
    for (int i = 0; i < kWorkers; ++i) std::thread([this] { serve(); }).detach();
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void()>* work;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        work = work_;
      }
      (*work)();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void()>* work_ = nullptr;
  uint64_t generation_ = 0;
  int busy_ = 0;
};

[[noreturn]] void fiber_main() {
  Executor& ex = executor();
  Fiber& fiber = *ex.running;
  (*ex.body)();
  fiber.state = FiberState::kDone;
  --ex.live;
  --ex.warps[fiber.warp].live;
  cuda_emulator_switch(&fiber.stack_pointer, ex.scheduler_stack_pointer);
  __builtin_unreachable();
}

// A new fiber's stack: six zero registers, then fiber_main as the return address, then a zero
// word so that fiber_main starts with the stack aligned as after a call.
void* initial_stack_pointer(char* stack_top) {
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15));
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  return sp;
}

void wait_at(FiberState barrier) {
  Executor& ex = executor();
  Fiber& fiber = *ex.running;
  fiber.state = barrier;
  if (barrier == FiberState::kAtBlockBarrier) ++ex.at_block_barrier;
  else ++ex.warps[fiber.warp].waiting;
  cuda_emulator_switch(&fiber.stack_pointer, ex.scheduler_stack_pointer);
}

// Runs one block; a deadlock sets ex.failure.
void run_block(Executor& ex, dim3 grid, dim3 block, dim3 block_idx) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (int i = 0; i < n; ++i) {
    Fiber& f = ex.fibers[i];
    const unsigned x = i % block.x, y = (i / block.x) % block.y, z = i / (block.x * block.y);
    f.context = ThreadContext{dim3(x, y, z), block_idx, block, grid};
    f.state = FiberState::kReady;
    f.warp = i / 32, f.lane = i % 32, f.exchange_parity = 0, f.exchanges = 0;
    f.async_copies.clear();
    f.async_group_ends.clear();
    f.stack_pointer = initial_stack_pointer(ex.stacks + (i + 1) * kStackBytes);
  }
  for (int w = 0; w * 32 < n; ++w) {
    Warp& warp = ex.warps[w];
    warp.lanes = warp.live = std::min(32, n - w * 32);
    warp.waiting = 0;
    std::memset(warp.slot_exchange, 0xff, sizeof(warp.slot_exchange));
  }
  std::memset(ex.dynamic_shared, 0xff, ex.dynamic_shared_bytes);
  ex.live = n;
  ex.at_block_barrier = 0;
  for (bool forward = true; ex.live > 0; forward = !forward) {
    for (int j = 0; j < n; ++j) {
      Fiber& f = ex.fibers[forward ? j : n - 1 - j];
      if (f.state != FiberState::kReady) continue;
      ex.running = &f;
      current_thread = &f.context;
      cuda_emulator_switch(&ex.scheduler_stack_pointer, f.stack_pointer);
    }
    if (ex.live == 0) break;
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      Warp& warp = ex.warps[w];
      if (warp.waiting == 0 || warp.waiting != warp.live) continue;
      for (int i = w * 32; i < w * 32 + warp.lanes; ++i)
        if (ex.fibers[i].state == FiberState::kAtWarpBarrier) ex.fibers[i].state = FiberState::kReady;
      warp.waiting = 0;
      released = true;
    }
    if (!released && ex.at_block_barrier == ex.live) {
      for (int i = 0; i < n; ++i)
        if (ex.fibers[i].state == FiberState::kAtBlockBarrier) ex.fibers[i].state = FiberState::kReady;
      ex.at_block_barrier = 0;
      released = true;
    }
    if (!released) {
      // The waiting fibers are abandoned mid-call: their stacks' redzones must not outlive them.
      ASAN_UNPOISON_MEMORY_REGION(ex.stacks, kStackBytes * kMaxBlockThreads);
      ex.failure_code = cudaErrorLaunchFailure;
      ex.failure = "deadlock in block (" + std::to_string(block_idx.x) + ", " + std::to_string(block_idx.y) + ", " +
                   std::to_string(block_idx.z) + "): " + std::to_string(ex.at_block_barrier) +
                   " threads wait at __syncthreads, the other live threads at a warp barrier";
      break;
    }
  }
  current_thread = nullptr;
  ex.running = nullptr;
}

cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

cudaError_t& sticky_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

cudaError_t fail(cudaError_t error) {
  last_error() = error;
  return error;
}

std::vector<CUstream_st*>& streams() {
  static std::vector<CUstream_st*> all;
  return all;
}

std::map<const void*, size_t>& pinned_allocations() {
  static std::map<const void*, size_t> all;
  return all;
}

// ---- each kernel's resources, as nvcc compiles it ----------------------------------------------

// What the real compiler gave one kernel (kernel_resources.py), and the dynamic shared memory a
// launch of it may take (cudaFuncAttributeMaxDynamicSharedMemorySize; by default what the 48 KiB
// leave beside the static arrays).
struct KernelResources {
  std::string name;  // demangled
  int registers = 0;
  int static_shared = 0;
  int launch_bound = 0;  // the threads __launch_bounds__ allows; 0: no bound
  int max_dynamic_shared = 0;
  bool operator==(const KernelResources& other) const {
    return registers == other.registers && static_shared == other.static_shared && launch_bound == other.launch_bound;
  }
  int max_threads() const {  // as cudaFuncAttributes::maxThreadsPerBlock
    const int per_warp = (registers * 32 + kRegisterUnitPerWarp - 1) / kRegisterUnitPerWarp * kRegisterUnitPerWarp;
    const int by_registers = std::min(kMaxBlockThreads, per_warp == 0 ? kMaxBlockThreads : kRegistersPerBlock / per_warp * 32);
    return launch_bound > 0 ? std::min(by_registers, launch_bound) : by_registers;
  }
};

// Demangled name -> its resources, from the table the build wrote.
std::unordered_map<std::string, KernelResources> compiled_kernels() {
  std::unordered_map<std::string, KernelResources> kernels;
  std::ifstream table(CUDA_EMULATOR_KERNEL_RESOURCES);
  std::string line;
  while (std::getline(table, line)) {
    std::istringstream fields(line);
    KernelResources kernel;
    if (fields >> kernel.registers >> kernel.static_shared >> kernel.launch_bound &&
        std::getline(fields >> std::ws, kernel.name)) {
      kernel.max_dynamic_shared = kDefaultShared - kernel.static_shared;
      kernels[kernel.name] = kernel;
    }
  }
  if (kernels.empty()) {
    std::fprintf(stderr, "cuda emulator: no kernel resources in %s\n", CUDA_EMULATOR_KERNEL_RESOURCES);
    std::abort();
  }
  return kernels;
}

// This library's functions by address (its ELF symbol table), demangled: every name at an address
// (the compiler may fold identical functions into one).
std::unordered_map<const void*, std::vector<std::string>> function_names() {
  std::unordered_map<const void*, std::vector<std::string>> names;
  Dl_info self{};
  if (!dladdr(reinterpret_cast<const void*>(&compiled_kernels), &self)) return names;
  std::ifstream file(self.dli_fname, std::ios::binary);
  const std::string image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (image.size() < sizeof(Elf64_Ehdr)) {
    std::fprintf(stderr, "cuda emulator: cannot read %s for its kernels' names\n", self.dli_fname);
    std::abort();
  }
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + header->e_shoff);
  for (int i = 0; i < header->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[i].sh_offset);
    const char* strings = image.data() + sections[sections[i].sh_link].sh_offset;
    for (size_t j = 0; j < sections[i].sh_size / sizeof(Elf64_Sym); ++j) {
      if (ELF64_ST_TYPE(symbols[j].st_info) != STT_FUNC || symbols[j].st_value == 0) continue;
      // The emulator's __half is _Float16, mangled DF16_, which this demangler does not know: demangled
      // as Dh (IEEE half, also a builtin type, so the substitutions stay put), then named as CUDA's.
      std::string mangled = strings + symbols[j].st_name;
      for (size_t at; (at = mangled.find("DF16_")) != std::string::npos;) mangled.replace(at, 5, "Dh");
      int status = 0;
      char* demangled = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
      if (status != 0) continue;
      std::string name = demangled;
      std::free(demangled);
      auto identifier = [&](size_t at) { return std::isalnum(static_cast<unsigned char>(name[at])) || name[at] == '_'; };
      for (size_t at = 0; (at = name.find("half", at)) != std::string::npos; at += 4) {
        if ((at == 0 || !identifier(at - 1)) && (at + 4 == name.size() || !identifier(at + 4)))
          name.replace(at, 4, "__half"), at += 2;
      }
      names[static_cast<const char*>(self.dli_fbase) + symbols[j].st_value].push_back(std::move(name));
    }
  }
  return names;
}

// The resources of `kernel`; null (with the reason on stderr) when nvcc's table has none of its
// names. Names folded into one address must agree on the resources (else the emulator aborts).
KernelResources* kernel_resources(const void* kernel) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  static const auto compiled = compiled_kernels();
  static const auto names = function_names();
  static std::unordered_map<const void*, KernelResources> known;
  if (auto found = known.find(kernel); found != known.end()) return &found->second;
  auto at = names.find(kernel);
  if (at == names.end()) {
    std::fprintf(stderr, "cuda emulator: the kernel at %p has no name in this library's symbol table\n", kernel);
    return nullptr;
  }
  const KernelResources* chosen = nullptr;
  for (const std::string& name : at->second) {
    auto usage = compiled.find(name);
    if (usage == compiled.end()) continue;
    if (chosen && !(*chosen == usage->second)) {
      std::fprintf(stderr, "cuda emulator: %s and %s share an address but not their resources\n",
                   chosen->name.c_str(), name.c_str());
      std::abort();
    }
    chosen = &usage->second;
  }
  if (!chosen) {
    std::fprintf(stderr, "cuda emulator: %s is not in nvcc's kernel table %s\n", at->second.front().c_str(),
                 CUDA_EMULATOR_KERNEL_RESOURCES);
    return nullptr;
  }
  return &(known[kernel] = *chosen);
}

// Device memory: host memory counted against the emulated capacity (MIXTRAL_EXT_EMULATOR_MEMORY bytes,
// default 16 GiB).
struct DeviceMemory {
  size_t capacity = 16ull << 30;
  size_t used = 0;
  std::unordered_map<void*, size_t> allocations;
  DeviceMemory() {
    if (const char* env = std::getenv("MIXTRAL_EXT_EMULATOR_MEMORY")) capacity = std::strtoull(env, nullptr, 10);
  }
};

DeviceMemory& device_memory() {
  static DeviceMemory memory;
  return memory;
}

}  // namespace

void sync_block() { wait_at(FiberState::kAtBlockBarrier); }
void sync_warp() { wait_at(FiberState::kAtWarpBarrier); }

// A lane that has exited (or never existed) offers nothing: a shuffle from it reads poison (NaN
// bytes), and it adds no bit to a ballot, as on a GPU where its register is undefined. A slot is
// what its lane offered at this same exchange (the lanes of a warp count their exchanges alike).
constexpr uint64_t kPoison = ~uint64_t(0);

// Offers value in this lane's slot and meets the warp; returns the slots' exchange number.
uint64_t offer_in_warp(uint64_t value) {
  Executor& ex = executor();
  Fiber& fiber = *ex.running;
  Warp& warp = ex.warps[fiber.warp];
  const int parity = fiber.exchange_parity;
  fiber.exchange_parity ^= 1;
  const uint64_t exchange = fiber.exchanges++;
  warp.slots[parity][fiber.lane] = value;
  warp.slot_exchange[parity][fiber.lane] = exchange;
  sync_warp();
  return exchange;
}

bool offered(const Warp& warp, int parity, int lane, uint64_t exchange) {
  return lane < warp.lanes && warp.slot_exchange[parity][lane] == exchange;
}

uint64_t exchange_in_warp(uint64_t value, int lane) {
  const Fiber& fiber = *executor().running;
  const int parity = fiber.exchange_parity;
  const uint64_t exchange = offer_in_warp(value);
  const Warp& warp = executor().warps[fiber.warp];
  return offered(warp, parity, lane, exchange) ? warp.slots[parity][lane] : kPoison;
}

unsigned ballot_in_warp(bool predicate) {
  const Fiber& fiber = *executor().running;
  const int parity = fiber.exchange_parity;
  const uint64_t exchange = offer_in_warp(predicate);
  const Warp& warp = executor().warps[fiber.warp];
  unsigned mask = 0;
  for (int lane = 0; lane < warp.lanes; ++lane)
    mask |= offered(warp, parity, lane, exchange) && warp.slots[parity][lane] ? 1u << lane : 0u;
  return mask;
}

unsigned char* dynamic_shared() { return executor().dynamic_shared; }

// Helpers of the PTX instructions below.
namespace {

// Every lane of the (whole) warp offers `count` words; all[l * count + i] is lane l's word i.
void gather_in_warp(const uint32_t* mine, int count, uint32_t* all) {
  Executor& ex = executor();
  Fiber& fiber = *ex.running;
  Warp& warp = ex.warps[fiber.warp];
  auto& slots = warp.words[fiber.exchange_parity];
  fiber.exchange_parity ^= 1;
  std::memcpy(slots[fiber.lane], mine, sizeof(uint32_t) * count);
  sync_warp();
  if (warp.lanes != 32) fault(cudaErrorLaunchFailure, "a warp-wide instruction in a warp of fewer than 32 threads");
  for (int lane = 0; lane < warp.lanes; ++lane) std::memcpy(all + lane * count, slots[lane], sizeof(uint32_t) * count);
}

// Whether [address, address + 16) is 16-byte aligned and inside the dynamic shared memory; a fault if not.
bool check_shared_16(const void* address, const char* instruction) {
  const Executor& ex = executor();
  const auto at = reinterpret_cast<uintptr_t>(address), base = reinterpret_cast<uintptr_t>(ex.dynamic_shared);
  if (at % 16 != 0) {
    fault(cudaErrorMisalignedAddress, (std::string(instruction) + ": a shared address not 16-byte aligned").c_str());
    return false;
  }
  if (at < base || at + 16 > base + ex.dynamic_shared_bytes) {
    fault(cudaErrorIllegalAddress, (std::string(instruction) + ": outside the dynamic shared memory").c_str());
    return false;
  }
  return true;
}

float widen_16_bits(uint32_t word, int half, bool float16) {
  const uint16_t bits = static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu);
  if (float16) {
    __half value;
    std::memcpy(&value, &bits, sizeof(bits));
    return __half2float(value);
  }
  __nv_bfloat16 value;
  value.bits = bits;
  return __bfloat162float(value);
}

}  // namespace

void fault(cudaError_t error, const char* what) {
  Executor& ex = executor();
  if (!ex.failure.empty()) return;  // the first fault is the one reported
  const ThreadContext& t = *current_thread;
  ex.failure_code = error;
  ex.failure = std::string(what) + " in thread (" + std::to_string(t.thread_idx.x) + ", " +
               std::to_string(t.thread_idx.y) + ", " + std::to_string(t.thread_idx.z) + ") of block (" +
               std::to_string(t.block_idx.x) + ", " + std::to_string(t.block_idx.y) + ", " +
               std::to_string(t.block_idx.z) + ")";
}

void device_fault(cudaError_t error, const char* what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what);
  sticky_error() = error;
}

cudaError_t enqueue(cudaStream_t stream, std::function<void()> fn) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  if (!stream) {
    fn();  // the default stream: at once
  } else if (stream->capturing) {
    stream->captured.push_back(std::move(fn));
  } else {
    stream->pending.push_back(std::move(fn));
    ++stream->enqueued;
  }
  return cudaSuccess;
}

void run_until(CUstream_st* stream, uint64_t position) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  while (stream->completed < position && !stream->pending.empty()) {
    std::function<void()> fn = std::move(stream->pending.front());
    stream->pending.pop_front();
    ++stream->completed;
    fn();
  }
}

void run_pending() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  for (CUstream_st* stream : streams()) run_until(stream, stream->enqueued);
}

// While any stream is captured, allocation and freeing fail and invalidate every capture under way:
// the runtime refuses them in the global and thread-local capture modes, and the project keeps to
// that rule in the relaxed mode it captures in (cuda_backend grows no buffer while recording).
// Returns cudaSuccess when no stream is captured.
cudaError_t refuse_while_capturing() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  bool capturing = false;
  for (CUstream_st* stream : streams())
    if (stream->capturing) capturing = stream->capture_invalidated = true;
  return capturing ? fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

bool is_pinned(const void* ptr) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  const auto& pinned = pinned_allocations();
  auto next = pinned.upper_bound(ptr);
  if (next == pinned.begin()) return false;
  --next;
  return static_cast<const char*>(ptr) < static_cast<const char*>(next->first) + next->second;
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   std::function<void()> body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration);
  // As the runtime: the kernel's registers for every thread of the block, and no more dynamic
  // shared memory than its attribute allows.
  {
    std::lock_guard<std::recursive_mutex> lock(device_mutex());  // cudaFuncSetAttribute writes the limit
    const KernelResources* resources = kernel_resources(kernel);
    if (!resources) return fail(cudaErrorInvalidDeviceFunction);
    if (threads > uint64_t(resources->max_threads())) return fail(cudaErrorLaunchOutOfResources);
    if (shared_bytes > size_t(resources->max_dynamic_shared)) return fail(cudaErrorInvalidValue);
  }
  return enqueue(stream, [grid, block, shared_bytes, body = std::move(body)] {
    // The blocks run in a shuffled order (a GPU promises none), several at a time when there are
    // several; the first fault stops the grid.
    static std::mt19937_64 block_order_random(2024);
    std::vector<uint64_t> order(uint64_t(grid.x) * grid.y * grid.z);
    std::iota(order.begin(), order.end(), uint64_t(0));
    std::shuffle(order.begin(), order.end(), block_order_random);
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex failure_mutex;
    std::string failure;
    cudaError_t failure_code = cudaSuccess;
    const std::function<void()> run_blocks = [&] {
      Executor& ex = executor();
      ex.body = &body;
      if (posix_memalign(reinterpret_cast<void**>(&ex.dynamic_shared), 128, std::max<size_t>(shared_bytes, 1)) != 0) {
        std::fprintf(stderr, "cuda emulator: no memory for %zu bytes of shared memory\n", shared_bytes);
        std::abort();
      }
      ex.dynamic_shared_bytes = shared_bytes;
      ex.failure.clear();
      for (size_t i; !failed && (i = next++) < order.size();) {
        const uint64_t b = order[i];
        run_block(ex, grid, block, dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)));
        if (!ex.failure.empty()) {
          std::lock_guard<std::mutex> lock(failure_mutex);
          if (!failed.exchange(true)) failure = ex.failure, failure_code = ex.failure_code;
        }
      }
      std::free(ex.dynamic_shared);
      ex.dynamic_shared = nullptr;
    };
#ifdef CUDA_EMULATOR_ONE_BLOCK_AT_A_TIME
    run_blocks();
#else
    if (order.size() > 1) BlockRunners::instance().run(run_blocks);
    else run_blocks();
#endif
    if (failed) {
      // As on the GPU, a kernel's fault shows at the next check and stays (the context is lost);
      // the reason goes to stderr.
      std::fprintf(stderr, "cuda emulator: %s\n", failure.c_str());
      sticky_error() = failure_code;
    }
  });
}

}  // namespace cuda_emulator

// ---- PTX instructions (csrc/cuda/ptx.cuh) ----------------------------------------------------

void emulated_mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool float16) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  uint32_t all[32 * 6];
  cuda_emulator::gather_in_warp(mine, 6, all);
  const int lane = emulated_lane(), g = lane / 4, c = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), column = 2 * c + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) {
      // A (row, k): lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8); B (k, column): lane
      // column * 4 + (k % 8) / 2, register k / 8; the element's half is k % 2.
      const uint32_t a_word = all[((row % 8) * 4 + (k % 8) / 2) * 6 + row / 8 + 2 * (k / 8)];
      const uint32_t b_word = all[(column * 4 + (k % 8) / 2) * 6 + 4 + k / 8];
      sum += cuda_emulator::widen_16_bits(a_word, k % 2, float16) * cuda_emulator::widen_16_bits(b_word, k % 2, float16);
    }
    d[i] = sum;
  }
}

void emulated_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool transpose) {
  uint32_t mine[2], all[32 * 2];
  std::memcpy(mine, &row, sizeof(row));
  cuda_emulator::gather_in_warp(mine, 2, all);
  const unsigned char* rows[32];
  r[0] = r[1] = r[2] = r[3] = 0;
  for (int l = 0; l < 32; ++l) {
    std::memcpy(&rows[l], all + 2 * l, sizeof(rows[l]));
    if (!cuda_emulator::check_shared_16(rows[l], "ldmatrix")) return;
  }
  const int lane = emulated_lane();
  for (int m = 0; m < 4; ++m) {
    uint16_t elements[2];
    for (int i = 0; i < 2; ++i) {
      // Row lane / 4, element 2 (lane % 4) + i of matrix m; with .trans the transpose's.
      const unsigned char* source = transpose ? rows[8 * m + 2 * (lane % 4) + i] + 2 * (lane / 4)
                                              : rows[8 * m + lane / 4] + 2 * (2 * (lane % 4) + i);
      std::memcpy(&elements[i], source, sizeof(uint16_t));
    }
    r[m] = uint32_t(elements[0]) | uint32_t(elements[1]) << 16;
  }
}

void emulated_cp_async_16(void* shared, const void* global, bool present) {
  if (!cuda_emulator::check_shared_16(shared, "cp.async")) return;
  if (present && reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    cuda_emulator::fault(cudaErrorMisalignedAddress, "cp.async: a global address not 16-byte aligned");
    return;
  }
  std::memset(shared, 0xff, 16);  // undefined until the copy lands
  cuda_emulator::executor().running->async_copies.push_back(
      {static_cast<unsigned char*>(shared), static_cast<const unsigned char*>(global), present});
}

void emulated_cp_async_commit() {
  cuda_emulator::Fiber& fiber = *cuda_emulator::executor().running;
  fiber.async_group_ends.push_back(fiber.async_copies.size());
}

void emulated_cp_async_wait(int pending) {
  cuda_emulator::Fiber& fiber = *cuda_emulator::executor().running;
  while (fiber.async_group_ends.size() > static_cast<size_t>(pending)) {
    const size_t end = fiber.async_group_ends.front();
    for (size_t i = 0; i < end; ++i) {
      const cuda_emulator::AsyncCopy& copy = fiber.async_copies[i];
      if (copy.present) std::memcpy(copy.shared, copy.global, 16);
      else std::memset(copy.shared, 0, 16);
    }
    fiber.async_copies.erase(fiber.async_copies.begin(), fiber.async_copies.begin() + end);
    fiber.async_group_ends.erase(fiber.async_group_ends.begin());
    for (size_t& group_end : fiber.async_group_ends) group_end -= end;
  }
}

using cuda_emulator::fail;
using cuda_emulator::last_error;
using cuda_emulator::sticky_error;

// ---- runtime API ------------------------------------------------------------------------------

namespace {

// Each code's name and message, as the CUDA runtime and cuBLAS give them.
template <typename Code>
struct Described {
  Code code;
  const char* name;
  const char* text;
};

const Described<cudaError_t> kCudaErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInvalidConfiguration, "cudaErrorInvalidConfiguration", "invalid configuration argument"},
    {cudaErrorInvalidDeviceFunction, "cudaErrorInvalidDeviceFunction", "invalid device function"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress", "an illegal memory access was encountered"},
    {cudaErrorLaunchOutOfResources, "cudaErrorLaunchOutOfResources", "too many resources requested for launch"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {cudaErrorMisalignedAddress, "cudaErrorMisalignedAddress", "misaligned address"},
    {cudaErrorStreamCaptureUnsupported, "cudaErrorStreamCaptureUnsupported",
     "operation not permitted when stream is capturing"},
    {cudaErrorStreamCaptureInvalidated, "cudaErrorStreamCaptureInvalidated",
     "operation failed due to a previous error during capture"},
};

const Described<cublasStatus_t> kCublasStatuses[] = {
    {CUBLAS_STATUS_SUCCESS, "CUBLAS_STATUS_SUCCESS", "success"},
    {CUBLAS_STATUS_NOT_INITIALIZED, "CUBLAS_STATUS_NOT_INITIALIZED", "the library was not initialized"},
    {CUBLAS_STATUS_ALLOC_FAILED, "CUBLAS_STATUS_ALLOC_FAILED", "the resource allocation failed"},
    {CUBLAS_STATUS_INVALID_VALUE, "CUBLAS_STATUS_INVALID_VALUE", "an invalid numeric value was used as an argument"},
    {CUBLAS_STATUS_NOT_SUPPORTED, "CUBLAS_STATUS_NOT_SUPPORTED", "the functionality requested is not supported"},
};

template <typename Code, size_t N>
const Described<Code>* describe(const Described<Code> (&table)[N], Code code) {
  for (const auto& entry : table)
    if (entry.code == code) return &entry;
  return nullptr;
}

}  // namespace

const char* cudaGetErrorName(cudaError_t error) {
  const auto* found = describe(kCudaErrors, error);
  return found ? found->name : "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  const auto* found = describe(kCudaErrors, error);
  return found ? found->text : "unknown error";
}

cudaError_t cudaGetLastError() {
  if (sticky_error() != cudaSuccess) return sticky_error();
  const cudaError_t error = last_error();
  last_error() = cudaSuccess;
  return error;
}

// One device, or CUDA_EMULATOR_DEVICES (the tests of sharded engines run a process per "GPU", each
// using its device 0 as a GPU of CUDA_VISIBLE_DEVICES would).
cudaError_t cudaGetDeviceCount(int* count) {
  const char* devices = std::getenv("CUDA_EMULATOR_DEVICES");
  *count = devices ? std::max(1, std::atoi(devices)) : 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "CUDA emulator on the CPU");
  prop->totalGlobalMem = cuda_emulator::device_memory().capacity;
  prop->major = 9, prop->minor = 0, prop->multiProcessorCount = 132;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return fail(cudaErrorInvalidValue);
  *value = cuda_emulator::kOptInShared;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  const cuda_emulator::KernelResources* resources = cuda_emulator::kernel_resources(kernel);
  if (!resources) return fail(cudaErrorInvalidDeviceFunction);
  *attributes = cudaFuncAttributes{size_t(resources->static_shared), resources->max_threads(), resources->registers,
                                   resources->max_dynamic_shared};
  return cudaSuccess;
}

// As the runtime: the dynamic bytes allowed plus the kernel's static ones stay within the opt-in limit.
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  cuda_emulator::KernelResources* resources = cuda_emulator::kernel_resources(kernel);
  if (!resources) return fail(cudaErrorInvalidDeviceFunction);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value + resources->static_shared > cuda_emulator::kOptInShared)
    return fail(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  resources->max_dynamic_shared = value;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = nullptr;
  if (cudaError_t refused = cuda_emulator::refuse_while_capturing()) return refused;
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  auto& memory = cuda_emulator::device_memory();
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  if (rounded < bytes || memory.used + rounded > memory.capacity) return fail(cudaErrorMemoryAllocation);
  // The exact size (the rounding counts against the capacity only), so that AddressSanitizer, in the
  // sanitized build, reports a kernel's access past the end of an allocation.
  if (posix_memalign(ptr, 256, std::max<size_t>(bytes, 1)) != 0) {
    *ptr = nullptr;
    return fail(cudaErrorMemoryAllocation);
  }
  if (bytes <= cuda_emulator::kPoisonedAllocationBytes) std::memset(*ptr, 0xff, bytes);  // never zeros
  memory.used += rounded;
  memory.allocations[*ptr] = rounded;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  if (cudaError_t refused = cuda_emulator::refuse_while_capturing()) return refused;
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  cuda_emulator::run_pending();  // cudaFree waits for the device
  auto& memory = cuda_emulator::device_memory();
  auto found = memory.allocations.find(ptr);
  if (found == memory.allocations.end()) return fail(cudaErrorInvalidValue);
  memory.used -= found->second;
  memory.allocations.erase(found);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  *ptr = nullptr;
  if (cudaError_t refused = cuda_emulator::refuse_while_capturing()) return refused;
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  *ptr = std::aligned_alloc(256, rounded);
  if (!*ptr) return fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  cuda_emulator::pinned_allocations()[*ptr] = rounded;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  if (!ptr) return cudaSuccess;
  if (cudaError_t refused = cuda_emulator::refuse_while_capturing()) return refused;
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  cuda_emulator::run_pending();  // cudaFreeHost waits for the device
  cuda_emulator::pinned_allocations().erase(ptr);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  const auto& memory = cuda_emulator::device_memory();
  *free_bytes = memory.capacity - memory.used;
  *total_bytes = memory.capacity;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;  // an empty copy may name null pointers, as in CUDA
  // A captured copy is replayed later: it must name pinned host memory, never pageable.
  const bool pageable = (kind == cudaMemcpyHostToDevice && !cuda_emulator::is_pinned(src)) ||
                        (kind == cudaMemcpyDeviceToHost && !cuda_emulator::is_pinned(dst));
  if (stream && stream->capturing && pageable) {
    stream->capture_invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  // As CUDA: a copy from pageable host memory takes its bytes at the call; a copy into pageable
  // host memory returns when it is done; pinned memory is read and written when the copy runs.
  if (kind == cudaMemcpyHostToDevice && !cuda_emulator::is_pinned(src)) {
    std::vector<char> bytes_now(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
    return cuda_emulator::enqueue(stream, [dst, bytes_now = std::move(bytes_now)] {
      std::memcpy(dst, bytes_now.data(), bytes_now.size());
    });
  }
  const cudaError_t status = cuda_emulator::enqueue(stream, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  if (kind == cudaMemcpyDeviceToHost && pageable) cuda_emulator::run_pending();
  return status;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  *stream = new CUstream_st;
  cuda_emulator::streams().push_back(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  cuda_emulator::run_pending();
  auto& all = cuda_emulator::streams();
  all.erase(std::remove(all.begin(), all.end(), stream), all.end());
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (stream && stream->capturing) {  // as CUDA: illegal while capturing, and the capture is lost
    stream->capture_invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  cuda_emulator::run_pending();
  return sticky_error();
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  if (!stream || stream->capturing) return fail(cudaErrorInvalidValue);
  stream->capturing = true;
  stream->capture_invalidated = false;
  stream->captured.clear();
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  *graph = nullptr;
  if (!stream || !stream->capturing) return fail(cudaErrorInvalidValue);
  stream->capturing = false;
  if (stream->capture_invalidated) {
    stream->captured.clear();
    return fail(cudaErrorStreamCaptureInvalidated);
  }
  *graph = new CUgraph_st{std::move(stream->captured)};
  stream->captured.clear();
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (!graph) return fail(cudaErrorInvalidValue);
  *exec = new CUgraphExec_st{std::make_shared<const std::vector<std::function<void()>>>(graph->operations)};
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (!exec) return fail(cudaErrorInvalidResourceHandle);
  return cuda_emulator::enqueue(stream, [operations = exec->operations] {
    for (const auto& operation : *operations) operation();
  });
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  *event = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(cuda_emulator::device_mutex());
  if (stream && !stream->capturing) event->stream = stream, event->position = stream->enqueued;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  if (event->stream && event->stream->capturing) {  // waiting on work that is being recorded, not run
    event->stream->capture_invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  if (event->stream) cuda_emulator::run_until(event->stream, event->position);  // what came before it only
  return sticky_error();
}

// ---- cuBLAS ---------------------------------------------------------------------------------

namespace {

bool is_supported(cudaDataType_t type) { return type == CUDA_R_32F || type == CUDA_R_16F || type == CUDA_R_16BF; }

float load(const void* base, cudaDataType_t type, size_t i) {
  switch (type) {
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(base)[i]);
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

void store(void* base, cudaDataType_t type, size_t i, float value) {
  switch (type) {
    case CUDA_R_16F: static_cast<__half*>(base)[i] = __float2half_rn(value); return;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(value); return;
    default: static_cast<float*>(base)[i] = value;
  }
}

struct GemmShape {
  cublasOperation_t trans_a, trans_b;
  int m, n, k, lda, ldb, ldc;
  float alpha, beta;
};

// cuBLAS' own argument checks for one GEMM (column-major; op(A) is m x k, op(B) k x n, C m x n).
cublasStatus_t check(const GemmShape& s, cudaDataType_t a, cudaDataType_t b, cudaDataType_t c,
                     cublasComputeType_t compute) {
  auto op_ok = [](cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; };
  if (!op_ok(s.trans_a) || !op_ok(s.trans_b) || s.m < 0 || s.n < 0 || s.k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (s.lda < std::max(1, s.trans_a == CUBLAS_OP_N ? s.m : s.k) ||
      s.ldb < std::max(1, s.trans_b == CUBLAS_OP_N ? s.k : s.n) || s.ldc < std::max(1, s.m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (compute != CUBLAS_COMPUTE_32F || !is_supported(a) || a != b || !(c == a || c == CUDA_R_32F))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}

size_t element_size(cudaDataType_t type) { return type == CUDA_R_32F ? 4 : 2; }

// Which operand ("A", "B", "C") starts off a 16-byte boundary although its leading dimension keeps
// rows on them, or null. cuBLAS picks its kernels by alignment and runs such a GEMM on slower ones;
// the project keeps every such operand aligned (a chunk of rows that breaks it is a bug), so the
// emulator refuses it.
const char* misaligned_operand(const GemmShape& s, const void* a, cudaDataType_t a_type, const void* b,
                               cudaDataType_t b_type, const void* c, cudaDataType_t c_type) {
  auto off = [](const void* p, int ld, cudaDataType_t type) {
    return (size_t(ld) * element_size(type)) % 16 == 0 && reinterpret_cast<uintptr_t>(p) % 16 != 0;
  };
  if (off(a, s.lda, a_type)) return "A";
  if (off(b, s.ldb, b_type)) return "B";
  if (off(c, s.ldc, c_type)) return "C";
  return nullptr;
}

// C = alpha op(A) op(B) + beta C, float32 sums; C is not read when beta is 0.
void gemm(const GemmShape& s, const void* a, cudaDataType_t a_type, const void* b, cudaDataType_t b_type, void* c,
          cudaDataType_t c_type) {
  std::vector<float> op_a(size_t(s.m) * s.k), op_b(size_t(s.k) * s.n);  // op(A) row-major, op(B) column-major
  for (int i = 0; i < s.m; ++i)
    for (int p = 0; p < s.k; ++p)
      op_a[size_t(i) * s.k + p] =
          load(a, a_type, s.trans_a == CUBLAS_OP_N ? i + size_t(p) * s.lda : p + size_t(i) * s.lda);
  for (int j = 0; j < s.n; ++j)
    for (int p = 0; p < s.k; ++p)
      op_b[size_t(j) * s.k + p] =
          load(b, b_type, s.trans_b == CUBLAS_OP_N ? p + size_t(j) * s.ldb : j + size_t(p) * s.ldb);
  for (int j = 0; j < s.n; ++j)
    for (int i = 0; i < s.m; ++i) {
      float sum = 0.0f;
      for (int p = 0; p < s.k; ++p) sum += op_a[size_t(i) * s.k + p] * op_b[size_t(j) * s.k + p];
      const size_t at = i + size_t(j) * s.ldc;
      store(c, c_type, at, s.alpha * sum + (s.beta != 0.0f ? s.beta * load(c, c_type, at) : 0.0f));
    }
}

}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void*, size_t) {
  return handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasGetVersion(cublasHandle_t handle, int* version) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  *version = 0;  // no cuBLAS: the emulator's own GEMMs
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  const auto* found = describe(kCublasStatuses, status);
  return found ? found->name : "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t status) {
  const auto* found = describe(kCublasStatuses, status);
  return found ? found->text : "unknown error";
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                   int n, int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                                   const void* B, cudaDataType Btype, int ldb, const void* beta, void* C,
                                   cudaDataType Ctype, int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  const GemmShape s{transa, transb, m, n, k, lda, ldb, ldc, *static_cast<const float*>(alpha),
                    *static_cast<const float*>(beta)};
  if (cublasStatus_t status = check(s, Atype, Btype, Ctype, computeType); status != CUBLAS_STATUS_SUCCESS)
    return status;
  if (const char* operand = misaligned_operand(s, A, Atype, B, Btype, C, Ctype)) {
    std::fprintf(stderr, "cuda emulator: cublasGemmEx: %s is not 16-byte aligned, though its rows are\n", operand);
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  cuda_emulator::enqueue(handle->stream, [=] { gemm(s, A, Atype, B, Btype, C, Ctype); });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* const Aarray[],
                                          cudaDataType Atype, int lda, const void* const Barray[], cudaDataType Btype,
                                          int ldb, const void* beta, void* const Carray[], cudaDataType Ctype, int ldc,
                                          int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  const GemmShape s{transa, transb, m, n, k, lda, ldb, ldc, *static_cast<const float*>(alpha),
                    *static_cast<const float*>(beta)};
  if (cublasStatus_t status = check(s, Atype, Btype, Ctype, computeType); status != CUBLAS_STATUS_SUCCESS)
    return status;
  if (batchCount < 0) return CUBLAS_STATUS_INVALID_VALUE;
  cuda_emulator::enqueue(handle->stream, [=] {  // the pointer arrays are device memory, read when it runs
    for (int i = 0; i < batchCount; ++i) {
      if (const char* operand = misaligned_operand(s, Aarray[i], Atype, Barray[i], Btype, Carray[i], Ctype)) {
        std::fprintf(stderr, "cuda emulator: cublasGemmBatchedEx: %s[%d] is not 16-byte aligned, though its rows are\n",
                     operand, i);
        sticky_error() = cudaErrorMisalignedAddress;
        return;
      }
      gemm(s, Aarray[i], Atype, Barray[i], Btype, Carray[i], Ctype);
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                                 const cublasOperation_t transb_array[], const int m_array[],
                                                 const int n_array[], const int k_array[], const void* alpha_array,
                                                 const void* const Aarray[], cudaDataType_t Atype,
                                                 const int lda_array[], const void* const Barray[],
                                                 cudaDataType_t Btype, const int ldb_array[], const void* beta_array,
                                                 void* const Carray[], cudaDataType_t Ctype, const int ldc_array[],
                                                 int group_count, const int group_size[],
                                                 cublasComputeType_t computeType) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  std::vector<GemmShape> shapes;  // the host arrays are read now, as cuBLAS reads them
  std::vector<int> sizes(group_size, group_size + group_count);
  for (int g = 0; g < group_count; ++g) {
    const GemmShape s{transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g], lda_array[g],
                      ldb_array[g], ldc_array[g], static_cast<const float*>(alpha_array)[g],
                      static_cast<const float*>(beta_array)[g]};
    if (cublasStatus_t status = check(s, Atype, Btype, Ctype, computeType); status != CUBLAS_STATUS_SUCCESS)
      return status;
    if (sizes[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
    shapes.push_back(s);
  }
  cuda_emulator::enqueue(handle->stream, [=] {
    for (int g = 0, i = 0; g < group_count; ++g)
      for (int j = 0; j < sizes[g]; ++j, ++i) gemm(shapes[g], Aarray[i], Atype, Barray[i], Btype, Carray[i], Ctype);
  });
  return CUBLAS_STATUS_SUCCESS;
}
