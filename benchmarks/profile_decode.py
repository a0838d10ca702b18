"""Where a decode step's time goes, kernel by kernel, read by Nsight Compute (ncu) on the GPU.

A synthetic model at Mixtral-8x22B widths (bf16, --layers layers) prefills a random prompt of
--context tokens, then generates greedily; only the kernels of --steps decode steps lie between
cudaProfilerStart and cudaProfilerStop, and the script runs itself under

    ncu --profile-from-start off --clock-control none --metrics <time, DRAM bytes> --csv

For each kernel: launches, microseconds and DRAM bytes per decode step (per layer where it runs
once per layer), the share of the step's kernel time, and GB/s against the copy bandwidth that
the same run measures with torch. ncu runs every kernel alone, each with a cold L2, so the sum
of kernel times is not the step time: `mixtral-ext bench` gives that, and the difference is the
launch gaps. Never asserts; prints a markdown table last and writes profile_decode.json and
ncu's raw CSV under --out.

    python benchmarks/profile_decode.py [--layers 1] [--context 2048] [--steps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np

TIME = "gpu__time_duration.sum"
DRAM_READ = "dram__bytes_read.sum"
DRAM_WRITE = "dram__bytes_write.sum"
SAMPLER_KERNEL = "sample_kernel"  # one launch per decode step: the step count


def run_decode(layers: int, context: int, steps: int, device: str) -> None:
    """The profiled program: prefill outside the profiler's window, `steps` decode steps inside it."""
    import mixtral_ext
    from mixtral_ext.synthetic import SHAPES

    config = dataclasses.replace(SHAPES["8x22b"], num_layers=layers)
    engine = mixtral_ext.Engine.synthetic(config, device=device, dtype="bfloat16", max_context=context + steps + 8,
                                          max_batch_tokens=context)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, context).tolist()
    deltas = engine.stream(prompt, max_tokens=steps + 2, temperature=0, ignore_eos=True)
    next(deltas)  # prefill and the first token
    next(deltas)  # one decode step unprofiled (warm-up)
    profiler = None
    if device == "cuda":
        import torch

        profiler = torch.cuda.cudart()
        torch.cuda.synchronize()
        profiler.cudaProfilerStart()
    for _ in deltas:
        pass
    if profiler is not None:
        torch.cuda.synchronize()
        profiler.cudaProfilerStop()


def read_ncu_csv(text: str) -> list[dict]:
    """Rows of ncu's `--csv --page raw --print-units base` output: kernel name and metric values."""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text[start:])):
        if not row.get("ID", "").strip().isdigit():
            continue  # the units row
        values = {m: float(row[m].replace(",", "")) for m in (TIME, DRAM_READ, DRAM_WRITE) if row.get(m, "").strip()}
        rows.append(dict(kernel=row["Kernel Name"], **values))
    return rows


def summarize(rows: list[dict], layers: int, copy_gbs: float) -> dict:
    """Per kernel name: launches, ns and bytes per decode step; the steps are the sampler's launches."""
    steps = sum(1 for r in rows if SAMPLER_KERNEL in r["kernel"]) or 1
    totals: dict[str, dict] = defaultdict(lambda: dict(launches=0, ns=0.0, bytes=0.0))
    for r in rows:
        t = totals[r["kernel"]]
        t["launches"] += 1
        t["ns"] += r.get(TIME, 0.0)
        t["bytes"] += r.get(DRAM_READ, 0.0) + r.get(DRAM_WRITE, 0.0)
    step_ns = sum(t["ns"] for t in totals.values()) / steps
    kernels = []
    for name, t in sorted(totals.items(), key=lambda item: -item[1]["ns"]):
        ns = t["ns"] / steps
        kernels.append(dict(kernel=name, launches_per_step=t["launches"] / steps, us_per_step=ns / 1e3,
                            share=ns / step_ns if step_ns else 0.0, mbytes_per_step=t["bytes"] / steps / 1e6,
                            gbs=t["bytes"] / t["ns"] if t["ns"] else 0.0,
                            of_copy=(t["bytes"] / t["ns"]) / copy_gbs if t["ns"] and copy_gbs else 0.0))
    return dict(layers=layers, steps=steps, copy_gbs=copy_gbs, kernel_us_per_step=step_ns / 1e3,
                kernel_us_per_layer=step_ns / 1e3 / layers, kernels=kernels)


def table(summary: dict) -> str:
    lines = ["| kernel | launches/step | us/step | share | MB/step | GB/s | of copy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in summary["kernels"]:
        lines.append(f"| {k['kernel'][:60]} | {k['launches_per_step']:.1f} | {k['us_per_step']:.1f} | "
                     f"{k['share']:.1%} | {k['mbytes_per_step']:.1f} | {k['gbs']:.0f} | {k['of_copy']:.0%} |")
    lines.append(f"| sum of kernel times | | {summary['kernel_us_per_step']:.1f} "
                 f"({summary['kernel_us_per_layer']:.1f} per layer) | | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--decode-only", default=None, choices=["cuda", "cpu"],
                        help="run the decode steps without ncu (what ncu runs; cpu: a smoke run)")
    args = parser.parse_args()
    if args.decode_only:
        run_decode(args.layers, args.context, args.steps, args.decode_only)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on the PATH: no profile")
        return 1
    import torch
    from torch_timing import copy_bandwidth

    copy_gbs = copy_bandwidth(torch.device("cuda"))
    raw = os.path.join(args.out, "profile_decode_ncu.csv")
    command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
               "--print-units", "base", "--print-kernel-base", "function", "--metrics",
               ",".join((TIME, DRAM_READ, DRAM_WRITE)), "--log-file", raw, sys.executable, os.path.abspath(__file__),
               "--layers", str(args.layers), "--context", str(args.context), "--steps", str(args.steps),
               "--decode-only", "cuda"]
    done = subprocess.run(command, check=False)
    with open(raw) as f:
        rows = read_ncu_csv(f.read())
    if done.returncode != 0 or not rows:
        print(f"ncu exited with {done.returncode} and {len(rows)} kernel rows: see {raw}")
        return 1
    summary = summarize(rows, args.layers, copy_gbs)
    with open(os.path.join(args.out, "profile_decode.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"decode kernels at 8x22B widths, {args.layers} layer(s), {args.context}-token context, bf16, "
          f"{summary['steps']} steps; copy bandwidth {copy_gbs:.0f} GB/s (ncu: each kernel alone, cold L2)")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
