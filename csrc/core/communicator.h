// Collectives between the ranks of a sharded (tensor-parallel) engine: each rank holds a slice of
// every layer and the ranks sum their partial outputs twice a layer (engine/forward.cpp).
// A communicator lives beside a backend and works on that backend's device: the CPU's is a callback
// into torch.distributed's gloo group (bindings/module.cpp, PythonCommunicator); the GPU's is NCCL
// enqueued on the backend's stream, so that a recorded decode step records its all-reduces too
// (Backend::create_communicator, cuda/nccl_communicator.cu).
#pragma once

#include "core/tensor.h"

namespace mixtral {

class MX_EXPORT Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // t = the sum of every rank's t, in place, each rank ending with the same bytes. t is contiguous on
  // the backend's device, in a float dtype; every rank calls this in the same order with the same
  // shape. Enqueued behind the backend's earlier work. Throws CollectiveError when a rank is gone.
  virtual void all_reduce_sum(Tensor& t) = 0;
  // Called from another thread when a rank is gone: the collectives under way stop waiting for it
  // (NCCL's kernels would wait forever; what they computed is then garbage) and later ones fail.
  // Returns without waiting for the abort to end. A communicator whose collectives fail on their
  // own when a rank goes (gloo's) has nothing to do.
  virtual void abort() {}
};

}  // namespace mixtral
