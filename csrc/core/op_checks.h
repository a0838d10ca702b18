// Shape and dtype checks of each operation's arguments, shared by every
// backend so both reject the same inputs with the same ShapeError message.
// Layouts are those documented in core/backend.h.
#pragma once

#include "core/backend.h"

namespace mixtral {

void check_fill_uniform(const Tensor& t);
void check_embedding(const Tensor& table, const Tensor& ids, const Tensor& out);
void check_add_rmsnorm(const Tensor& residual, const Tensor* delta, const Tensor& weight,
                       const Tensor& out);
void check_matmul(const Tensor& x, const Tensor& w, const Tensor& out);
void check_attention(const Tensor& qkv, const AttentionShape& shape, const Tensor& positions,
                     const KvLayer& kv, const Tensor& page_table, const Tensor* out);
void check_router_topk(const Tensor& logits, const Tensor& expert_ids, const Tensor& weights);
void check_moe_permute(const Tensor& expert_ids, const Tensor& expert_offsets,
                       const Tensor& permuted_to_expanded, const Tensor& expanded_to_permuted);
void check_moe_gather(const Tensor& x, const Tensor& permuted_to_expanded, int k,
                      const Tensor& out);
void check_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& expert_offsets,
                         const Tensor& out);
void check_silu_mul(const Tensor& gate_up, const Tensor& out);
void check_moe_unpermute(const Tensor& y, const Tensor& expanded_to_permuted,
                         const Tensor& weights, const Tensor& out);

void check_sample(const Tensor& logits, const SamplingParams& params, const Tensor& state, const Tensor& token,
                  const Tensor& logprob, const Tensor& top_ids, const Tensor& top_logprobs);

}  // namespace mixtral
