"""What tensor parallelism costs on one GPU, so that the one-rank path is known to cost nothing: NCCL's
all-reduce of one token's hidden state at N = 1 (torch.distributed, world of one), and the engine's
decode step with its sharded data flow through a one-rank NCCL communicator (two all-reduces a layer,
the combine and norm unfused) against the plain engine, on a synthetic model with CUDA graphs.
Prints a table; more GPUs than one are not measured here.

    python benchmarks/bench_parallel.py --shape 8x22b --layers 4
    python benchmarks/bench_parallel.py --small     # on the CUDA emulator: the table's form, no speed
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch_timing import seconds_per_call

import mixtral_ext
from mixtral_ext.cuda import nccl_library
from mixtral_ext.synthetic import SHAPES


def all_reduce_seconds(hidden: int, small: bool) -> float:
    """One all-reduce of a token's hidden state over a group of one: NCCL's in bfloat16 on the GPU
    (gloo's in float32 on the CPU for --small)."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    device = torch.device("cpu" if small else "cuda")
    dist.init_process_group("gloo" if small else "nccl", store=store, rank=0, world_size=1)
    try:
        x = torch.ones(hidden, dtype=torch.float32 if small else torch.bfloat16, device=device)
        return seconds_per_call(device, lambda: dist.all_reduce(x), 20 if small else 2000)
    finally:
        dist.destroy_process_group()


def decode_ms_per_token(config, new_tokens: int, one_rank_group: bool) -> float:
    engine = mixtral_ext.Engine.synthetic(config, device="cuda", max_context=64 + new_tokens, cuda_graphs=True)
    with engine:
        if one_rank_group:
            library = nccl_library()
            engine._core.join_communicator(library, engine._core.new_communicator_id(library), 0, 1)
        prompt = list(range(3, 67))
        engine.generate(prompt[:8], max_tokens=4, temperature=0, ignore_eos=True)  # warm-up, graphs recorded
        engine.clear_prefix_cache()
        result = engine.generate(prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True)
        return 1e3 / result.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8x22b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a smoke run: demo shape, 1 layer, few tokens")
    args = parser.parse_args()
    config = SHAPES["demo" if args.small else args.shape]
    config = dataclasses.replace(config, num_layers=1 if args.small else args.layers)
    new_tokens = 4 if args.small else args.new_tokens
    if os.environ.get("MIXTRAL_EXT_TEST_DEVICE") == "emulator":
        os.environ.setdefault("MIXTRAL_EXT_NCCL_LIBRARY", os.environ["MIXTRAL_EXT_CUDA_LIBRARY"])
    reduce_us = 1e6 * all_reduce_seconds(config.hidden_size, args.small)
    plain = decode_ms_per_token(config, new_tokens, one_rank_group=False)
    grouped = decode_ms_per_token(config, new_tokens, one_rank_group=True)
    layers = config.num_layers
    where = "a smoke run (gloo on the CPU, the engine on the CUDA emulator)" if args.small else torch.cuda.get_device_name()
    print(f"tensor parallel at N = 1 on {where}: {args.shape if not args.small else 'demo'}, {layers} layers, "
          f"CUDA graphs\n")
    print("| measurement | time | per layer | against plain |")
    print("|---|---|---|---|")
    print(f"| all-reduce of {config.hidden_size} {'float32' if args.small else 'bf16'} values, N = 1 | "
          f"{reduce_us:.1f} us | | |")
    print(f"| decode, plain engine | {plain:.3f} ms/token | {plain / layers:.4f} ms | 1.00 |")
    print(f"| decode, one-rank NCCL group | {grouped:.3f} ms/token | {grouped / layers:.4f} ms | {grouped / plain:.2f} |")


if __name__ == "__main__":
    main()
