"""CPU benchmark: this engine against Hugging Face transformers' eager
MixtralForCausalLM on the same random checkpoint (float32, one stream):
prefill time for a prompt and decode time per token, with the weight bytes
each decode step reads over the time it takes (GB/s); then the sampler's time per token at
Mixtral's vocabulary (32768) under each cut, on flat logits (as random weights give, where top_p
and min_p keep most of the vocabulary) and on peaked ones (as a trained model gives); then decode
tokens/s of the demo model for num_threads measured (the default), 1 and every core, alone and beside
one busy process that takes a core.

    python benchmarks/bench_cpu.py [--layers 4] [--prompt 128] [--decode 32] [--thread-tokens 1000]

Prints a markdown table; asserts nothing (the tests check the numerics).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import transformers

import mixtral_ext
from bench_ops import SAMPLING_BENCH, sampling_seconds
from mixtral_ext import _C
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint


def active_weight_bytes(c) -> int:
    """Bytes of weights one decode token reads: attention, router, top-k experts, lm_head row-products."""
    D = c.head_dim
    attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * D + c.num_heads * D * c.hidden_size
    experts = c.experts_per_token * 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + experts + c.num_experts * c.hidden_size
    return 4 * (c.num_layers * per_layer + c.vocab_size * c.hidden_size)


def time_engine(engine, prompt, decode):
    with engine.new_sequence() as seq:
        start = time.perf_counter()
        logits = seq.append(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            logits = seq.append([int(np.argmax(logits))])
        return prefill, (time.perf_counter() - start) / decode


def time_hf(model, prompt, decode):
    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(decode):
            out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
        return prefill, (time.perf_counter() - start) / decode


def busy_loop() -> None:
    while True:
        pass


def decode_rate(num_threads, tokens: int) -> tuple[float, float]:
    """(first-token ms of a 32-token prompt, decode tokens/s) of a fresh demo engine, greedy."""
    with mixtral_ext.Engine.synthetic(DEMO_CONFIG, max_context=tokens + 64, num_threads=num_threads) as engine:
        with engine.new_sequence() as seq:
            start = time.perf_counter()
            logits = seq.append(list(range(1, 33)))
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(tokens):
                logits = seq.append([int(np.argmax(logits))])
            return 1e3 * first, tokens / (time.perf_counter() - start)


def thread_table(tokens: int) -> None:
    cores = _C.ThreadTuner.available_threads
    settings = [("measured (default)", None), ("1", 1)] + ([(f"{cores} (all)", cores)] if cores > 1 else [])
    print(f"\ndecode of the demo model by num_threads, {cores} cores, {tokens} tokens: first-token ms / tokens per s\n")
    print("| num_threads | alone | beside one busy process |")
    print("|---|---|---|")
    alone = {name: decode_rate(n, tokens) for name, n in settings}
    busy = multiprocessing.Process(target=busy_loop, daemon=True)
    busy.start()
    try:
        beside = {name: decode_rate(n, tokens) for name, n in settings}
    finally:
        busy.kill()
    for name, _ in settings:
        cells = [f"{first:.1f} / {rate:.0f}" for first, rate in (alone[name], beside[name])]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--thread-tokens", type=int, default=1000, help="tokens per run of the thread table")
    args = parser.parse_args()
    config = replace(DEMO_CONFIG, num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                     head_dim=args.hidden // DEMO_CONFIG.num_heads)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, size=args.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp, config)
        engine = mixtral_ext.Engine.from_pretrained(tmp, max_context=args.prompt + args.decode + 1)
        model = transformers.MixtralForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        ours = time_engine(engine, prompt, args.decode)
        theirs = time_hf(model, prompt, args.decode)
    weight_gb = active_weight_bytes(config) / 1e9
    print(f"\nCPU, float32, {torch.get_num_threads()} threads; hidden {config.hidden_size}, ffn {config.intermediate_size}, "
          f"{config.num_layers} layers, {config.num_experts} experts top-{config.experts_per_token}, vocab {config.vocab_size}\n")
    print("| engine | prefill ms (%d tok) | decode ms/token | decode weight GB/s |" % args.prompt)
    print("|---|---|---|---|")
    for name, (prefill, decode) in (("mixtral_ext", ours), ("HF transformers eager", theirs)):
        print(f"| {name} | {1e3 * prefill:.1f} | {1e3 * decode:.2f} | {weight_gb / decode:.1f} |")
    print(f"\nmixtral_ext vs HF: prefill x{theirs[0] / ours[0]:.2f}, decode x{theirs[1] / ours[1]:.2f}")

    vocab, ops, rng = 32768, _C.Ops("cpu"), np.random.default_rng(1)
    flat, peaked = (scale * rng.standard_normal(vocab).astype(np.float32) for scale in (0.3, 3.0))
    print(f"\nsampling, one draw at vocabulary {vocab} (ms)\n")
    print("| settings | flat logits, N(0, 0.3^2) | peaked logits, N(0, 3^2) |")
    print("|---|---|---|")
    for settings in SAMPLING_BENCH:
        label = ", ".join(f"{k}={v}" for k, v in settings.items())
        times = [1e3 * sampling_seconds(ops, logits, settings, 200) for logits in (flat, peaked)]
        print(f"| {label} | {times[0]:.3f} | {times[1]:.3f} |")
    thread_table(args.thread_tokens)


if __name__ == "__main__":
    main()
