"""CPU benchmark: this engine against Hugging Face transformers' eager
MixtralForCausalLM on the same random checkpoint (float32, one stream):
prefill time for a prompt and decode time per token, with the weight bytes
each decode step reads over the time it takes (GB/s).

    python benchmarks/bench_cpu.py [--layers 4] [--prompt 128] [--decode 32]

Prints a markdown table; asserts nothing (the tests check the numerics).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import transformers

import mixtral_ext
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
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


if __name__ == "__main__":
    main()
