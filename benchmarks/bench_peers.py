"""Side by side, one run, one card: decode and prefill of Mixtral-8x22B widths
(a few layers, random weights, bf16, batch 1) in this engine and its peers:
Hugging Face transformers' MixtralForCausalLM with eager and grouped_mm
experts, and a gpt-fast-style PyTorch model (static KV cache, the chosen
experts' weights gathered at decode) under torch.compile(mode="reduce-overhead").
All run the same weights (written once as a Hugging Face checkpoint, which this
engine loads), and their logits are compared first. The floor is the active
weight bytes per token over the copy bandwidth measured in the same run.

    python benchmarks/bench_peers.py [--layers 2] [--context 2048] [--out DIR] [--device cuda]
    python benchmarks/bench_peers.py --shape demo --device cpu --context 64 --no-compile   # a smoke run

Writes peers.json and peers.md (and peers.png when matplotlib is there) under --out;
prints the markdown table last. Never asserts on speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F
import transformers
from torch_timing import copy_bandwidth, seconds_per_call

from mixtral_ext import Engine
from mixtral_ext.synthetic import SHAPES


def hf_model(config, device: torch.device) -> transformers.MixtralForCausalLM:
    """A MixtralForCausalLM of `config` in bf16 with the engine's synthetic spread of weights."""
    hf_config = transformers.MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, num_local_experts=config.num_experts,
        num_experts_per_tok=config.experts_per_token, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa",
        experts_implementation="eager")
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.MixtralForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=generator)
            elif "gate.weight" in name or "embed" in name:
                p.normal_(0.0, 1.0, generator=generator)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=generator)
    return model


class FastMixtral(torch.nn.Module):
    """A gpt-fast-style Mixtral on the Hugging Face model's weights: one static KV cache, fused
    qkv, SDPA with grouped KV heads; at decode the two chosen experts' weights are gathered."""

    def __init__(self, hf: transformers.MixtralForCausalLM, max_len: int) -> None:
        super().__init__()
        c = hf.config
        self.heads, self.kv_heads, self.head_dim, self.eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        self.k = c.num_experts_per_tok
        m = hf.model
        self.embed, self.norm, self.lm_head = m.embed_tokens.weight, m.norm.weight, hf.lm_head.weight
        self.layers = []
        for layer in m.layers:
            a = layer.self_attn
            self.layers.append(dict(
                attn_norm=layer.input_layernorm.weight, ffn_norm=layer.post_attention_layernorm.weight,
                wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), wo=a.o_proj.weight,
                gate=layer.mlp.gate.weight, gate_up=layer.mlp.experts.gate_up_proj, down=layer.mlp.experts.down_proj))
        dev, dtype = self.embed.device, self.embed.dtype
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)
        theta = c.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, device=dev, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv_freq)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.max_len = max_len

    def rms(self, x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def rope(self, x, pos):  # x [1, heads, T, D], rotate-half
        half = self.head_dim // 2
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    def moe(self, h, layer):
        probs = F.softmax(h.float() @ layer["gate"].float().T, dim=-1)
        weights, ids = probs.topk(self.k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(h.dtype)
        if h.shape[0] == 1:  # decode: gather the chosen experts' weights
            gate_up = torch.einsum("h,kfh->kf", h[0], layer["gate_up"][ids[0]])
            gate, up = gate_up.chunk(2, dim=-1)
            out = torch.einsum("kf,khf->kh", F.silu(gate) * up, layer["down"][ids[0]])
            return (weights[0, :, None] * out).sum(0, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(layer["gate_up"].shape[0]):  # prefill: the rows of each expert
            rows, slot = torch.where(ids == e)
            if rows.numel():
                gate, up = (h[rows] @ layer["gate_up"][e].T).chunk(2, dim=-1)
                out.index_add_(0, rows, weights[rows, slot, None] * ((F.silu(gate) * up) @ layer["down"][e].T))
        return out

    def forward(self, ids, pos):  # ids [T], pos [T] -> logits [T, V]
        x = self.embed[ids]
        T, D = ids.shape[0], self.head_dim
        mask = torch.arange(self.max_len, device=ids.device)[None, :] <= pos[:, None]
        for i, layer in enumerate(self.layers):
            qkv = self.rms(x, layer["attn_norm"]) @ layer["wqkv"].T
            q, k, v = qkv.split([self.heads * D, self.kv_heads * D, self.kv_heads * D], dim=-1)
            q = self.rope(q.view(T, self.heads, D).transpose(0, 1)[None], pos)
            k = self.rope(k.view(T, self.kv_heads, D).transpose(0, 1)[None], pos)
            self.k_cache[i][:, :, pos] = k
            self.v_cache[i][:, :, pos] = v.view(T, self.kv_heads, D).transpose(0, 1)[None]
            attn = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask[None, None],
                                                  enable_gqa=True)
            x = x + attn[0].transpose(0, 1).reshape(T, -1) @ layer["wo"].T
            x = x + self.moe(self.rms(x, layer["ffn_norm"]), layer)
        return self.rms(x, self.norm) @ self.lm_head.T


def active_bytes_per_layer(config) -> int:
    """bf16 weight bytes one decode token reads per layer: attention, router, the chosen experts."""
    c = config
    attention = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim) * c.hidden_size
    return 2 * (attention + c.num_experts * c.hidden_size + c.experts_per_token * 3 * c.intermediate_size * c.hidden_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x22b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens (prefill), then decode at that context")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    config = dataclasses.replace(SHAPES[args.shape], num_layers=args.layers)
    max_len = args.context + args.steps + 8
    prompt = torch.randint(3, config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1))
    bandwidth = copy_bandwidth(device, small=device.type != "cuda")
    floor_ms = active_bytes_per_layer(config) / (bandwidth * 1e9) * 1e3
    model = hf_model(config, device)

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        engine = Engine.from_pretrained(folder, device=args.device, dtype="bfloat16", max_context=max_len)
        graphs = (Engine.from_pretrained(folder, device=args.device, dtype="bfloat16", max_context=max_len,
                                         cuda_graphs=True) if args.device == "cuda" else None)
    fast = FastMixtral(model, max_len)

    # Same weights, same logits (bf16 everywhere: compared to the scale of the logits).
    check = prompt[:64].tolist()
    with torch.no_grad():
        reference = model(torch.tensor([check], device=device)).logits[0].float().cpu()
        fast_logits = fast(torch.tensor(check, device=device), torch.arange(len(check), device=device)).float().cpu()
    ours = torch.from_numpy(engine.logits(check))
    scale = reference.abs().max().item()
    agreement = {name: dict(max_rel_diff=(other - reference).abs().max().item() / scale,
                            argmax_agree=(other.argmax(-1) == reference.argmax(-1)).float().mean().item())
                 for name, other in (("mixtral_ext", ours), ("gpt-fast-style", fast_logits))}

    rows = []

    def add(name, prefill_s, decode_s, note=""):
        rows.append(dict(engine=name, prefill_ms_per_layer=prefill_s * 1e3 / args.layers,
                         decode_ms_per_layer=decode_s * 1e3 / args.layers,
                         decode_ms_per_token_56_layers=decode_s * 1e3 / args.layers * 56,
                         fraction_of_floor=floor_ms / (decode_s * 1e3 / args.layers), note=note))

    for name, eng in (("mixtral_ext", engine), ("mixtral_ext + CUDA graphs", graphs)):
        if eng is None:
            continue
        eng.generate(prompt[:16].tolist(), max_tokens=4, temperature=0, ignore_eos=True)  # warm-up
        eng.clear_prefix_cache()
        result = eng.generate(prompt.tolist(), max_tokens=args.steps, temperature=0, ignore_eos=True)
        add(name, result.time_to_first_token, 1.0 / result.tokens_per_second)

    ids = prompt[None].to(device)
    for implementation in ("eager", "grouped_mm"):
        try:
            model.set_experts_implementation(implementation)
        except Exception as e:  # an implementation this transformers/torch lacks
            rows.append(dict(engine=f"HF transformers ({implementation})", note=f"unavailable: {e}"))
            continue
        with torch.no_grad():
            prefill_s = seconds_per_call(device, lambda: model(ids, use_cache=True), 1)
            state = {}

            def start():
                out = model(ids, use_cache=True)
                state.update(past=out.past_key_values, token=out.logits[:, -1:].argmax(-1))

            def step():
                out = model(state["token"], past_key_values=state["past"], use_cache=True)
                state.update(past=out.past_key_values, token=out.logits[:, -1:].argmax(-1))

            start()
            decode_s = seconds_per_call(device, step, args.steps)
        add(f"HF transformers ({implementation})", prefill_s, decode_s)

    name = "gpt-fast-style" + ("" if args.no_compile else " (torch.compile reduce-overhead)")
    try:
        with torch.no_grad():
            positions = torch.arange(args.context, device=device)
            prefill_s = seconds_per_call(device, lambda: fast(ids[0], positions), 1)
            decode = fast if args.no_compile else torch.compile(fast, mode="reduce-overhead", fullgraph=True)
            token, pos = ids[0, -1:].clone(), torch.tensor([args.context], device=device)
            for _ in range(3):  # compile and record
                decode(token, pos)
            decode_s = seconds_per_call(device, lambda: decode(token, pos), args.steps)
        add(name, prefill_s, decode_s)
    except Exception as e:  # a compiler failure is reported, not fatal to the other rows
        rows.append(dict(engine=name, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))

    ours_decode = min(r["decode_ms_per_layer"] for r in rows if r["engine"].startswith("mixtral_ext"))
    for row in rows:
        if "decode_ms_per_layer" in row:
            row["ours_speedup"] = row["decode_ms_per_layer"] / ours_decode
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", shape=args.shape,
                  layers=args.layers, context=args.context, copy_gb_per_s=bandwidth,
                  floor_decode_ms_per_layer=floor_ms, logits_check=agreement, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"{report['device']}: {args.shape} widths, {args.layers} layers, bf16, batch 1, {args.context} tokens of "
             f"context; copy {bandwidth:.0f} GB/s, floor {floor_ms:.3f} ms per layer",
             "logits against HF: " + ", ".join(f"{k} max rel diff {v['max_rel_diff']:.3g}, argmax agree "
                                                 f"{v['argmax_agree']:.0%}" for k, v in agreement.items()), "",
             "| engine | decode ms/layer | x56 ms/token | of floor | ours faster by | prefill ms/layer |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "decode_ms_per_layer" not in row:
            lines.append(f"| {row['engine']} | {row['note']} | | | | |")
            continue
        lines.append(f"| {row['engine']} | {row['decode_ms_per_layer']:.3f} | {row['decode_ms_per_token_56_layers']:.1f} | "
                     f"{row['fraction_of_floor']:.0%} | {row.get('ours_speedup', float('nan')):.2f}x | "
                     f"{row['prefill_ms_per_layer']:.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed_rows = [r for r in rows if "decode_ms_per_layer" in r]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([r["engine"] for r in timed_rows], [r["decode_ms_per_layer"] for r in timed_rows])
        ax.axvline(floor_ms, color="k", linestyle="--", label="bandwidth floor")
        ax.set_xlabel("decode ms per layer (lower is better)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "peers.png"), dpi=120)
    except ImportError:
        print("(matplotlib not installed: no peers.png)")
    print(table)


if __name__ == "__main__":
    main()
