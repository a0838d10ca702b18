"""How a sharded Mixtral is split, as gpt-fast and vLLM split it: what rank r of N holds, and which
slice of each checkpoint tensor it reads (the loader slices the memory-mapped tensors, so a rank reads
its own bytes only).

Rank r of N holds, per layer:
  attention: query heads [r * Hq/N, (r+1) * Hq/N) (q's rows of wqkv), the KV heads they read (k's and
    v's rows: Hkv/N heads, or when N exceeds Hkv the one KV head of its query heads, each KV head then
    held by N/Hkv ranks), and wo's columns of its query heads;
  experts, tensor parallel (the default): every expert's slice [r * F/N, (r+1) * F/N) of the expert
    width F: w1's and w3's rows, w2's columns;
  experts, expert parallel: experts [r * E/N, (r+1) * E/N) whole, and none of the others. Every rank
    routes each token over all E experts and runs the ones it holds; the others' rows count zero;
  whole: the embedding, the norms, the router and lm_head.
The rank's engine is a Mixtral of that shape (Sharding.config, with its held experts), and its attention
output projection and its experts give partial sums that the ranks add up (csrc/engine/forward.cpp).
Expert parallelism suits long prompts (each rank's expert GEMMs are full width and see many rows) and
quantized checkpoints whose groups or act order do not split along F. For a decode step it is the
slower split: a layer waits for the rank that drew the most of the token's experts, and that rank
reads them whole (2 of 8 experts over N = 4 ranks: one expert's bytes on two ranks, or both experts'
on one, one time in seven), where tensor parallelism reads 2/N of an expert on every rank.

lm_head is held whole by every rank: each rank computes the same logits and samples the same token,
so no rank waits for another's sample (no third collective, and no host round trip per token). It
costs V * H more bytes read per token per rank: 0.4 GB in bfloat16 at 8x22B, 2% of a rank's step at
N = 4 and 4% at N = 8, against a vocabulary-sharded lm_head's all-gather of the logits (128 KB) that
would sit between the last layer and the sample."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import MixtralConfig
from .errors import SettingError
from .weights import TensorCopy


@dataclass(frozen=True)
class Sharding:
    """N ranks' split of a model: attention by heads, the experts by their width (tensor parallel) or
    whole experts per rank (expert_parallel)."""

    world: int = 1
    expert_parallel: bool = False

    @classmethod
    def checked(cls, config: MixtralConfig, world: int, expert_parallel: bool) -> "Sharding":
        """The split of `world` ranks; SettingError naming the limit when they cannot share this model."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise SettingError(f"tensor_parallel must be an integer >= 1, got {world!r}")
        if not isinstance(expert_parallel, bool):
            raise SettingError(f"expert_parallel must be True or False, got {expert_parallel!r}")
        Hq, Hkv, F, E = config.num_heads, config.num_kv_heads, config.intermediate_size, config.num_experts
        if Hq % world:
            raise SettingError(f"tensor_parallel {world} must divide the {Hq} attention heads")
        if Hkv % world and world % Hkv:
            raise SettingError(f"tensor_parallel {world} must divide the {Hkv} KV heads or be a multiple of them")
        if expert_parallel and E % world:
            raise SettingError(f"expert parallel over {world} ranks must divide the {E} experts (whole experts each)")
        if not expert_parallel and F % world:
            raise SettingError(f"tensor_parallel {world} must divide the expert width (intermediate_size) {F}")
        return cls(world, expert_parallel and world > 1)

    def config(self, config: MixtralConfig) -> MixtralConfig:
        """The Mixtral of a rank's slice: its heads and, tensor parallel, its part of the expert width
        (the same for every rank; expert parallel, the experts held are held_experts')."""
        width = config.intermediate_size if self.expert_parallel else config.intermediate_size // self.world
        return replace(config, num_heads=config.num_heads // self.world,
                       num_kv_heads=max(1, config.num_kv_heads // self.world), intermediate_size=width)

    def held_experts(self, config: MixtralConfig, rank: int) -> tuple[int, int]:
        """(first expert, count) of the experts whose weights rank `rank` holds: all of them unless
        expert parallel."""
        if not self.expert_parallel:
            return 0, config.num_experts
        count = config.num_experts // self.world
        return rank * count, count

    def plan(self, plan: list[TensorCopy], config: MixtralConfig, rank: int) -> list[TensorCopy]:
        """The copies of rank `rank`: each tensor's slice of it (rows or columns) and where that goes in
        the rank's slots, without the experts it does not hold; tensors held whole stay as they are."""
        if self.world == 1:
            return plan
        D = config.head_dim
        local = self.config(config)
        q_rows, kv_rows = config.num_heads * D, config.num_kv_heads * D
        local_q, local_kv, local_f = local.num_heads * D, local.num_kv_heads * D, local.intermediate_size
        first_q = rank * local_q
        # The KV head of the rank's first query head starts its KV rows.
        first_kv = rank * local.num_heads // (config.num_heads // config.num_kv_heads) * D
        first_f = rank * local_f
        first_expert, held = self.held_experts(config, rank)
        sharded = []
        for copy in plan:
            if copy.slot == "wqkv" and copy.row_offset == 0:
                copy = replace(copy, rows=(first_q, first_q + local_q))
            elif copy.slot == "wqkv" and copy.row_offset in (q_rows, q_rows + kv_rows):
                offset = local_q if copy.row_offset == q_rows else local_q + local_kv
                copy = replace(copy, rows=(first_kv, first_kv + local_kv), row_offset=offset)
            elif copy.slot == "wo":
                copy = replace(copy, cols=(first_q, first_q + local_q))
            elif copy.slot in ("w13", "w2") and self.expert_parallel:
                if not first_expert <= copy.expert < first_expert + held:
                    continue  # another rank's expert
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
