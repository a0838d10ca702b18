"""Tensor-parallel sharding of Mixtral, as gpt-fast and vLLM shard it: what rank r of N holds, and
which slice of each checkpoint tensor it reads (the loader slices the memory-mapped tensors, so a
rank reads its own bytes only).

Rank r of N holds, per layer:
  attention: query heads [r * Hq/N, (r+1) * Hq/N) (q's rows of wqkv), the KV heads they read (k's and
    v's rows: Hkv/N heads, or when N exceeds Hkv the one KV head of its query heads, each KV head then
    held by N/Hkv ranks), and wo's columns of its query heads;
  experts: every expert's slice [r * F/N, (r+1) * F/N) of the expert width F: w1's and w3's rows,
    w2's columns;
  whole: the embedding, the norms, the router and lm_head.
The rank's engine is a Mixtral of that shape (shard_config); its attention output projection and its
experts then give partial sums that the ranks add up (csrc/engine/forward.cpp).

lm_head is held whole by every rank: each rank computes the same logits and samples the same token,
so no rank waits for another's sample (no third collective, and no host round trip per token). It
costs V * H more bytes read per token per rank: 0.4 GB in bfloat16 at 8x22B, 2% of a rank's step at
N = 4 and 4% at N = 8, against a vocabulary-sharded lm_head's all-gather of the logits (128 KB) that
would sit between the last layer and the sample."""

from __future__ import annotations

from dataclasses import replace

from .config import MixtralConfig
from .errors import SettingError
from .weights import TensorCopy


def check_tensor_parallel(config: MixtralConfig, world: int) -> None:
    """SettingError naming the limit when `world` ranks cannot share this model's layers."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SettingError(f"tensor_parallel must be an integer >= 1, got {world!r}")
    Hq, Hkv, F = config.num_heads, config.num_kv_heads, config.intermediate_size
    if Hq % world:
        raise SettingError(f"tensor_parallel {world} must divide the {Hq} attention heads")
    if Hkv % world and world % Hkv:
        raise SettingError(f"tensor_parallel {world} must divide the {Hkv} KV heads or be a multiple of them")
    if F % world:
        raise SettingError(f"tensor_parallel {world} must divide the expert width (intermediate_size) {F}")


def shard_config(config: MixtralConfig, rank: int, world: int) -> MixtralConfig:
    """The Mixtral of rank `rank`'s slice: its heads and its part of the expert width."""
    return replace(config, num_heads=config.num_heads // world, num_kv_heads=max(1, config.num_kv_heads // world),
                   intermediate_size=config.intermediate_size // world)


def shard_plan(plan: list[TensorCopy], config: MixtralConfig, rank: int, world: int) -> list[TensorCopy]:
    """The copies of rank `rank`: each tensor's slice of it (rows or columns) and where that goes in
    the rank's slots; tensors held whole stay as they are."""
    if world == 1:
        return plan
    D = config.head_dim
    local = shard_config(config, rank, world)
    q_rows, kv_rows = config.num_heads * D, config.num_kv_heads * D
    local_q, local_kv, local_f = local.num_heads * D, local.num_kv_heads * D, local.intermediate_size
    first_q = rank * local_q
    # The KV head of the rank's first query head starts its KV rows.
    first_kv = rank * local.num_heads // (config.num_heads // config.num_kv_heads) * D
    first_f = rank * local_f
    sharded = []
    for copy in plan:
        if copy.slot == "wqkv" and copy.row_offset == 0:
            copy = replace(copy, rows=(first_q, first_q + local_q))
        elif copy.slot == "wqkv" and copy.row_offset in (q_rows, q_rows + kv_rows):
            offset = local_q if copy.row_offset == q_rows else local_q + local_kv
            copy = replace(copy, rows=(first_kv, first_kv + local_kv), row_offset=offset)
        elif copy.slot == "wo":
            copy = replace(copy, cols=(first_q, first_q + local_q))
        elif copy.slot == "w13" and copy.expert_index is not None:  # a fused [E, 2F, H]: w1's rows, then w3's
            sharded.append(replace(copy, rows=(first_f, first_f + local_f)))
            first_up = config.intermediate_size + first_f
            copy = replace(copy, rows=(first_up, first_up + local_f), row_offset=local_f)
        elif copy.slot == "w13":
            copy = replace(copy, rows=(first_f, first_f + local_f), row_offset=0 if copy.row_offset == 0 else local_f)
        elif copy.slot == "w2":
            copy = replace(copy, cols=(first_f, first_f + local_f))
        sharded.append(copy)
    return sharded
