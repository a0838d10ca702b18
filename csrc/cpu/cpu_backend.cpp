// CPU reference implementations of the operations (layouts in core/backend.h).
// Activations are widened to float32 once per op (F32Input), computed with
// float32 accumulation and rounded once into the output dtype (F32Output).
// Weights and KV pages are read in their own dtype through dispatch_float.
// Data-dependent indices (ids, positions, pages, expert ids) are bounds-checked
// here since they are host-readable; a bad one raises instead of reading wild memory.
#include "cpu/cpu_backend.h"

#include <omp.h>
#include <unistd.h>

#include <fstream>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "core/op_checks.h"

namespace mixtral {

namespace {

// Work below this many multiply-adds runs on one thread: OpenMP's start-up costs more.
constexpr int64_t kParallelWork = 1 << 15;

template <typename W>
float dot(const float* x, const typename W::storage* w, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * W::load(w[i]);
  return sum;
}

// Four rows of x (row stride K) against one weight row: the weights are read once for all four.
template <typename W>
void dot4(const float* x, const typename W::storage* w, int64_t K, float* out, int64_t ld_out) {
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < K; ++i) {
    const float wi = W::load(w[i]);
    s0 += x0[i] * wi, s1 += x1[i] * wi, s2 += x2[i] * wi, s3 += x3[i] * wi;
  }
  out[0] = s0, out[ld_out] = s1, out[2 * ld_out] = s2, out[3 * ld_out] = s3;
}

// out[m, n] = sum_k x[m, k] * w[n, k] for m < M, n < N; out has row stride ld_out.
// Rows of x go four at a time, so a prefill reads each weight row once per four tokens.
template <typename W>
void matmul_f32(const float* x, const typename W::storage* w, float* out, int64_t M, int64_t N,
                int64_t K, int64_t ld_out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * N * K > kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const typename W::storage* w_row = w + n * K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot4<W>(x + m * K, w_row, K, out + m * ld_out + n, ld_out);
    for (; m < M; ++m) out[m * ld_out + n] = dot<W>(x + m * K, w_row, K);
  }
}

// expert_matmul of int4 w (core/backend.h) on float32 x [R, K] and out [R, N]: per expert and row
// segment, x's rows gathered into the segment's column order once, and each weight row
// dequantized once for all of the expert's rows.
void expert_matmul_int4(const float* x, const Tensor& w, const int32_t* offsets, float* out, int threads) {
  const int64_t E = w.shape[0], N = w.shape[1], K = w.shape[2];
  const Int4Groups& q = w.int4;
  const int64_t groups = int4_groups(K, q.group_size), segment_rows = N / q.segments;
  std::vector<float> ordered;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
    if (count == 0) continue;
    for (int64_t s = 0; s < q.segments; ++s) {
      const float* xs = x + begin * K;
      if (q.input_order) {
        const int32_t* order = q.input_order + (e * q.segments + s) * K;
        ordered.resize(count * K);
        for (int64_t r = 0; r < count; ++r)
          for (int64_t k = 0; k < K; ++k) ordered[r * K + k] = xs[r * K + order[k]];
        xs = ordered.data();
      }
#pragma omp parallel num_threads(threads) if (count * segment_rows * K > kParallelWork)
      {
        std::vector<float> row(K);
#pragma omp for schedule(static)
        for (int64_t n = s * segment_rows; n < (s + 1) * segment_rows; ++n) {
          const int64_t w_row = e * N + n;
          dequantize_rows_int4(w.ptr<uint8_t>() + w_row * (K / 2), q.scales + w_row * groups, q.zeros + w_row * groups,
                               1, K, q.group_size, row.data());
          for (int64_t r = 0; r < count; ++r) out[(begin + r) * N + n] = dot<F32>(xs + r * K, row.data(), K);
        }
      }
    }
  }
}

int32_t cache_slot(const int32_t* page_table, int64_t num_table_pages, int num_pages,
                   int page_size, int32_t position) {
  MX_CHECK(position >= 0 && position / page_size < num_table_pages, ShapeError,
           "attention: position " << position << " is outside the sequence's "
                                  << num_table_pages << " pages");
  const int32_t page = page_table[position / page_size];
  MX_CHECK(page >= 0 && page < num_pages, ShapeError,
           "attention: page id " << page << " outside the pool of " << num_pages);
  return page;
}

}  // namespace

F32Input::F32Input(const Tensor& t) {
  if (t.dtype == DType::kFloat32) {
    ptr_ = t.ptr<float>();
  } else {
    owned_.resize(t.numel());
    convert_host(t.data, t.dtype, owned_.data(), DType::kFloat32, t.numel());
    ptr_ = owned_.data();
  }
}

F32Output::F32Output(Tensor& t) : target_(t) {
  if (t.dtype == DType::kFloat32) {
    ptr_ = t.ptr<float>();
  } else {
    owned_.resize(t.numel());
    ptr_ = owned_.data();
  }
}

void F32Output::commit() {
  if (!owned_.empty()) convert_host(owned_.data(), DType::kFloat32, target_.data, target_.dtype, target_.numel());
}

void F32Output::commit_rows(int64_t begin, int64_t count) {
  if (owned_.empty() || count == 0) return;
  const int64_t width = target_.numel() / target_.shape[0];
  convert_host(owned_.data() + begin * width, DType::kFloat32, target_.rows(begin, count).data, target_.dtype,
               count * width);
}

// ---- memory -------------------------------------------------------------------

CpuBackend::CpuBackend() : threads_(omp_get_max_threads()) {}

void CpuBackend::set_threads(int threads) {
  MX_CHECK(threads >= 1, ShapeError, "num_threads must be >= 1, got " << threads);
  threads_ = threads;
}

void* CpuBackend::allocate(size_t bytes) {
  // Untouched pages of a large allocation are never committed by the OS, so a
  // KV cache sized for the full context costs only what sequences fill.
  void* ptr = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
  MX_CHECK(ptr, DeviceOutOfMemoryError, "cpu: out of memory allocating " << bytes << " bytes");
  return ptr;
}

void CpuBackend::release(void* ptr) { std::free(ptr); }

void CpuBackend::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  if (bytes) std::memcpy(dst, host_src, bytes);  // an empty array's buffer may be null
}

void CpuBackend::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(host_dst, src, bytes);
}

// ---- dense operations -----------------------------------------------------------

MemoryInfo CpuBackend::memory_info() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  MemoryInfo info{static_cast<size_t>(sysconf(_SC_AVPHYS_PAGES)) * page,
                  static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * page};
  std::ifstream meminfo("/proc/meminfo");  // MemAvailable counts reclaimable caches too
  std::string key;
  size_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") info.free_bytes = kib * 1024;
    meminfo.ignore(64, '\n');
  }
  return info;
}

void CpuBackend::fill_uniform(Tensor& t, uint64_t seed, float low, float high) {
  check_fill_uniform(t);
  if (t.dtype == DType::kInt4) {
    const int64_t bytes = t.numel() / 2;
#pragma omp parallel for schedule(static) num_threads(threads_) if (bytes > kParallelWork)
    for (int64_t b = 0; b < bytes; ++b) t.ptr<uint8_t>()[b] = int4_uniform_byte(seed, uint64_t(b), low, high);
    return;
  }
  const int64_t n = t.numel();
#pragma omp parallel for schedule(static) num_threads(threads_) if (n > kParallelWork)
  for (int64_t i = 0; i < n; ++i) store_scalar(t.data, t.dtype, i, uniform_in(seed, uint64_t(i), low, high));
}

void CpuBackend::embedding(const Tensor& table, const Tensor& ids, Tensor& out) {
  check_embedding(table, ids, out);
  const int64_t vocab = table.shape[0], hidden = table.shape[1];
  const int32_t* id = ids.ptr<int32_t>();
  for (int64_t t = 0; t < ids.shape[0]; ++t) {
    MX_CHECK(id[t] >= 0 && id[t] < vocab, TokenError,
             "token id " << id[t] << " is outside the vocabulary [0, " << vocab << ")");
    convert_host(static_cast<const char*>(table.data) + id[t] * hidden * dtype_size(table.dtype),
                 table.dtype, static_cast<char*>(out.data) + t * hidden * dtype_size(out.dtype),
                 out.dtype, hidden);
  }
}

void CpuBackend::add_rmsnorm(Tensor& residual, const Tensor* delta, const Tensor& weight,
                             float eps, Tensor& out) {
  check_add_rmsnorm(residual, delta, weight, out);
  const int64_t T = residual.shape[0], H = residual.shape[1];
  if (delta) {
    F32Input r(residual), d(*delta);
    std::vector<float> sum(T * H);
    for (int64_t i = 0; i < T * H; ++i) sum[i] = r.data()[i] + d.data()[i];
    convert_host(sum.data(), DType::kFloat32, residual.data, residual.dtype, T * H);
  }
  // The norm reads the residual as stored, rounded to its dtype.
  F32Input res(residual), w(weight);
  F32Output o(out);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = res.data() + t * H;
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < H; ++i) sum_sq += row[i] * row[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) o.data()[t * H + i] = row[i] * inv_rms * w.data()[i];
  }
  o.commit();
}

void CpuBackend::matmul(const Tensor& x, const Tensor& w, Tensor& out) {
  check_matmul(x, w, out);
  F32Input xf(x);
  F32Output of(out);
  dispatch_float(w.dtype, [&](auto wt) {
    using W = decltype(wt);
    matmul_f32<W>(xf.data(), w.ptr<typename W::storage>(), of.data(), x.shape[0], w.shape[0],
                  x.shape[1], w.shape[0], threads_);
  });
  of.commit();
}

void CpuBackend::rope_kv_append(Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                                float rope_theta, const KvLayer& kv, const Tensor& page_table) {
  check_attention(qkv, shape, positions, kv, page_table, nullptr);
  const int64_t T = qkv.shape[0], D = shape.head_dim, half = D / 2;
  const int64_t width = qkv.shape[1];
  const int64_t q_heads = shape.num_heads, kv_heads = shape.num_kv_heads;
  const int32_t* pos = positions.ptr<int32_t>();
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = static_cast<float>(1.0 / std::pow(static_cast<double>(rope_theta), (2.0 * i) / D));

  std::vector<float> row(width), cos_angle(half), sin_angle(half);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t page = cache_slot(page_table.ptr<int32_t>(), page_table.shape[0], kv.num_pages,
                                    kv.page_size, pos[t]);
    const int64_t slot_row = pos[t] % kv.page_size;
    convert_host(static_cast<char*>(qkv.data) + t * width * dtype_size(qkv.dtype), qkv.dtype,
                 row.data(), DType::kFloat32, width);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[t]) * inv_freq[i];
      cos_angle[i] = std::cos(angle);
      sin_angle[i] = std::sin(angle);
    }
    // q and k heads are adjacent in the row: rotate all of them in one pass.
    for (int64_t h = 0; h < q_heads + kv_heads; ++h) {
      float* x = row.data() + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos_angle[i] - x2 * sin_angle[i];
        x[i + half] = x2 * cos_angle[i] + x1 * sin_angle[i];
      }
    }
    convert_host(row.data(), DType::kFloat32, static_cast<char*>(qkv.data) + t * width * dtype_size(qkv.dtype),
                 qkv.dtype, width);
    dispatch_float(kv.dtype, [&](auto ct) {
      using C = decltype(ct);
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t offset = ((int64_t(page) * kv_heads + g) * kv.page_size + slot_row) * D;
        auto* k_dst = static_cast<typename C::storage*>(kv.k) + offset;
        auto* v_dst = static_cast<typename C::storage*>(kv.v) + offset;
        const float* k_src = row.data() + (q_heads + g) * D;
        const float* v_src = row.data() + (q_heads + kv_heads + g) * D;
        for (int64_t i = 0; i < D; ++i) {
          k_dst[i] = C::store(k_src[i]);
          v_dst[i] = C::store(v_src[i]);
        }
      }
    });
  }
}

void CpuBackend::attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                           const KvLayer& kv, const Tensor& page_table, Tensor& out) {
  check_attention(qkv, shape, positions, kv, page_table, &out);
  const int64_t T = qkv.shape[0], D = shape.head_dim, width = qkv.shape[1];
  const int64_t q_heads = shape.num_heads, kv_heads = shape.num_kv_heads;
  const int64_t group = q_heads / kv_heads;
  const int32_t* pos = positions.ptr<int32_t>();
  const int32_t* table = page_table.ptr<int32_t>();
  if (T == 0) return;
  // Validate every position and page before any thread reads the pools.
  int32_t max_position = 0;
  for (int64_t t = 0; t < T; ++t) {
    MX_CHECK(pos[t] >= 0, ShapeError, "attention: negative position " << pos[t]);
    max_position = std::max(max_position, pos[t]);
  }
  for (int32_t p = 0; p <= max_position; p += kv.page_size)
    cache_slot(table, page_table.shape[0], kv.num_pages, kv.page_size, p);
  F32Input q_all(qkv);
  F32Output o(out);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  dispatch_float(kv.dtype, [&](auto ct) {
    using C = decltype(ct);
    const auto* k_pool = static_cast<const typename C::storage*>(kv.k);
    const auto* v_pool = static_cast<const typename C::storage*>(kv.v);
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads_) if (T * q_heads * (max_position + 1) * D > kParallelWork)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < q_heads; ++h) {
        const int64_t g = h / group, length = pos[t] + 1;
        const float* q = q_all.data() + t * width + h * D;
        std::vector<float> scores(length);
        float max_score = -INFINITY;
        for (int64_t p = 0; p < length; ++p) {
          const int64_t offset =
              ((int64_t(table[p / kv.page_size]) * kv_heads + g) * kv.page_size + p % kv.page_size) * D;
          scores[p] = dot<C>(q, k_pool + offset, D) * scale;
          max_score = std::max(max_score, scores[p]);
        }
        float denom = 0.0f;
        for (int64_t p = 0; p < length; ++p) denom += (scores[p] = std::exp(scores[p] - max_score));
        float* o_row = o.data() + t * q_heads * D + h * D;
        std::fill(o_row, o_row + D, 0.0f);
        for (int64_t p = 0; p < length; ++p) {
          const int64_t offset =
              ((int64_t(table[p / kv.page_size]) * kv_heads + g) * kv.page_size + p % kv.page_size) * D;
          const float weight = scores[p] / denom;
          for (int64_t i = 0; i < D; ++i) o_row[i] += weight * C::load(v_pool[offset + i]);
        }
      }
    }
  });
  o.commit();
}

// ---- mixture of experts -----------------------------------------------------------

void CpuBackend::router_topk(const Tensor& logits, Tensor& expert_ids, Tensor& weights) {
  check_router_topk(logits, expert_ids, weights);
  const int64_t T = logits.shape[0], E = logits.shape[1], k = expert_ids.shape[1];
  for (int64_t t = 0; t < T; ++t) {
    const float* row = logits.ptr<float>() + t * E;
    const float max_logit = *std::max_element(row, row + E);
    std::vector<float> prob(E);
    float denom = 0.0f;
    for (int64_t e = 0; e < E; ++e) denom += (prob[e] = std::exp(row[e] - max_logit));
    for (int64_t e = 0; e < E; ++e) prob[e] /= denom;
    int32_t* ids = expert_ids.ptr<int32_t>() + t * k;
    float* w = weights.ptr<float>() + t * k;
    float chosen_sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        if (std::find(ids, ids + j, static_cast<int32_t>(e)) != ids + j) continue;
        if (best < 0 || prob[e] > prob[best]) best = e;
      }
      ids[j] = static_cast<int32_t>(best);
      chosen_sum += (w[j] = prob[best]);
    }
    for (int64_t j = 0; j < k; ++j) w[j] /= chosen_sum;
  }
}

void CpuBackend::moe_permute(const Tensor& expert_ids, Tensor& expert_offsets,
                             Tensor& permuted_to_expanded, Tensor& expanded_to_permuted) {
  check_moe_permute(expert_ids, expert_offsets, permuted_to_expanded, expanded_to_permuted);
  const int64_t rows = expert_ids.numel(), E = expert_offsets.shape[0] - 1;
  const int32_t* ids = expert_ids.ptr<int32_t>();
  int32_t* offsets = expert_offsets.ptr<int32_t>();
  std::fill(offsets, offsets + E + 1, 0);
  for (int64_t i = 0; i < rows; ++i) {
    MX_CHECK(ids[i] >= 0 && ids[i] < E, ShapeError,
             "moe_permute: expert id " << ids[i] << " outside [0, " << E << ")");
    ++offsets[ids[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t r = next[ids[i]]++;
    permuted_to_expanded.ptr<int32_t>()[r] = static_cast<int32_t>(i);
    expanded_to_permuted.ptr<int32_t>()[i] = r;
  }
}

void CpuBackend::moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k,
                            Tensor& out) {
  check_moe_gather(x, permuted_to_expanded, k, out);
  const int64_t T = x.shape[0], H = x.shape[1], rows = T * k;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t expanded = permuted_to_expanded.ptr<int32_t>()[r];
    MX_CHECK(expanded >= 0 && expanded < rows, ShapeError,
             "moe_gather: expanded row " << expanded << " outside [0, " << rows << ")");
    convert_host(static_cast<const char*>(x.data) + (expanded / k) * H * dtype_size(x.dtype), x.dtype,
                 static_cast<char*>(out.data) + r * H * dtype_size(out.dtype), out.dtype, H);
  }
}

void CpuBackend::expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                               Tensor& out) {
  check_expert_matmul(x, w, expert_offsets, out);
  const int64_t E = w.shape[0], N = w.shape[1], K = w.shape[2], R = x.shape[0];
  const int32_t* offsets = expert_offsets.ptr<int32_t>();
  MX_CHECK(offsets[0] >= 0 && offsets[E] <= R, ShapeError,
           "expert_matmul: offsets must lie within [0, " << R << "], got [" << offsets[0] << ", "
                                                        << offsets[E] << "]");
  for (int64_t e = 0; e < E; ++e)
    MX_CHECK(offsets[e] <= offsets[e + 1], ShapeError, "expert_matmul: offsets must not decrease");
  F32Input xf(x);
  F32Output of(out);
  auto each_expert = [&](auto wt) {
    using W = decltype(wt);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
      if (count == 0) continue;
      float* out_rows = of.data() + begin * N;
      matmul_f32<W>(xf.data() + begin * K, w.ptr<typename W::storage>() + e * N * K, out_rows, count, N, K, N, threads_);
      if constexpr (std::is_same_v<W, FP8>)
        for (int64_t r = 0; r < count; ++r)
          for (int64_t n = 0; n < N; ++n) out_rows[r * N + n] *= w.row_scales[e * N + n];
    }
  };
  if (w.dtype == DType::kInt4) expert_matmul_int4(xf.data(), w, offsets, of.data(), threads_);
  else if (w.dtype == DType::kFloat8E4M3) each_expert(FP8{});
  else dispatch_float(w.dtype, each_expert);
  of.commit_rows(offsets[0], offsets[E] - offsets[0]);  // rows of other experts stay as they are
}

void CpuBackend::silu_mul(const Tensor& gate_up, Tensor& out) {
  check_silu_mul(gate_up, out);
  const int64_t R = out.shape[0], F = out.shape[1];
  F32Input in(gate_up);
  F32Output o(out);
  for (int64_t r = 0; r < R; ++r) {
    const float* gate = in.data() + r * 2 * F;
    for (int64_t i = 0; i < F; ++i) {
      const float g = gate[i];
      o.data()[r * F + i] = g / (1.0f + std::exp(-g)) * gate[F + i];
    }
  }
  o.commit();
}

void CpuBackend::moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted,
                               const Tensor& weights, Tensor& out) {
  check_moe_unpermute(y, expanded_to_permuted, weights, out);
  const int64_t T = weights.shape[0], k = weights.shape[1], H = y.shape[1];
  F32Input yf(y);
  F32Output o(out);
  for (int64_t t = 0; t < T; ++t) {
    float* o_row = o.data() + t * H;
    std::fill(o_row, o_row + H, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = expanded_to_permuted.ptr<int32_t>()[t * k + j];
      MX_CHECK(r >= 0 && r < y.shape[0], ShapeError,
               "moe_unpermute: permuted row " << r << " outside [0, " << y.shape[0] << ")");
      const float w = weights.ptr<float>()[t * k + j];
      for (int64_t i = 0; i < H; ++i) o_row[i] += w * yf.data()[r * H + i];
    }
  }
  o.commit();
}

// ---- sampling --------------------------------------------------------------------------

void CpuBackend::sample(const Tensor& logits, const SamplingParams& params, uint64_t seed, Tensor& state,
                        Tensor& token, Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) {
  check_sample(logits, params, state, token, logprob, top_ids, top_logprobs);
  const int64_t V = logits.shape[0];
  int32_t* seen = state.ptr<int32_t>();
  int32_t& step = seen[2 * V];
  const SampledToken s = sample_token(logits.ptr<float>(), V, params, seed, static_cast<uint32_t>(step), seen, seen + V);
  ++step;
  *token.ptr<int32_t>() = s.token;
  *logprob.ptr<float>() = s.logprob;
  std::copy(s.top_tokens.begin(), s.top_tokens.end(), top_ids.ptr<int32_t>());
  std::copy(s.top_logprobs.begin(), s.top_logprobs.end(), top_logprobs.ptr<float>());
}

}  // namespace mixtral
