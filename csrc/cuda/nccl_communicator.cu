// NCCL as the communicator of a sharded engine's GPU rank (core/communicator.h). The library is opened
// at run time from the path or name given (the nvidia-nccl wheel's libnccl.so.2, or the system's), so
// that the backend library neither links NCCL nor needs it until a sharded engine asks. The few entry
// points used are declared here as NCCL's C API (nccl.h) defines them: a 128-byte group id, an opaque
// communicator, enums as int (ncclSuccess 0; ncclSum 0; ncclFloat16 6, ncclFloat32 7, ncclBfloat16 9).
// all_reduce_sum is ncclAllReduce in place on the backend's stream: a stream being captured records it
// in the graph, so a recorded decode step replays its all-reduces. abort() is ncclCommAbort, called
// from another thread when a rank is gone: NCCL's kernels waiting for it then return (without an
// error: the caller must not trust what they computed, parallel.py does not). NCCL forbids two threads
// in one communicator, so abort() first marks it aborted and waits out an all-reduce being enqueued
// (no later one starts); and since ncclCommAbort waits for the graphs that recorded the communicator to
// be destroyed, which happens when the engine is, it runs on a thread of its own.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include "cuda/nccl_communicator.cuh"

namespace mixtral::cuda {

namespace {

struct NcclUniqueId {
  char internal[128];
};
typedef struct ncclComm* NcclComm;
constexpr int kNcclSuccess = 0, kNcclSum = 0, kNcclFloat16 = 6, kNcclFloat32 = 7, kNcclBfloat16 = 9;

struct NcclApi {
  int (*get_unique_id)(NcclUniqueId* id);
  int (*comm_init_rank)(NcclComm* comm, int world_size, NcclUniqueId id, int rank);
  int (*all_reduce)(const void* send, void* receive, size_t count, int dtype, int op, NcclComm comm,
                    cudaStream_t stream);
  int (*comm_destroy)(NcclComm comm);
  int (*comm_abort)(NcclComm comm);
  const char* (*error_string)(int result);
};

// The library's entry points, opened once per path (and never closed: communicators may outlive callers).
const NcclApi& nccl_api(const std::string& library) {
  static std::mutex mutex;
  static std::map<std::string, NcclApi> opened;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = opened.find(library);
  if (found != opened.end()) return found->second;
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  MX_CHECK(handle, DeviceError, "cannot open NCCL ('" << library << "'): " << dlerror());
  auto symbol = [&](const char* name) {
    void* address = dlsym(handle, name);
    MX_CHECK(address, DeviceError, "NCCL ('" << library << "') has no " << name);
    return address;
  };
  NcclApi api;
  api.get_unique_id = reinterpret_cast<decltype(api.get_unique_id)>(symbol("ncclGetUniqueId"));
  api.comm_init_rank = reinterpret_cast<decltype(api.comm_init_rank)>(symbol("ncclCommInitRank"));
  api.all_reduce = reinterpret_cast<decltype(api.all_reduce)>(symbol("ncclAllReduce"));
  api.comm_destroy = reinterpret_cast<decltype(api.comm_destroy)>(symbol("ncclCommDestroy"));
  api.comm_abort = reinterpret_cast<decltype(api.comm_abort)>(symbol("ncclCommAbort"));
  api.error_string = reinterpret_cast<decltype(api.error_string)>(symbol("ncclGetErrorString"));
  return opened.emplace(library, api).first->second;
}

int nccl_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return kNcclFloat32;
    case DType::kBFloat16: return kNcclBfloat16;
    case DType::kFloat16: return kNcclFloat16;
    default: throw ShapeError(std::string("all_reduce_sum: no NCCL sum of ") + dtype_name(dtype));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const NcclApi& api, const NcclUniqueId& id, int rank, int world_size, cudaStream_t stream)
      : api_(api), rank_(rank), world_size_(world_size), stream_(stream) {
    const int result = api_.comm_init_rank(&comm_, world_size, id, rank);
    MX_CHECK(result == kNcclSuccess, CollectiveError,
             "NCCL: rank " << rank << " of " << world_size << " could not join: " << api_.error_string(result));
  }
  ~NcclCommunicator() override {
    if (!aborted_.exchange(true)) api_.comm_destroy(comm_);
  }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  void all_reduce_sum(Tensor& t) override {
    MX_CHECK(t.device == Device::kCuda && t.contiguous(), ShapeError,
             "all_reduce_sum: a contiguous GPU tensor expected, got " << t.describe());
    const int dtype = nccl_dtype(t.dtype);
    std::lock_guard<std::mutex> lock(enqueueing_);
    MX_CHECK(!aborted_, CollectiveError, "NCCL: the group was aborted (a rank is gone)");
    const int result = api_.all_reduce(t.data, t.data, size_t(t.numel()), dtype, kNcclSum, comm_, stream_);
    MX_CHECK(result == kNcclSuccess, CollectiveError,
             "NCCL all-reduce on rank " << rank_ << " of " << world_size_ << ": " << api_.error_string(result));
  }
  void abort() override {
    if (aborted_.exchange(true)) return;
    { std::lock_guard<std::mutex> wait_for_enqueue(enqueueing_); }
    std::thread([abort = api_.comm_abort, comm = comm_] { abort(comm); }).detach();
  }

 private:
  const NcclApi& api_;
  int rank_, world_size_;
  cudaStream_t stream_;
  NcclComm comm_ = nullptr;
  std::atomic<bool> aborted_{false};  // the communicator is gone: aborted, or destroyed
  std::mutex enqueueing_;             // held while an all-reduce is enqueued
};

}  // namespace

std::string nccl_unique_id(const std::string& nccl_library) {
  const NcclApi& api = nccl_api(nccl_library);
  NcclUniqueId id;
  const int result = api.get_unique_id(&id);
  MX_CHECK(result == kNcclSuccess, DeviceError, "NCCL: no group id: " << api.error_string(result));
  return std::string(id.internal, sizeof(id.internal));
}

std::shared_ptr<Communicator> make_nccl_communicator(const std::string& nccl_library, const std::string& id, int rank,
                                                     int world_size, cudaStream_t stream) {
  MX_CHECK(id.size() == sizeof(NcclUniqueId), Error,
           "NCCL: a group id is " << sizeof(NcclUniqueId) << " bytes, got " << id.size());
  MX_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, Error,
           "NCCL: rank " << rank << " outside a world of " << world_size);
  NcclUniqueId unique;
  std::copy(id.begin(), id.end(), unique.internal);
  return std::make_shared<NcclCommunicator>(nccl_api(nccl_library), unique, rank, world_size, stream);
}

}  // namespace mixtral::cuda
