"""Weight loading: finds the checkpoint files of a model directory, maps each
tensor name to a slot of the engine (csrc/engine/engine.h lists the slots and
their layouts), checks names, shapes and dtypes before anything is copied,
then streams the tensors into the engine with a progress bar.

Supported layouts:
  Hugging Face: config.json + model.safetensors, or shards listed in
    model.safetensors.index.json; experts either per expert
    (block_sparse_moe.experts.E.w1/w2/w3) or fused (mlp.experts.gate_up_proj/down_proj).
  Consolidated Mistral: params.json + consolidated*.safetensors; its wq/wk rows use
    interleaved RoPE pairs and are permuted here to the engine's rotate-half layout.
  FP8 (Hugging Face layout, per-expert names): any weight may be F8_E4M3 with a float32
    NAME.weight_scale beside it, one per tensor or per output row; the engine keeps FP8
    expert weights as they are and widens the others to its dtype (activation scales are
    not used: activations stay in the engine's dtype).
  int4 (Hugging Face layout, per-expert names; AWQ GEMM, GPTQ, compressed-tensors
    pack-quantized, int4.py): a projection stored as int4 codes, scales and zero points
    instead of NAME.weight is unpacked here. An engine with int4 experts (the default for such
    a checkpoint) keeps the experts' codes, groups and act order as they are (csrc/core/int4.h,
    scales rounded to float16); every other int4 projection (attention), and the experts of an
    engine of another expert dtype, are dequantized to float32 and converted like any float
    weight. The router, norms, embeddings and lm_head are float as stored.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .config import MixtralConfig, load_hf_config, load_params_json
from .errors import MixtralError, ModelLoadError
from .int4 import Int4Reader
from .safetensors_file import SafetensorsFile

log = logging.getLogger("mixtral_ext")

# Checkpoints above this size show a progress bar unless told otherwise.
_PROGRESS_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorCopy:
    """One checkpoint tensor (or one expert of a fused tensor) and where it goes."""

    name: str
    shape: tuple[int, ...]  # expected checkpoint shape
    slot: str
    layer: int = 0
    expert: int = 0
    row_offset: int = 0
    expert_index: int | None = None  # for fused [E, ...] tensors: which expert to take
    interleaved_heads: int = 0  # > 0: rows come in interleaved RoPE pairs, this many heads
    # A rank of a sharded engine takes a slice (sharding.py): rows [first, stop) or columns [first, stop)
    # of the tensor (of its expert, its rows in rotate-half order); None: all.
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


@dataclass
class Checkpoint:
    format: str  # "hf" or "consolidated"
    config: MixtralConfig
    files: dict[str, SafetensorsFile]  # tensor name -> file

    def has(self, name: str) -> bool:
        return name in self.files

    def int4_module(self, name: str) -> str | None:
        """The module of weight `name` when the checkpoint holds it as int4 codes, not as a tensor."""
        fmt = self.config.int4
        if fmt is None or name in self.files or not name.endswith(".weight"):
            return None
        module = name.removesuffix(".weight")
        return module if fmt.packed_name(module) in self.files else None

    def has_weight(self, name: str) -> bool:
        return name in self.files or self.int4_module(name) is not None

    def int4_reader(self) -> Int4Reader:
        return Int4Reader(self.config.int4, self.files)


def read_config(path: str | os.PathLike) -> tuple[str, MixtralConfig]:
    """(format, config) of a model directory: "hf" from config.json, else "consolidated" from
    params.json; no weights read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"model directory not found: {path}")
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf", load_hf_config(os.path.join(path, "config.json"))
    if os.path.exists(os.path.join(path, "params.json")):
        return "consolidated", load_params_json(os.path.join(path, "params.json"))
    raise ModelLoadError(f"{path}: no config.json (Hugging Face) or params.json (consolidated Mistral) found")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = os.fspath(path)
    kind, config = read_config(path)
    if kind == "consolidated":
        return Checkpoint(kind, config, _files_from_glob(path, ["consolidated*.safetensors"]))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return Checkpoint(kind, config, _files_from_index(path, index))
    return Checkpoint(kind, config, _files_from_glob(path, ["model.safetensors", "model-*.safetensors"]))


def _files_from_index(path: str, index: str) -> dict[str, SafetensorsFile]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        opened = {shard: SafetensorsFile(os.path.join(path, shard)) for shard in sorted(set(weight_map.values()))}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{index}: cannot use the shard index: {e}") from e
    files = {}
    for name, shard in weight_map.items():
        if name not in opened[shard]:
            raise ModelLoadError(f"{index} places tensor '{name}' in {shard}, which does not hold it")
        files[name] = opened[shard]
    return files


def _files_from_glob(path: str, patterns: list[str]) -> dict[str, SafetensorsFile]:
    paths = sorted({p for pattern in patterns for p in glob.glob(os.path.join(path, pattern))})
    if not paths:
        raise ModelLoadError(f"{path}: no safetensors weights ({' or '.join(patterns)})")
    files = {}
    for file_path in paths:
        st = SafetensorsFile(file_path)
        for name in st.keys():
            files[name] = st
    return files


def tensor_plan(checkpoint: Checkpoint) -> list[TensorCopy]:
    """Every tensor the engine needs from this checkpoint, and where it goes."""
    c = checkpoint.config
    H, F, D, E = c.hidden_size, c.intermediate_size, c.head_dim, c.num_experts
    q_rows, kv_rows = c.num_heads * D, c.num_kv_heads * D
    plan: list[TensorCopy] = []

    def need(name: str) -> str:
        """Stops at the first layer or expert the checkpoint lacks, so a config that claims
        a billion layers fails at once instead of planning a billion copies."""
        if not checkpoint.has_weight(name):
            raise ModelLoadError(f"missing tensor '{name}' in the checkpoint (the config declares "
                                 f"{c.num_layers} layers of {E} experts)")
        return name

    if checkpoint.format == "hf":
        lm_head = "lm_head.weight"
        if c.tie_word_embeddings and not checkpoint.has(lm_head):
            lm_head = "model.embed_tokens.weight"
        plan += [
            TensorCopy("model.embed_tokens.weight", (c.vocab_size, H), "embed"),
            TensorCopy(lm_head, (c.vocab_size, H), "lm_head"),
            TensorCopy("model.norm.weight", (H,), "final_norm"),
        ]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            plan += [
                TensorCopy(need(p + "input_layernorm.weight"), (H,), "attn_norm", i),
                TensorCopy(p + "self_attn.q_proj.weight", (q_rows, H), "wqkv", i),
                TensorCopy(p + "self_attn.k_proj.weight", (kv_rows, H), "wqkv", i, row_offset=q_rows),
                TensorCopy(p + "self_attn.v_proj.weight", (kv_rows, H), "wqkv", i, row_offset=q_rows + kv_rows),
                TensorCopy(p + "self_attn.o_proj.weight", (H, q_rows), "wo", i),
                TensorCopy(p + "post_attention_layernorm.weight", (H,), "ffn_norm", i),
            ]
            if checkpoint.has(p + "mlp.experts.gate_up_proj"):  # fused experts
                fused = checkpoint.files[p + "mlp.experts.gate_up_proj"].shape(p + "mlp.experts.gate_up_proj")
                if fused[:1] != (E,):
                    raise ModelLoadError(f"tensor '{p}mlp.experts.gate_up_proj' has shape {list(fused)}, "
                                         f"expected {E} experts first")
                plan.append(TensorCopy(p + "mlp.gate.weight", (E, H), "router", i))
                for e in range(E):
                    plan += [
                        TensorCopy(p + "mlp.experts.gate_up_proj", (E, 2 * F, H), "w13", i, e, expert_index=e),
                        TensorCopy(p + "mlp.experts.down_proj", (E, H, F), "w2", i, e, expert_index=e),
                    ]
            else:
                moe = p + "block_sparse_moe."
                plan.append(TensorCopy(moe + "gate.weight", (E, H), "router", i))
                for e in range(E):
                    x = f"{moe}experts.{e}."
                    plan += [
                        TensorCopy(need(x + "w1.weight"), (F, H), "w13", i, e),
                        TensorCopy(x + "w3.weight", (F, H), "w13", i, e, row_offset=F),
                        TensorCopy(x + "w2.weight", (H, F), "w2", i, e),
                    ]
    else:
        plan += [
            TensorCopy("tok_embeddings.weight", (c.vocab_size, H), "embed"),
            TensorCopy("output.weight", (c.vocab_size, H), "lm_head"),
            TensorCopy("norm.weight", (H,), "final_norm"),
        ]
        for i in range(c.num_layers):
            p = f"layers.{i}."
            plan += [
                TensorCopy(need(p + "attention_norm.weight"), (H,), "attn_norm", i),
                TensorCopy(p + "attention.wq.weight", (q_rows, H), "wqkv", i, interleaved_heads=c.num_heads),
                TensorCopy(p + "attention.wk.weight", (kv_rows, H), "wqkv", i, row_offset=q_rows,
                           interleaved_heads=c.num_kv_heads),
                TensorCopy(p + "attention.wv.weight", (kv_rows, H), "wqkv", i, row_offset=q_rows + kv_rows),
                TensorCopy(p + "attention.wo.weight", (H, q_rows), "wo", i),
                TensorCopy(p + "ffn_norm.weight", (H,), "ffn_norm", i),
                TensorCopy(p + "feed_forward.gate.weight", (E, H), "router", i),
            ]
            for e in range(E):
                x = f"{p}feed_forward.experts.{e}."
                plan += [
                    TensorCopy(need(x + "w1.weight"), (F, H), "w13", i, e),
                    TensorCopy(x + "w3.weight", (F, H), "w13", i, e, row_offset=F),
                    TensorCopy(x + "w2.weight", (H, F), "w2", i, e),
                ]
    return plan


def _scale_name(name: str) -> str:
    return name.removesuffix("weight") + "weight_scale"


def is_fp8(checkpoint: Checkpoint, name: str) -> bool:
    return checkpoint.files[name].dtype(name) == "F8_E4M3"


def experts_in_fp8(checkpoint: Checkpoint, plan: list[TensorCopy]) -> bool:
    """Whether the checkpoint stores its expert weights in FP8."""
    return any(copy.slot in ("w13", "w2") and checkpoint.has(copy.name) and is_fp8(checkpoint, copy.name)
               for copy in plan)


def experts_in_int4(checkpoint: Checkpoint, plan: list[TensorCopy]) -> bool:
    """Whether the checkpoint stores its expert weights as int4 codes."""
    return any(copy.slot in ("w13", "w2") and checkpoint.int4_module(copy.name) is not None for copy in plan)


def check_plan(checkpoint: Checkpoint, plan: list[TensorCopy]) -> int:
    """Checks that every planned tensor exists with its shape (and an FP8 one its scale); returns
    the bytes to copy."""
    total = 0
    for copy in plan:
        module = checkpoint.int4_module(copy.name)
        if module is not None:
            total += checkpoint.int4_reader().check(module, *copy.shape)
            continue
        if not checkpoint.has(copy.name):
            int4 = checkpoint.config.int4
            raise ModelLoadError(f"missing tensor '{copy.name}' in the checkpoint" +
                                 (f" (nor its int4 '{int4.packed_name(copy.name.removesuffix('.weight'))}')"
                                  if int4 and copy.name.endswith(".weight") else ""))
        st = checkpoint.files[copy.name]
        if st.shape(copy.name) != copy.shape:
            raise ModelLoadError(
                f"{st.path}: tensor '{copy.name}' has shape {list(st.shape(copy.name))}, expected {list(copy.shape)}"
            )
        if is_fp8(checkpoint, copy.name):
            scale = _scale_name(copy.name)
            if copy.expert_index is not None:
                raise ModelLoadError(f"{st.path}: FP8 fused expert tensors ('{copy.name}') are not supported")
            if not checkpoint.has(scale):
                raise ModelLoadError(f"{st.path}: FP8 tensor '{copy.name}' has no '{scale}' beside it")
            rows, scale_file = copy.shape[0], checkpoint.files[scale]
            if scale_file.dtype(scale) != "F32" or scale_file.shape(scale) not in ((), (1,), (rows,), (rows, 1)):
                raise ModelLoadError(f"'{scale}' is {scale_file.dtype(scale)}{list(scale_file.shape(scale))}: one F32 "
                                     f"scale per tensor or per output row ({rows}) expected")
        nbytes = st.nbytes(copy.name)
        total += nbytes // copy.shape[0] if copy.expert_index is not None else nbytes
    return total


def rotate_half_rows(num_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns interleaved RoPE pairs (x0, x1), (x2, x3), ... of each
    head into the rotate-half layout (x0, x2, ..., x1, x3, ...)."""
    half = np.arange(head_dim // 2)
    within = np.concatenate([2 * half, 2 * half + 1])
    return (np.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _row_scales(checkpoint: Checkpoint, name: str, rows: int) -> np.ndarray:
    """The float32 scale of each output row of FP8 tensor `name` (checked by check_plan)."""
    scale, _ = checkpoint.files[_scale_name(name)].tensor(_scale_name(name))
    return np.ascontiguousarray(np.broadcast_to(scale.reshape(-1), (rows,)), dtype=np.float32)


def load_into(core, checkpoint: Checkpoint, plan: list[TensorCopy], total_bytes: int, progress: bool | None,
              int4_experts: bool = False) -> None:
    """Copies every planned tensor into the engine core; int4 expert weights as they are when the
    engine keeps its experts in int4."""
    show = total_bytes >= _PROGRESS_BYTES if progress is None else progress
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for copy in plan:
            module = checkpoint.int4_module(copy.name)
            if module is not None:
                reader = checkpoint.int4_reader()
                stored_bytes = reader.check(module, *copy.shape)
                weight = reader.read(module, *copy.shape)
                if copy.rows:
                    weight = weight.rows(*copy.rows)
                if int4_experts and copy.slot in ("w13", "w2"):
                    if copy.cols:
                        weight = weight.columns(*copy.cols, checkpoint.config.int4.group_size, copy.name)
                    try:
                        core.load_weight_int4(copy.slot, copy.layer, copy.expert, copy.row_offset, weight.packed,
                                              weight.scales, weight.zeros, weight.groups)
                    except MixtralError as e:  # codes, zeros or groups the engine's int4 cannot hold
                        raise ModelLoadError(f"'{checkpoint.config.int4.packed_name(module)}': {e}") from e
                    bar.update(stored_bytes)
                    continue
                array, dtype = weight.dequantized(), "float32"
                scales = None
            else:
                array, dtype = checkpoint.files[copy.name].tensor(copy.name)
                scales = _row_scales(checkpoint, copy.name, array.shape[0]) if dtype == "float8_e4m3" else None
                if copy.expert_index is not None:
                    array = array[copy.expert_index]
                if copy.interleaved_heads:
                    order = rotate_half_rows(copy.interleaved_heads, array.shape[0] // copy.interleaved_heads)
                    array = array[order]
                    scales = None if scales is None else scales[order]
                if copy.rows:
                    array = array[slice(*copy.rows)]
                    scales = None if scales is None else scales[slice(*copy.rows)]
            if copy.cols:
                array = array[:, slice(*copy.cols)]
            core.load_weight(copy.slot, copy.layer, copy.expert, copy.row_offset, np.ascontiguousarray(array), dtype,
                             scales)
            bar.update(stored_bytes if module is not None else array.nbytes)
    missing = core.missing_weights()
    if missing:
        raise ModelLoadError("weights left unfilled: " + "; ".join(missing[:8]))
    log.info("loaded %.3f GB of weights (%s checkpoint)", total_bytes / 1e9, checkpoint.format)
