"""Memory planning before anything loads: what an engine of a model and settings allocates on its
device (weights, workspace, the runtime reserve, the KV cache), and the longest context that fits a
given memory. Every figure comes from the core's own plan (Engine.memory_plan, the one the engine
allocates by) and the reserve the engine keeps when it sizes its KV cache by kv_cache_fraction; no
other estimate exists to drift from them. A model is a MixtralConfig, a shape name of SHAPES, or a
model directory, of which only config.json or params.json is read.

    plan = plan_memory("8x22b", expert_dtype="float8_e4m3", max_context=32768)
    plan.total_bytes, longest_context("8x22b", parse_memory("h200"), expert_dtype="float8_e4m3")
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, replace

from . import _C
from .config import MixtralConfig
from .engine import RUNTIME_RESERVE_BYTES, _EngineOptions
from .errors import SettingError
from .synthetic import SHAPES
from .weights import read_config

# Total memory of the cards, as nvidia-smi reports it (MiB): H100 SXM 80GB and H200 141GB.
CARDS = {"h100": 81_559 << 20, "h200": 143_771 << 20}
# The table's rows: label -> (dtype, expert_dtype).
PLAN_DTYPES = {"bf16": ("bfloat16", None), "fp16": ("float16", None), "fp8": ("bfloat16", "float8_e4m3"),
               "int4": ("bfloat16", "int4")}
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30,
          "ti": 1 << 40}  # of bytes, the B left off


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes an engine of these settings allocates on its device. kv_cache_bytes holds
    kv_cache_tokens rounded up to whole pages; total_bytes adds everything."""

    device: str
    dtype: str
    expert_dtype: str
    max_context: int
    kv_cache_tokens: int
    page_size: int
    weight_bytes: int
    workspace_bytes: int
    reserve_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes + self.reserve_bytes + self.kv_cache_bytes


def model_config(model: MixtralConfig | str | os.PathLike) -> MixtralConfig:
    """The config of a MixtralConfig, a shape name (demo, 8x7b, 8x22b) or a model directory."""
    if isinstance(model, MixtralConfig):
        return model
    if isinstance(model, str) and model in SHAPES:
        return SHAPES[model]
    if not isinstance(model, (str, os.PathLike)):
        raise SettingError(f"model must be a MixtralConfig, one of {sorted(SHAPES)} or a directory, got {model!r}")
    return read_config(model)[1]


def plan_memory(model: MixtralConfig | str | os.PathLike, *, device: str = "cuda", dtype: str | None = None,
                expert_dtype: str | None = None, max_context: int | None = None, kv_cache_tokens: int | None = None,
                page_size: int = 16, max_batch_tokens: int | None = None) -> MemoryPlan:
    """What Engine.from_pretrained(model, ...) with these settings allocates (defaults as there;
    max_context defaults to the model's max_position_embeddings, kv_cache_tokens to max_context).
    No GPU is needed: the plan is arithmetic on the config."""
    config = model_config(model)
    options = _EngineOptions.checked(device, dtype, page_size, max_batch_tokens, False, expert_dtype, None)
    if config.int4 is not None:  # int4 experts in the checkpoint's groups
        options = replace(options, int4_group_size=config.int4.group_size, int4_act_order=config.int4.act_order)
    if kv_cache_tokens is None:
        kv_cache_tokens = config.max_position_embeddings if max_context is None else max_context
    max_context, kv_cache_tokens = options.context(config, max_context, kv_cache_tokens, None)
    weights, workspace, token_bytes = _C.Engine.memory_plan(
        config.to_core(), options.dtype, options.activation_dtype, max_context, options.page_size,
        options.max_batch_tokens, options.expert_dtype, options.int4_group_size, 0, options.int4_act_order)
    pages = -(-kv_cache_tokens // options.page_size)
    return MemoryPlan(device=options.device, dtype=options.dtype, expert_dtype=options.expert_dtype or options.dtype,
                      max_context=max_context, kv_cache_tokens=kv_cache_tokens, page_size=options.page_size,
                      weight_bytes=weights, workspace_bytes=workspace, reserve_bytes=RUNTIME_RESERVE_BYTES,
                      kv_bytes_per_token=token_bytes, kv_cache_bytes=pages * options.page_size * token_bytes)


def longest_context(model: MixtralConfig | str | os.PathLike, memory_bytes: int, **settings) -> int:
    """The longest max_context (up to max_position_embeddings) whose plan_memory(model, **settings)
    fits memory_bytes, with a KV cache for one sequence of it; 0 when not even one token fits."""
    config = model_config(model)
    if "max_context" in settings or "kv_cache_tokens" in settings:
        raise SettingError("longest_context searches max_context itself, with a KV cache of one sequence of it")
    fits = lambda tokens: plan_memory(config, max_context=tokens, **settings).total_bytes <= memory_bytes  # noqa: E731
    low, high = 0, config.max_position_embeddings
    while low < high:  # the workspace grows with the context too (its page table), so search the plan itself
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def parse_memory(text: str | int) -> int:
    """Bytes of "80GB", "80G", "141 GB", "80GiB", "85e9", an integer, or a card name (h100, h200)."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool) and text > 0:
        return int(text)
    if isinstance(text, str):
        key = text.strip().lower()
        if key in CARDS:
            return CARDS[key]
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b?|b)?", key)
        if match:
            size = float(match.group(1)) * _UNITS[(match.group(2) or "").removesuffix("b")]
            if math.isfinite(size) and size >= 1:
                return int(size)
    raise SettingError(f"memory must be a size such as 80GB, 80GiB or 85e9 bytes, or one of {sorted(CARDS)}; "
                       f"got {text!r}")


def memory_table(model: MixtralConfig | str | os.PathLike, *, memory_bytes: int | None = None,
                 contexts=DEFAULT_CONTEXTS, device: str = "cuda") -> list[dict]:
    """One row per PLAN_DTYPES entry (int4 only for even expert widths): the plan's fixed bytes, the KV bytes per token, the total at each
    context (None past max_position_embeddings) and, given memory_bytes, which contexts fit, the
    longest that does, and the KV-cache tokens that the memory left after the weights, the workspace
    and the reserve holds (over all sequences, however long each may be)."""
    config = model_config(model)
    if not contexts or min(contexts) < 1:
        raise SettingError(f"contexts must be positive token counts, got {contexts!r}")
    rows = []
    for label, (dtype, expert_dtype) in PLAN_DTYPES.items():
        if expert_dtype == "int4" and (config.hidden_size % 2 or config.intermediate_size % 2):
            continue  # two codes a byte: int4 experts need even widths
        settings = dict(device=device, dtype=dtype, expert_dtype=expert_dtype)
        base = plan_memory(config, max_context=min(contexts[0], config.max_position_embeddings), **settings)
        totals = {tokens: plan_memory(config, max_context=tokens, **settings).total_bytes
                  if tokens <= config.max_position_embeddings else None for tokens in contexts}
        row = dict(dtype=label, weight_bytes=base.weight_bytes, workspace_bytes=base.workspace_bytes,
                   reserve_bytes=base.reserve_bytes, kv_bytes_per_token=base.kv_bytes_per_token,
                   total_bytes=totals)
        if memory_bytes is not None:
            row["fits"] = {tokens: total is not None and total <= memory_bytes for tokens, total in totals.items()}
            row["longest_context"] = longest_context(config, memory_bytes, **settings)
            left = memory_bytes - base.weight_bytes - base.workspace_bytes - base.reserve_bytes
            row["kv_tokens"] = max(0, left) // base.kv_bytes_per_token
        rows.append(row)
    return rows


def format_table(rows: list[dict], memory_bytes: int | None = None) -> str:
    """rows of memory_table as markdown, sizes in GiB; a context that does not fit is marked."""
    gib = lambda n: f"{n / (1 << 30):.1f}"  # noqa: E731
    contexts = list(rows[0]["total_bytes"])
    head = ["expert dtype", "weights GiB", "workspace GiB", "reserve GiB", "KV MiB per 1k tokens"]
    head += [f"total at {tokens // 1024}k" if tokens % 1024 == 0 else f"total at {tokens:,}" for tokens in contexts]
    if memory_bytes is not None:
        head += [f"longest context in {gib(memory_bytes)} GiB", "KV-cache tokens left"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dtype"], gib(row["weight_bytes"]), f"{row['workspace_bytes'] / (1 << 30):.2f}",
                 f"{row['reserve_bytes'] / (1 << 30):.2f}", f"{1024 * row['kv_bytes_per_token'] / (1 << 20):.0f}"]
        for tokens, total in row["total_bytes"].items():
            fits = row.get("fits", {}).get(tokens, True)
            cells.append("—" if total is None else gib(total) + ("" if fits else " ✗"))
        if memory_bytes is not None:
            cells.append(f"{row['longest_context']:,}" if row["longest_context"] else "does not fit")
            cells.append(f"{row['kv_tokens']:,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(rows: list[dict], path: str, title: str, memory_bytes: int | None = None) -> None:
    """Memory against context, one line per dtype, and the card's capacity as a horizontal line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SettingError("plotting needs matplotlib: pip install 'mixtral_ext[plot]'") from e
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        points = [(tokens, total / (1 << 30)) for tokens, total in row["total_bytes"].items() if total is not None]
        axes.plot(*zip(*points), marker="o", label=row["dtype"])
    if memory_bytes is not None:
        axes.axhline(memory_bytes / (1 << 30), color="black", linestyle="--", label=f"{memory_bytes / (1 << 30):.0f} GiB")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("context (tokens)")
    axes.set_ylabel("GPU memory (GiB)")
    axes.set_title(title)
    axes.legend()
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
