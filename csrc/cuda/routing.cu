// Routing and permutation: router_topk, moe_permute and the fused route (also inside moe and add_rmsnorm_moe) of
// core/backend.h, and the pointer arrays of the batched expert GEMMs; launch_router_topk, launch_moe_permute,
// launch_route, launch_expert_pointers of cuda/kernels.cuh. Layouts as in core/backend.h (Routing); pointer arrays
// as in ExpertGemmPointers (cuda/kernels.cuh).
//
// router_topk_kernel:
//   grid:   one thread per token: ceil(T / 128) blocks.
//   block:  128 threads; thread t routes token t.
//   shared: none.
//   phases: 1. Softmax over the E logits (max, then denominator).
//           2. k rounds: the most probable expert not yet taken (ties to the lower id).
//           3. The k weights renormalised by their sum.
//
// moe_permute_kernel (expanded rows grouped by expert, stable in the row index):
//   grid:   one block.
//   block:  32 * min(32, E) threads; warp w takes experts w, w + warps, ...
//   shared: dynamic counts int32 [E + 1], then, when both fit in 48 KiB (kDefaultSharedBytes), a copy of the expert
//           ids int32 [R]: 4 * (E + 1) or 4 * (E + 1 + R) bytes.
//   phases: 1. Staged: the ids copied into shared memory (one coalesced read, where the two passes below would each
//              wait on global loads).
//           2. Each warp counts its expert's rows, 32 rows a ballot; thread 0 prefix-sums the counts into offsets.
//           3. Each warp scans the rows again in order and places its expert's rows by ballot rank, so the order
//              within an expert is the row order; both row maps written.
//
// route_kernel (decode: norm, router matmul, top-k, grouping, gather and pointer arrays in one block):
//   grid:   one block.
//   block:  kRouteThreads (1024) threads: 32 warps for the dot products, thread t routes token t.
//   shared: static partial and logits float [kFusedRouteMaxTokens * kFusedRouteMaxExperts] each (1 KiB each),
//           counts int32 [kFusedRouteMaxExperts + 1], block_sum's float[32]: about 2.3 KiB; no dynamic.
//   phases: 1. With a norm (its residual not null): add_rmsnorm of each token's residual row, making x.
//           2. The T * E dot products x . router[e] (pairs) split into slices of H so that every warp has one (a
//              pair per warp when pairs outnumber warps); warp sums, then each pair's slices summed in slice order
//              (a fixed order): logits, written out and kept in shared memory.
//           3. Thread t routes token t as router_topk_kernel does.
//           4. The T * k rows grouped by expert as in moe_permute_kernel (ids read from global memory).
//           5. The rows gathered into `gathered`; the jobs' pointer arrays written per permuted row.
//
// expert_pointers_kernel (the pointer arrays alone: expert_matmul's batched path, moe after an unfused route):
//   grid:   one thread per permuted row: ceil(R / 128) blocks.
//   block:  128 threads.
//   shared: none.
//   phases: 1. Binary search for the last e with offsets[e] <= r (empty experts skipped).
//           2. a[r], b[r], c[r] of each job written for expert e.
//
// Limits: route_kernel at most kFusedRouteMaxTokens (8) tokens and kFusedRouteMaxExperts (32) experts (its static
// shared arrays are sized by them), kWidth 16 bytes only when H and x, router, gathered allow; moe_permute_kernel
// is one block for any R (its staging for R up to about 12k).
#include <algorithm>
#include <cfloat>

#include "cuda/cuda_check.cuh"
#include "cuda/device_common.cuh"
#include "cuda/kernels.cuh"

namespace mixtral::cuda {

namespace {

// Softmax over the E logits of one token, top-k (ties to the lower id), renormalised.
__device__ void route_token(const float* row, int num_experts, int k, int32_t* ids, float* w) {
  float max_logit = row[0];
  for (int e = 1; e < num_experts; ++e) max_logit = fmaxf(max_logit, row[e]);
  float denom = 0.0f;
  for (int e = 0; e < num_experts; ++e) denom += expf(row[e] - max_logit);
  float chosen_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float best_prob = 0.0f;
    for (int e = 0; e < num_experts; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= ids[i] == e;
      const float prob = expf(row[e] - max_logit) / denom;
      if (!taken && (best < 0 || prob > best_prob)) best = e, best_prob = prob;
    }
    ids[j] = best;
    chosen_sum += (w[j] = best_prob);
  }
  for (int j = 0; j < k; ++j) w[j] /= chosen_sum;
}

__global__ void router_topk_kernel(const float* logits, int64_t tokens, int num_experts, int k,
                                   int32_t* expert_ids, float* weights) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < tokens) route_token(logits + t * num_experts, num_experts, k, expert_ids + t * k, weights + t * k);
}

// The whole block (a multiple of 32 threads); warp e (looping over experts) scans the rows in
// order, 32 at a time, and places its expert's rows with a ballot, so the order within an expert
// is the row order. counts: shared int32 [num_experts + 1].
__device__ void permute_rows(const int32_t* expert_ids, int64_t rows, int num_experts, int32_t* counts,
                             int32_t* offsets, int32_t* permuted_to_expanded, int32_t* expanded_to_permuted) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int e = warp; e < num_experts; e += warps) {
    int32_t count = 0;
    for (int64_t base = 0; base < rows; base += 32) {
      const bool mine = base + lane < rows && expert_ids[base + lane] == e;
      count += __popc(__ballot_sync(0xffffffffu, mine));
    }
    if (lane == 0) counts[e + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    counts[0] = 0;
    for (int e = 0; e < num_experts; ++e) counts[e + 1] += counts[e];
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= num_experts; e += blockDim.x) offsets[e] = counts[e];
  for (int e = warp; e < num_experts; e += warps) {
    int32_t next = counts[e];
    for (int64_t base = 0; base < rows; base += 32) {
      const bool mine = base + lane < rows && expert_ids[base + lane] == e;
      const unsigned ballot = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int32_t r = next + __popc(ballot & ((1u << lane) - 1));
        permuted_to_expanded[r] = static_cast<int32_t>(base + lane);
        expanded_to_permuted[base + lane] = r;
      }
      next += __popc(ballot);
    }
  }
}

// staged: the expert ids copied after the counts in dynamic shared memory (the launcher decides).
__global__ void moe_permute_kernel(const int32_t* expert_ids, int64_t rows, int num_experts, bool staged,
                                   int32_t* offsets, int32_t* permuted_to_expanded, int32_t* expanded_to_permuted) {
  int32_t* counts = dynamic_shared_memory<int32_t>();
  const int32_t* ids = expert_ids;
  if (staged) {
    int32_t* copy = counts + num_experts + 1;
    for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) copy[i] = expert_ids[i];
    __syncthreads();
    ids = copy;
  }
  permute_rows(ids, rows, num_experts, counts, offsets, permuted_to_expanded, expanded_to_permuted);
}

// Permuted row r of expert e in each job's pointer arrays (ExpertGemmPointers).
__device__ __forceinline__ void write_expert_pointers(const ExpertPointerJobs& jobs, int64_t r, int expert) {
  for (int g = 0; g < jobs.count; ++g) {
    const ExpertGemmPointers& p = jobs.gemm[g];
    p.a[r] = p.w + size_t(expert) * p.n * p.k * p.in_element;
    p.b[r] = p.x + size_t(r) * p.k * p.in_element;
    p.c[r] = p.out + size_t(r) * p.n * p.out_element;
  }
}

constexpr int kRouteThreads = 1024;
constexpr int kRouteMaxPairs = int(kFusedRouteMaxTokens) * kFusedRouteMaxExperts;

// kWidth: elements per load of x, router and gathered, kPack16<T> (16 bytes) when H and the pointers allow, else 1.
template <typename T, int kWidth>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const T* x, const T* router, int tokens, int64_t hidden, int num_experts, int k, float* logits,
                 int32_t* expert_ids, float* weights, int32_t* offsets, int32_t* permuted_to_expanded,
                 int32_t* expanded_to_permuted, T* gathered, ExpertPointerJobs jobs, RouteNormPointers<T> norm) {
  if (norm.residual) {
    for (int t = 0; t < tokens; ++t) {
      const T* delta = norm.delta + t * hidden;
      add_rmsnorm_row(norm.residual + t * hidden, [&](int64_t i) { return to_f32(delta[i]); }, true, norm.weight,
                      norm.eps, norm.out + t * hidden, hidden);
    }
    __syncthreads();  // x (norm.out) is written
  }
  __shared__ float partial[kRouteMaxPairs];
  __shared__ float logits_shared[kRouteMaxPairs];
  __shared__ int32_t counts[kFusedRouteMaxExperts + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int pairs = tokens * num_experts;
  const int slices = max(1, warps / pairs);  // per pair
  const int64_t packs = hidden / kWidth;
  for (int item = warp; item < pairs * slices; item += warps) {
    const int pair = item / slices, slice = item % slices;
    const T* x_row = x + (pair / num_experts) * hidden;
    const T* w_row = router + (pair % num_experts) * hidden;
    float sum = 0.0f;
#pragma unroll 4
    for (int64_t p = packs * slice / slices + lane; p < packs * (slice + 1) / slices; p += 32) {
      const Pack<T, kWidth> a = reinterpret_cast<const Pack<T, kWidth>*>(x_row)[p];
      const Pack<T, kWidth> b = reinterpret_cast<const Pack<T, kWidth>*>(w_row)[p];
      for (int j = 0; j < kWidth; ++j) sum += to_f32(a.values[j]) * to_f32(b.values[j]);
    }
    sum = warp_sum(sum);
    if (lane == 0) partial[item] = sum;
  }
  __syncthreads();
  for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    float sum = 0.0f;
    for (int slice = 0; slice < slices; ++slice) sum += partial[pair * slices + slice];
    logits_shared[pair] = logits[pair] = sum;
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < tokens) route_token(logits_shared + t * num_experts, num_experts, k, expert_ids + t * k, weights + t * k);
  __syncthreads();  // the expert ids are written
  permute_rows(expert_ids, int64_t(tokens) * k, num_experts, counts, offsets, permuted_to_expanded,
               expanded_to_permuted);
  __syncthreads();  // the row map is written
  using Vec = Pack<T, kWidth>;
  for (int64_t idx = threadIdx.x; idx < tokens * k * packs; idx += blockDim.x) {
    const int64_t r = idx / packs, p = idx % packs;
    reinterpret_cast<Vec*>(gathered + r * hidden)[p] =
        reinterpret_cast<const Vec*>(x + (permuted_to_expanded[r] / k) * hidden)[p];
  }
  for (int r = threadIdx.x; r < tokens * k; r += blockDim.x)
    write_expert_pointers(jobs, r, expert_ids[permuted_to_expanded[r]]);
}

__global__ void expert_pointers_kernel(const int32_t* offsets, int num_experts, int64_t rows,
                                       ExpertPointerJobs jobs) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  int low = 0, high = num_experts - 1;  // the last e with offsets[e] <= r (empty experts skipped)
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (offsets[mid] <= r) low = mid;
    else high = mid - 1;
  }
  write_expert_pointers(jobs, r, low);
}

}  // namespace

void launch_router_topk(const float* logits, int64_t tokens, int num_experts, int k, int32_t* expert_ids,
                        float* weights, cudaStream_t stream) {
  if (tokens == 0) return;
  launch(router_topk_kernel, blocks_for(tokens, 128), 128, 0, stream, logits, tokens, num_experts, k, expert_ids,
         weights);
}

template <typename T>
void launch_route(const T* x, const T* router, int64_t tokens, int64_t hidden, int num_experts, int k, float* logits,
                  int32_t* expert_ids, float* weights, int32_t* expert_offsets, int32_t* permuted_to_expanded,
                  int32_t* expanded_to_permuted, T* gathered, const ExpertPointerJobs& jobs,
                  const RouteNormPointers<T>& norm, cudaStream_t stream) {
  MX_CHECK(tokens >= 1 && tokens <= kFusedRouteMaxTokens && num_experts <= kFusedRouteMaxExperts, ShapeError,
           "cuda route: " << tokens << " tokens over " << num_experts << " experts is not for the fused kernel");
  dispatch_pack_width<T>(hidden, {x, router, gathered}, [&](auto pack) {
    launch(route_kernel<T, decltype(pack)::value>, 1, kRouteThreads, 0, stream, x, router, static_cast<int>(tokens),
           hidden, num_experts, k, logits, expert_ids, weights, expert_offsets, permuted_to_expanded,
           expanded_to_permuted, gathered, jobs, norm);
  });
}

void launch_moe_permute(const int32_t* expert_ids, int64_t rows, int num_experts, int32_t* expert_offsets,
                        int32_t* permuted_to_expanded, int32_t* expanded_to_permuted, cudaStream_t stream) {
  const int threads = 32 * std::min(32, num_experts);
  const size_t counts_bytes = sizeof(int32_t) * (num_experts + 1), staged_bytes = counts_bytes + sizeof(int32_t) * rows;
  const bool staged = staged_bytes <= kDefaultSharedBytes;
  launch(moe_permute_kernel, 1, threads, staged ? staged_bytes : counts_bytes, stream, expert_ids, rows, num_experts,
         staged, expert_offsets, permuted_to_expanded, expanded_to_permuted);
}

void launch_expert_pointers(const int32_t* expert_offsets, int num_experts, int64_t rows,
                            const ExpertPointerJobs& jobs, cudaStream_t stream) {
  if (rows == 0) return;
  launch(expert_pointers_kernel, blocks_for(rows, 128), 128, 0, stream, expert_offsets, num_experts, rows, jobs);
}

#define MX_INSTANTIATE(T) \
  template void launch_route<T>(const T*, const T*, int64_t, int64_t, int, int, float*, int32_t*, float*, \
                                int32_t*, int32_t*, int32_t*, T*, const ExpertPointerJobs&, \
                                const RouteNormPointers<T>&, cudaStream_t);

MX_INSTANTIATE(float)
MX_INSTANTIATE(__nv_bfloat16)
MX_INSTANTIATE(__half)
#undef MX_INSTANTIATE

}  // namespace mixtral::cuda
