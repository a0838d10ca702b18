// Argument checks of the operations (see core/op_checks.h).
#include "core/op_checks.h"

#include <algorithm>

namespace mixtral {

void check_embedding(const Tensor& table, const Tensor& ids, const Tensor& out) {
  expect_float(table, "embedding.table", {-1, -1});
  expect(ids, "embedding.ids", DType::kInt32, {-1});
  expect_float(out, "embedding.out", {ids.shape[0], table.shape[1]});
}

void check_add_rmsnorm(const Tensor& residual, const Tensor* delta, const Tensor& weight,
                       const Tensor& out) {
  expect_float(residual, "add_rmsnorm.residual", {-1, -1});
  if (delta) expect_float(*delta, "add_rmsnorm.delta", {residual.shape[0], residual.shape[1]});
  expect_float(weight, "add_rmsnorm.weight", {residual.shape[1]});
  expect_float(out, "add_rmsnorm.out", {residual.shape[0], residual.shape[1]});
}

void check_matmul(const Tensor& x, const Tensor& w, const Tensor& out) {
  expect_float(x, "matmul.x", {-1, -1});
  expect_float(w, "matmul.w", {-1, x.shape[1]});
  expect_float(out, "matmul.out", {x.shape[0], w.shape[0]});
}

void check_attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                     const KvLayer& kv, const Tensor& page_table, const Tensor* out) {
  MX_CHECK(shape.num_heads > 0 && shape.num_kv_heads > 0 && shape.head_dim > 0 &&
               shape.head_dim % 2 == 0 && shape.num_heads % shape.num_kv_heads == 0,
           ShapeError,
           "attention: bad head layout " << shape.num_heads << "/" << shape.num_kv_heads << "/"
                                         << shape.head_dim);
  const int64_t width = int64_t(shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim;
  expect_float(qkv, "attention.qkv", {-1, width});
  expect(positions, "attention.positions", DType::kInt32, {qkv.shape[0]});
  expect(page_table, "attention.page_table", DType::kInt32, {-1});
  MX_CHECK(kv.k && kv.v && kv.page_size > 0 && kv.num_pages > 0 && is_float(kv.dtype), ShapeError,
           "attention: the KV layer has no pages");
  if (out) expect_float(*out, "attention.out", {qkv.shape[0], int64_t(shape.num_heads) * shape.head_dim});
}

void check_router_topk(const Tensor& logits, const Tensor& expert_ids, const Tensor& weights) {
  expect(logits, "router.logits", DType::kFloat32, {-1, -1});
  expect(expert_ids, "router.expert_ids", DType::kInt32, {logits.shape[0], -1});
  const int64_t k = expert_ids.shape[1];
  MX_CHECK(k >= 1 && k <= logits.shape[1], ShapeError,
           "router: top-k " << k << " must be in [1, " << logits.shape[1] << "]");
  expect(weights, "router.weights", DType::kFloat32, {logits.shape[0], k});
}

void check_moe_permute(const Tensor& expert_ids, const Tensor& expert_offsets,
                       const Tensor& permuted_to_expanded, const Tensor& expanded_to_permuted) {
  expect(expert_ids, "moe_permute.expert_ids", DType::kInt32, {-1, -1});
  expect(expert_offsets, "moe_permute.expert_offsets", DType::kInt32, {-1});
  MX_CHECK(expert_offsets.shape[0] >= 2, ShapeError, "moe_permute: need at least one expert");
  const int64_t rows = expert_ids.numel();
  expect(permuted_to_expanded, "moe_permute.permuted_to_expanded", DType::kInt32, {rows});
  expect(expanded_to_permuted, "moe_permute.expanded_to_permuted", DType::kInt32, {rows});
}

void check_moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k,
                      const Tensor& out) {
  expect_float(x, "moe_gather.x", {-1, -1});
  MX_CHECK(k >= 1, ShapeError, "moe_gather: k must be >= 1");
  expect(permuted_to_expanded, "moe_gather.permuted_to_expanded", DType::kInt32, {x.shape[0] * k});
  expect_float(out, "moe_gather.out", {x.shape[0] * k, x.shape[1]});
}

void check_fill_uniform(const Tensor& t) {
  MX_CHECK((is_float(t.dtype) || t.dtype == DType::kFloat8E4M3 || t.dtype == DType::kInt4) && t.contiguous(),
           ShapeError, "fill_uniform: a contiguous float, float8_e4m3 or int4 tensor expected, got " << t.describe());
  MX_CHECK(t.dtype != DType::kInt4 || t.numel() % 2 == 0, ShapeError, "fill_uniform: int4 codes come in pairs");
}

void check_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                         const Tensor& out) {
  expect_float(x, "expert_matmul.x", {-1, -1});
  if (w.dtype == DType::kFloat8E4M3) {
    expect(w, "expert_matmul.w", DType::kFloat8E4M3, {-1, -1, x.shape[1]});
    MX_CHECK(w.row_scales, ShapeError, "expert_matmul.w: float8_e4m3 weights need their row scales");
  } else if (w.dtype == DType::kInt4) {
    expect(w, "expert_matmul.w", DType::kInt4, {-1, -1, x.shape[1]});
    const Int4Groups& g = w.int4;
    MX_CHECK(g.scales && g.zeros && g.group_size >= 1, ShapeError,
             "expert_matmul.w: int4 weights need their group scales, zeros and group size");
    MX_CHECK(x.shape[1] % 2 == 0, ShapeError, "expert_matmul.w: int4 weights need an even input width, got "
                                                   << x.shape[1]);
    MX_CHECK(g.segments >= 1 && w.shape[1] % g.segments == 0, ShapeError,
             "expert_matmul.w: " << g.segments << " column-order segments do not divide " << w.shape[1] << " rows");
  } else {
    expect_float(w, "expert_matmul.w", {-1, -1, x.shape[1]});
  }
  expect(expert_offsets, "expert_matmul.expert_offsets", DType::kInt32, {w.shape[0] + 1});
  expect_float(out, "expert_matmul.out", {x.shape[0], w.shape[1]});
}

void check_silu_mul(const Tensor& gate_up, const Tensor& out) {
  expect_float(gate_up, "silu_mul.gate_up", {-1, -1});
  MX_CHECK(gate_up.shape[1] % 2 == 0, ShapeError, "silu_mul: gate_up width must be even");
  expect_float(out, "silu_mul.out", {gate_up.shape[0], gate_up.shape[1] / 2});
}

void check_moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted,
                         const Tensor& weights, const Tensor& out) {
  expect(weights, "moe_unpermute.weights", DType::kFloat32, {-1, -1});
  const int64_t rows = weights.numel();
  expect_float(y, "moe_unpermute.y", {-1, -1});
  MX_CHECK(y.shape[0] >= rows, ShapeError,
           "moe_unpermute.y: " << y.shape[0] << " rows, fewer than the " << rows << " expanded rows");
  expect(expanded_to_permuted, "moe_unpermute.expanded_to_permuted", DType::kInt32, {rows});
  expect_float(out, "moe_unpermute.out", {weights.shape[0], y.shape[1]});
}

void check_sample(const Tensor& logits, const SamplingParams& params, const Tensor& state, const Tensor& token,
                  const Tensor& logprob, const Tensor& top_ids, const Tensor& top_logprobs) {
  params.validate();
  expect(logits, "sample.logits", DType::kFloat32, {-1});
  expect(state, "sample.state", DType::kInt32, {2 * logits.shape[0] + 1});
  expect(token, "sample.token", DType::kInt32, {1});
  expect(logprob, "sample.logprob", DType::kFloat32, {1});
  const int64_t n = std::min<int64_t>(params.logprobs, logits.shape[0]);
  expect(top_ids, "sample.top_ids", DType::kInt32, {n});
  expect(top_logprobs, "sample.top_logprobs", DType::kFloat32, {n});
}

}  // namespace mixtral
