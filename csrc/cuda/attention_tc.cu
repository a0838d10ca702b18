// Prefill attention on the tensor cores, flash-attention style: the attention op of core/backend.h for more than
// kSplitMaxTokens tokens in bfloat16 or float16; launch_attention_tensor_cores of cuda/kernels.cuh (launch_attention
// calls it when tensor_cores is set). Layouts as in core/backend.h; the (token, query head) pairs of KV head g are
// rows r = token * group + h, group = Hq / Hkv.
//
// attention_tensor_cores_kernel:
//   grid:   one block per (64 rows, KV head): (ceil(T * group / 64), Hkv), so a group's query heads share every
//           K/V tile.
//   block:  4 warps (128 threads), 16 rows each; Q (A fragments), O and the softmax state stay in registers, the
//           4 lanes of a quad holding a row's columns; all threads load the tiles.
//   shared: static int32 warp_last[4]; dynamic [2 stages][K, V][64 positions][D + 8] T, 2 * 2 * 64 * (D + 8) *
//           sizeof(T): 36 KiB (D 64) or 68 KiB (D 128), opted in past 48 KiB; rows padded by 16 bytes so that the
//           8 rows of an ldmatrix fall on distinct banks.
//   phases: 1. Q fragments from qkv (rows past the end: position -1, fully masked, never stored); the block's last
//              attended position sets the tile count.
//           2. Per 64-position tile, the next loading by cp.async meanwhile (two stages); a warp whose rows all end
//              before the tile skips it: S = Q K^T by mma.sync m16n8k16 (cuda/ptx.cuh), float32 accumulation.
//           3. Causal mask (column position > the row's: -inf), online softmax in base 2 (scale log2(e) / sqrt(D)).
//           4. O += P V, P reused from S's registers as the A operand.
//           5. Row sums summed over the quad; out = O / row sum, rounded to T.
//
// Limits: elements bfloat16 or float16; D 64 or 128, else launch_attention_tensor_cores returns false and
// launches nothing (as when the tiles pass the opt-in shared memory limit); cache rows 16-byte aligned (cp.async).
#include <cfloat>
#include <cmath>

#include "cuda/cuda_check.cuh"
#include "cuda/kernels.cuh"
#include "cuda/ptx.cuh"

namespace mixtral::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kBlockRows = 16 * kWarps;  // (token, query head) rows per block
constexpr int kTilePositions = 64;       // cached positions per K/V tile

template <int D>
constexpr int kPaddedRow = D + 8;  // shared-memory row stride of the K/V tiles, in elements

template <typename T, int D>
constexpr size_t shared_bytes() {
  return 2 * 2 * kTilePositions * kPaddedRow<D> * sizeof(T);
}

// D = head_dim at compile time: Q's fragments q[D / 16] and O's tiles o[D / 8] are register arrays sized by it.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
    attention_tensor_cores_kernel(const T* qkv, int64_t width, int64_t tokens, int q_heads, int kv_heads,
                        const int32_t* positions, const T* k_pool, const T* v_pool, const int32_t* page_table,
                        int page_size, float scale_log2, T* out) {
  constexpr int kStride = kPaddedRow<D>;
  constexpr int kScoreTiles = kTilePositions / 8;  // 8-position column tiles of S
  constexpr int kOutTiles = D / 8;                 // 8-wide column tiles of O
  T* stages = dynamic_shared_memory<T>();
  __shared__ int32_t warp_last[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int quad_row = lane / 4, quad_col = lane % 4;  // g and c of the fragment layouts
  const int group = q_heads / kv_heads, g = blockIdx.y;
  const int64_t rows = tokens * group;

  // This lane's two rows of the warp's 16: quad_row and quad_row + 8. Rows past the end have
  // position -1: fully masked, never stored.
  int64_t row_token[2];
  int row_head[2];
  int32_t row_position[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t row = int64_t(blockIdx.x) * kBlockRows + warp * 16 + quad_row + 8 * i;
    const bool valid = row < rows;
    row_token[i] = valid ? row / group : 0;
    row_head[i] = g * group + (valid ? static_cast<int>(row % group) : 0);
    row_position[i] = valid ? positions[row_token[i]] : -1;
  }
  // Q as A fragments, one per 16 columns of head_dim.
  uint32_t q[D / 16][4];
  for (int s = 0; s < D / 16; ++s)
    for (int j = 0; j < 4; ++j) {
      const int i = j % 2, column = s * 16 + 2 * quad_col + 8 * (j / 2);
      q[s][j] = row_position[i] >= 0 ? *reinterpret_cast<const uint32_t*>(qkv + row_token[i] * width +
                                                                          int64_t(row_head[i]) * D + column)
                                     : 0u;
    }
  // The last position any row of the warp (of the block) attends to.
  int32_t last = max(row_position[0], row_position[1]);
  for (int offset = 16; offset > 0; offset /= 2) last = max(last, __shfl_xor_sync(0xffffffffu, last, offset));
  if (lane == 0) warp_last[warp] = last;
  __syncthreads();
  const int32_t warp_max_position = last;
  for (int w = 0; w < kWarps; ++w) last = max(last, warp_last[w]);
  const int tiles = last / kTilePositions + 1;

  // Cached positions of tile `tile` into stage `stage`; positions past `last` are zero.
  auto load_tile = [&](int tile, int stage) {
    T* k_tile = stages + stage * 2 * kTilePositions * kStride;
    T* v_tile = k_tile + kTilePositions * kStride;
    constexpr int kChunks = D / kPack16<T>;  // 16-byte chunks per row
    for (int idx = threadIdx.x; idx < kTilePositions * kChunks; idx += blockDim.x) {
      const int p = idx / kChunks, d = idx % kChunks * kPack16<T>;
      const int64_t pos = int64_t(tile) * kTilePositions + p;
      const bool present = pos <= last;
      const int64_t offset = present ? cache_offset(page_table, page_size, kv_heads, g, pos, D) + d : 0;
      cp_async_16(k_tile + p * kStride + d, k_pool + offset, present);
      cp_async_16(v_tile + p * kStride + d, v_pool + offset, present);
    }
    cp_async_commit();
  };

  float o[kOutTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // row_sum: this lane's columns
  load_tile(0, 0);
  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) {
      load_tile(tile + 1, (tile + 1) % 2);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this tile have landed
    const int64_t start = int64_t(tile) * kTilePositions;
    if (start <= warp_max_position) {
      const T* k_tile = stages + (tile % 2) * 2 * kTilePositions * kStride;
      const T* v_tile = k_tile + kTilePositions * kStride;

      // S = Q K^T: K rows are positions (n), so ldmatrix without .trans gives B fragments;
      // matrices 0, 1 are columns 0-7, 8-15 of k-step s for positions n..n+7, 2, 3 for n+8..n+15.
      float scores[kScoreTiles][4] = {};
      for (int s = 0; s < D / 16; ++s)
        for (int n = 0; n < kScoreTiles; n += 2) {
          uint32_t b[4];
          ldmatrix_x4<false>(b, k_tile + (n * 8 + lane / 16 * 8 + lane % 8) * kStride + s * 16 + lane / 8 % 2 * 8);
          mma_16x8x16<T>(scores[n], q[s], b[0], b[1]);
          mma_16x8x16<T>(scores[n + 1], q[s], b[2], b[3]);
        }

      // Online softmax in base 2; the four lanes of a quad hold a row's columns.
      float tile_max[2] = {-INFINITY, -INFINITY};
      for (int n = 0; n < kScoreTiles; ++n)
        for (int j = 0; j < 4; ++j) {
          const int i = j / 2;
          const int64_t column = start + n * 8 + 2 * quad_col + j % 2;
          scores[n][j] = column <= row_position[i] ? scores[n][j] * scale_log2 : -INFINITY;
          tile_max[i] = fmaxf(tile_max[i], scores[n][j]);
        }
      float correction[2], reference[2];
      for (int i = 0; i < 2; ++i) {
        for (int offset = 1; offset < 4; offset *= 2)
          tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], offset));
        const float new_max = fmaxf(row_max[i], tile_max[i]);
        reference[i] = new_max == -INFINITY ? 0.0f : new_max;  // a row with nothing visible yet
        correction[i] = exp2f(row_max[i] - reference[i]);
        row_max[i] = new_max;
        row_sum[i] *= correction[i];
      }
      for (int n = 0; n < kScoreTiles; ++n)
        for (int j = 0; j < 4; ++j) {
          scores[n][j] = exp2f(scores[n][j] - reference[j / 2]);
          row_sum[j / 2] += scores[n][j];
        }
      for (int n = 0; n < kOutTiles; ++n)
        for (int j = 0; j < 4; ++j) o[n][j] *= correction[j / 2];

      // O += P V: P's accumulator tiles 2t and 2t + 1 are the A fragment of positions 16t..16t+15;
      // V rows are positions (k), so ldmatrix .trans gives B fragments; matrices 0, 1 are positions
      // 16t..+7, 16t+8..+15 of columns n..n+7, 2, 3 the same positions of columns n+8..n+15.
      for (int t = 0; t < kTilePositions / 16; ++t) {
        const uint32_t p[4] = {pack_pair<T>(scores[2 * t][0], scores[2 * t][1]),
                               pack_pair<T>(scores[2 * t][2], scores[2 * t][3]),
                               pack_pair<T>(scores[2 * t + 1][0], scores[2 * t + 1][1]),
                               pack_pair<T>(scores[2 * t + 1][2], scores[2 * t + 1][3])};
        for (int n = 0; n < kOutTiles; n += 2) {
          uint32_t b[4];
          ldmatrix_x4<true>(b, v_tile + (t * 16 + lane / 8 % 2 * 8 + lane % 8) * kStride + (n + lane / 16) * 8);
          mma_16x8x16<T>(o[n], p, b[0], b[1]);
          mma_16x8x16<T>(o[n + 1], p, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is no longer read before the next load into it
  }

  for (int i = 0; i < 2; ++i) {
    for (int offset = 1; offset < 4; offset *= 2) row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], offset);
    if (row_position[i] < 0) continue;
    T* destination = out + row_token[i] * int64_t(q_heads) * D + int64_t(row_head[i]) * D + 2 * quad_col;
    for (int n = 0; n < kOutTiles; ++n)
      *reinterpret_cast<uint32_t*>(destination + n * 8) =
          pack_pair<T>(o[n][2 * i] / row_sum[i], o[n][2 * i + 1] / row_sum[i]);
  }
}

template <typename T, int D>
bool launch_tc(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape, const int32_t* positions,
               const T* k_pool, const T* v_pool, const int32_t* page_table, int page_size, T* out, cudaStream_t stream) {
  constexpr size_t bytes = shared_bytes<T, D>();
  if (bytes > size_t(opt_in_shared_memory<attention_tensor_cores_kernel<T, D>>())) return false;
  const int64_t rows = tokens * (shape.num_heads / shape.num_kv_heads);
  const dim3 grid(static_cast<unsigned>((rows + kBlockRows - 1) / kBlockRows), shape.num_kv_heads);
  const float scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(double(D)));  // log2(e) / sqrt(D)
  launch(attention_tensor_cores_kernel<T, D>, grid, kWarps * 32, bytes, stream, qkv, width, tokens, shape.num_heads,
         shape.num_kv_heads, positions, k_pool, v_pool, page_table, page_size, scale_log2, out);
  return true;
}

}  // namespace

template <typename T>
bool launch_attention_tensor_cores(const T* qkv, int64_t tokens, int64_t width, const AttentionShape& shape,
                                   const int32_t* positions, const T* k_pool, const T* v_pool,
                                   const int32_t* page_table, int page_size, T* out, cudaStream_t stream) {
  if (tokens == 0) return true;
  if (shape.head_dim == 64)
    return launch_tc<T, 64>(qkv, tokens, width, shape, positions, k_pool, v_pool, page_table, page_size, out, stream);
  if (shape.head_dim == 128)
    return launch_tc<T, 128>(qkv, tokens, width, shape, positions, k_pool, v_pool, page_table, page_size, out, stream);
  return false;
}

template bool launch_attention_tensor_cores<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t,
                                                           const AttentionShape&, const int32_t*,
                                                           const __nv_bfloat16*, const __nv_bfloat16*, const int32_t*,
                                                           int, __nv_bfloat16*, cudaStream_t);
template bool launch_attention_tensor_cores<__half>(const __half*, int64_t, int64_t, const AttentionShape&,
                                                    const int32_t*, const __half*, const __half*, const int32_t*, int,
                                                    __half*, cudaStream_t);

}  // namespace mixtral::cuda
