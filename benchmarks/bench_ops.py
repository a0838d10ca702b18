"""Operation benchmarks of the CUDA backend at Mixtral-8x22B shapes (bf16), each
against what the same run measures on the same card: the device copy bandwidth
and the bf16 matmul rate (both with torch). Never asserts; prints a markdown
table (then one line on the expert paths) last and writes JSON.

    python benchmarks/bench_ops.py [--out DIR] [--device cuda|cpu] [--small]

--small shrinks every shape (a smoke run of the script, e.g. on the CPU).
Columns: ms per call; GB/s of the bytes the op must move (weights read, plus
activations); TFLOP/s; the fraction of the copy bandwidth (memory-bound ops)
or of the matmul rate (compute-bound ones) reached; the expert GEMM rows
include FP8 and int4 weights (expert_dtype "float8_e4m3", "int4"; w2 at decode too); the sampler's rows
time one draw under
each cut (greedy, top_k, top_p, min_p). After the table, the
fastest expert GEMM path for 1 to 32 tokens (where the dispatcher should switch
from batched to per-expert).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from torch_timing import copy_bandwidth, matmul_rate, seconds_per_call

from mixtral_ext import _C
from mixtral_ext.cuda import backend_library

# Mixtral-8x22B: hidden 6144, 48 query / 8 KV heads of 128, 8 experts of width 16384, top-2, vocab 32768.
FULL = dict(hidden=6144, heads=48, kv_heads=8, head_dim=128, ffn=16384, experts=8, k=2, vocab=32768,
            prefill=2048, context=2048, page=16)
SMALL = dict(hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=512, experts=8, k=2, vocab=1024,
             prefill=64, context=128, page=16)
# int4 experts' groups: input columns per float16 scale and uint8 zero (csrc/core/int4.h, the default).
INT4_GROUP = 128


def int4_bytes(rows: int, cols: int) -> int:
    """The bytes an int4 weight [rows, cols] streams: codes, scales and zeros."""
    return rows * (cols // 2 + 3 * -(-cols // INT4_GROUP))


# The sampling settings timed: greedy, and each cut alone at temperature 1.
SAMPLING_BENCH = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=40),
                  dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, min_p=0.05)]


def sampling_seconds(ops, logits: np.ndarray, settings: dict, iters: int) -> float:
    """Mean seconds of one draw from logits [V] under the settings (SAMPLING_BENCH's form)."""
    params = _C.SamplingParams()
    for name, value in settings.items():
        setattr(params, name, value)
    return ops.time_sample(logits, params, iters)



def sdpa_seconds(device: str, tokens: int, context: int, heads: int, kv_heads: int, head_dim: int, iters: int) -> float:
    """torch's scaled_dot_product_attention, bf16, grouped KV heads; causal over the last `tokens` positions."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    q = torch.randn(1, heads, tokens, head_dim, dtype=torch.bfloat16, device=dev)
    k = torch.randn(1, kv_heads, context, head_dim, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    # Query i sits at position context - tokens + i: with tokens == context that is plain causal.
    causal = tokens == context and tokens > 1

    return seconds_per_call(dev, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
                            iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--torch-device", default=None,
                        help="where torch measures the floors and SDPA (default: --device; cpu for the emulator)")
    args = parser.parse_args()
    torch_device = args.torch_device or args.device
    s = SMALL if args.small else FULL
    ops = _C.Ops(args.device, backend_library() if args.device == "cuda" else "")
    import torch

    copy_gbs = copy_bandwidth(torch.device(torch_device), args.small)
    matmul_tflops = matmul_rate(torch.device(torch_device), args.small)
    iters = 3 if args.small else 20
    H, F, E, k, D = s["hidden"], s["ffn"], s["experts"], s["k"], s["head_dim"]
    qkv_width = (s["heads"] + 2 * s["kv_heads"]) * D
    rows = []
    # Each row prints as it is measured, so a run cut short still shows what it measured.
    print(f"\n{torch_device}: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {matmul_tflops:.0f} TFLOP/s "
          f"(torch, this run)\n")
    print("| op | shape | ms | GB/s | TFLOP/s | bound | of floor |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def add(name, shape, seconds, bytes_moved, flops):
        gbs, tflops = bytes_moved / seconds / 1e9, flops / seconds / 1e12
        memory_bound = bytes_moved / copy_gbs > flops / (matmul_tflops * 1e3)
        floor = gbs / copy_gbs if memory_bound else tflops / matmul_tflops
        row = dict(op=name, shape=shape, ms=seconds * 1e3, gb_per_s=gbs, tflop_per_s=tflops,
                   bound="memory" if memory_bound else "compute", fraction_of_floor=floor)
        rows.append(row)
        print(f"| {row['op']} | {row['shape']} | {row['ms']:.4f} | {row['gb_per_s']:.0f} | {row['tflop_per_s']:.1f} | "
              f"{row['bound']} | {row['fraction_of_floor']:.0%} |", flush=True)

    # Dense projections at decode (1 row) and prefill.
    for m in (1, s["prefill"]):
        for name, n, kk in (("qkv", qkv_width, H), ("o", H, s["heads"] * D), ("lm_head", s["vocab"], H)):
            out_dtype = "float32" if name == "lm_head" else "bfloat16"
            sec = ops.time_matmul(m, n, kk, "bfloat16", out_dtype, iters)
            add(f"matmul {name}", f"{m}x{kk} @ {n}x{kk}", sec, 2 * (n * kk + m * kk + m * n), 2 * m * n * kk)

    # Expert GEMMs, the three cuBLAS paths: w13 at decode (2 experts, one row each) and prefill
    # (all experts, 2048 * 2 rows spread evenly). Not the batched path at prefill: one 1-row GEMM
    # per row (4096), each streaming a whole expert, a path auto never takes past kBatchedMaxRows.
    decode_rows = [1, 0, 0, 1] + [0] * (E - 4)
    prefill_rows = [s["prefill"] * k // E] * E
    paths = ["per_expert", "batched", "grouped"] if args.device == "cuda" else ["auto"]
    for label, split in (("decode", decode_rows), ("prefill", prefill_rows)):
        r = sum(split)
        used = sum(1 for c in split if c)
        for path in paths:
            if path == "batched" and label == "prefill":
                continue
            if args.device == "cuda":
                ops.set_option("expert_gemm", path)
            sec = ops.time_expert_matmul(split, 2 * F, H, "bfloat16", iters)
            add(f"experts w13 {path}", f"{label}: {r} rows, {used} experts", sec,
                2 * (used * 2 * F * H + r * H + r * 2 * F), 2 * r * 2 * F * H)
        # FP8 expert weights (expert_dtype="float8_e4m3"): one byte per weight and a float32 scale per row;
        # int4 ("int4"): half a byte per weight, a float16 scale and a byte of zero per 128 (INT4_GROUP).
        sec = ops.time_expert_matmul(split, 2 * F, H, "bfloat16", iters, "float8_e4m3")
        add("experts w13 fp8", f"{label}: {r} rows, {used} experts", sec,
            used * 2 * F * (H + 4) + 2 * (r * H + r * 2 * F), 2 * r * 2 * F * H)
        sec = ops.time_expert_matmul(split, 2 * F, H, "bfloat16", iters, "int4")
        add("experts w13 int4", f"{label}: {r} rows, {used} experts", sec,
            int4_bytes(used * 2 * F, H) + 2 * (r * H + r * 2 * F), 2 * r * 2 * F * H)
    # w2 at decode (K = F): the bf16 default path beside FP8 and int4.
    r, used = sum(decode_rows), sum(1 for c in decode_rows if c)
    for name, expert_dtype, weight_bytes in (("bf16", "", used * H * F * 2), ("fp8", "float8_e4m3", used * H * (F + 4)),
                                             ("int4", "int4", int4_bytes(used * H, F))):
        sec = ops.time_expert_matmul(decode_rows, H, F, "bfloat16", iters, expert_dtype)
        add(f"experts w2 {name}", f"decode: {r} rows, {used} experts", sec, weight_bytes + 2 * (r * F + r * H),
            2 * r * H * F)
    # Where the dispatcher should switch paths: w13 for 1 to 32 tokens routed at random (top-k of E,
    # seeded), every path; the fastest per row count goes into the JSON and a line after the table.
    sweep = []
    rng = np.random.default_rng(0)
    for tokens in (1, 2, 4, 8, 16, 32):
        chosen = np.concatenate([rng.choice(E, size=k, replace=False) for _ in range(tokens)])
        split = np.bincount(chosen, minlength=E).astype(int).tolist()
        times = {}
        for path in paths:
            if args.device == "cuda":
                ops.set_option("expert_gemm", path)
            times[path] = ops.time_expert_matmul(split, 2 * F, H, "bfloat16", iters) * 1e3
        sweep.append(dict(tokens=tokens, rows=tokens * k, experts=sum(1 for c in split if c), ms=times,
                          fastest=min(times, key=times.get)))
    if args.device == "cuda":
        ops.set_option("expert_gemm", "auto")

    # Attention with 8x22B's head layout: decode (1 query token) at growing contexts (the KV bytes
    # read per second against the copy bandwidth), prefill of the whole context (TFLOP/s against the
    # matmul rate); PyTorch's scaled_dot_product_attention on the same shapes, same run.
    kv_bytes_per_token = 2 * s["kv_heads"] * D * 2
    contexts = [s["context"]] if args.small else [2048, 16384, 65536]
    cases = [(1, ctx) for ctx in contexts] + [(ctx, ctx) for ctx in contexts if ctx <= 16384]
    for tokens, ctx in cases:
        n = iters if tokens == 1 else max(2, iters // 5)
        pairs = tokens * ctx - tokens * (tokens - 1) // 2  # causal (query, key) pairs
        bytes_moved, flops = ctx * kv_bytes_per_token + 2 * tokens * s["heads"] * D * 2, 4 * pairs * s["heads"] * D
        label = "decode" if tokens == 1 else "prefill"
        sec = ops.time_attention(tokens, ctx, s["heads"], s["kv_heads"], D, s["page"], "bfloat16", n)
        add(f"attention {label}", f"{tokens} tokens, {ctx} context", sec, bytes_moved, flops)
        add(f"torch SDPA {label}", f"{tokens} tokens, {ctx} context",
            sdpa_seconds(torch_device, tokens, ctx, s["heads"], s["kv_heads"], D, n), bytes_moved, flops)

    # The sampler, one draw per decode step from logits [V] float32 (it also reads and writes the
    # generation's seen and counts [V] int32), on peaked logits, as a trained model gives.
    logits = (3 * np.random.default_rng(1).standard_normal(s["vocab"])).astype(np.float32)
    for settings in SAMPLING_BENCH:
        label = ", ".join(f"{k}={v}" for k, v in settings.items())
        add("sample", f"vocab {s['vocab']}, {label}", sampling_seconds(ops, logits, settings, iters), 12 * s["vocab"], 0)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_ops.json"), "w") as f:
        json.dump(dict(device=args.device, copy_gb_per_s=copy_gbs, matmul_tflop_per_s=matmul_tflops, ops=rows,
                       expert_path_sweep=sweep), f, indent=2)
    print("\nfastest expert w13 path by rows (auto switches at kBatchedMaxRows, cuda/kernels.cuh): " + "; ".join(
            f"{e['rows']} rows/{e['experts']} experts: {e['fastest']} "
            f"({', '.join(f'{p} {ms:.3f}' for p, ms in e['ms'].items())} ms)" for e in sweep))


if __name__ == "__main__":
    main()
