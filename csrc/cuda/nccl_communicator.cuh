// The GPU's communicator (core/communicator.h): NCCL, opened at run time (cuda/nccl_communicator.cu).
#pragma once

#include <memory>
#include <string>

#include "core/communicator.h"
#include "cuda/cuda_check.cuh"

namespace mixtral::cuda {

// A new NCCL group id (ncclGetUniqueId: 128 bytes, with rank 0's bootstrap address in it).
std::string nccl_unique_id(const std::string& nccl_library);
// This process's member of the group of `id` as rank `rank` of `world_size`; its all-reduces are
// enqueued on `stream`. Returns once every rank has joined.
std::shared_ptr<Communicator> make_nccl_communicator(const std::string& nccl_library, const std::string& id, int rank,
                                                     int world_size, cudaStream_t stream);

}  // namespace mixtral::cuda
