"""Shared fixtures: tiny random Mixtral checkpoints written by Hugging Face
transformers (the reference nobody here wrote), their logits, and writers for
the other checkpoint layouts the engine reads; the sampler's reference
distribution and draw (uniform01); and the `ops` fixture, the CPU twin and the
device backend for the device tests (the rest of what they share is in
device_helpers.py)."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=10,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
)


def make_hf_model(seed: int = 0, **overrides):
    """A MixtralForCausalLM with weights spread so that routing and attention are not uniform."""
    kwargs = dict(TINY, **overrides)
    rope_theta = kwargs.pop("rope_theta")
    config = transformers.MixtralConfig(**kwargs, attn_implementation="eager", experts_implementation="eager")
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 1.0)  # decisive routing
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


def quantized_projections(model):
    """(module name in the per-expert checkpoint layout, float weight [out, in]) of every projection
    that the quantized checkpoints store quantized: the attention projections and each expert's w1,
    w3 and w2 (transformers keeps the experts fused)."""
    c, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    F = c.intermediate_size
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            yield f"{p}self_attn.{proj}_proj", sd[f"{p}self_attn.{proj}_proj.weight"]
        for e in range(c.num_local_experts):
            gate_up, down = sd[p + "mlp.experts.gate_up_proj"][e], sd[p + "mlp.experts.down_proj"][e]
            x = f"{p}block_sparse_moe.experts.{e}."
            yield x + "w1", gate_up[:F]
            yield x + "w3", gate_up[F:]
            yield x + "w2", down


def unquantized_tensors(model) -> dict:
    """The model's other tensors (embeddings, norms, router, lm_head) under their checkpoint names."""
    return {name.replace(".mlp.gate.", ".block_sparse_moe.gate."): tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if ".experts." not in name and not (".self_attn." in name and name.endswith("_proj.weight"))}


def with_projections(model, weight_of):
    """A copy of model whose quantized projections (quantized_projections) are weight_of(module name)."""
    reference = copy.deepcopy(model)
    sd = reference.state_dict()
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}."
            for proj in ("q", "k", "v", "o"):
                sd[f"{p}self_attn.{proj}_proj.weight"].copy_(weight_of(f"{p}self_attn.{proj}_proj"))
            for e in range(model.config.num_local_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                sd[p + "mlp.experts.gate_up_proj"][e].copy_(torch.cat([weight_of(x + "w1"), weight_of(x + "w3")]))
                sd[p + "mlp.experts.down_proj"][e].copy_(weight_of(x + "w2"))
    return reference


def hf_logits(model, token_ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float().numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    scale = float(np.max(np.abs(expected)))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


SAMPLING_LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 0.0], dtype=np.float32)
SAMPLING_SETTINGS = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.0, top_k=3),
                     dict(temperature=0.8, top_p=0.7), dict(temperature=1.0, min_p=0.2),
                     dict(temperature=2.0, top_k=5, top_p=0.9, min_p=0.05)]


def truncated_softmax(logits: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the distribution a sampler must draw from, which tokens it keeps), computed here
    independently of the C++ code: softmax at the temperature, then top_k, min_p, top_p."""
    p = np.exp(logits / settings["temperature"] - np.max(logits / settings["temperature"]))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if settings.get("top_k") and rank >= settings["top_k"]:
            break
        if p[i] < settings.get("min_p", 0.0) * p[order[0]]:
            break
        keep[i] = True
        mass += p[i]
        if mass >= settings.get("top_p", 1.0):
            break
    expected = np.where(keep, p, 0.0)
    return expected / expected.sum(), keep


def uniform01(seed: int, counter):
    """The draw for (seed, counter): splitmix64 of the pair, 53 bits (core/random.h). counter may be
    a numpy uint64 array (their products wrap as the C++ ones do): then an array of draws."""
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (counter + 1)) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def random_tokens(n: int, vocab: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


def write_consolidated(model, out_dir) -> None:
    """The model as a consolidated Mistral checkpoint: params.json and
    consolidated.safetensors, with wq/wk rows in interleaved RoPE order
    (the inverse of the permutation Hugging Face's converter applies)."""
    c = model.config
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def to_interleaved(w, heads):
        rows, cols = w.shape
        return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()

    out = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    F = c.intermediate_size
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attention.wq.weight"] = to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[q + "attention.wk.weight"] = to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
        for e in range(c.num_local_experts):
            gate_up = sd[p + "mlp.experts.gate_up_proj"][e]
            x = f"{q}feed_forward.experts.{e}."
            out[x + "w1.weight"] = gate_up[:F].contiguous()
            out[x + "w3.weight"] = gate_up[F:].contiguous()
            out[x + "w2.weight"] = sd[p + "mlp.experts.down_proj"][e].contiguous()
    safetensors_torch.save_file(out, os.path.join(out_dir, "consolidated.safetensors"))
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "head_dim": c.head_dim,
        "hidden_dim": F,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_parameters["rope_theta"],
        "max_seq_len": c.max_position_embeddings,
        "moe": {"num_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok},
    }
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.fixture(scope="session")
def tiny_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def tiny_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    import mixtral_ext

    return mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=256)


@pytest.fixture(scope="module")
def ops():
    """(the CPU twin, the device backend) as mixtral_ext._C.Ops, for the device tests (the device as
    device_helpers.py chooses it); skipped without one."""
    from device_helpers import DEVICE, need_gpu

    from mixtral_ext import _C
    from mixtral_ext.cuda import backend_library

    need_gpu()
    device = _C.Ops(DEVICE, backend_library() if DEVICE == "cuda" else "")
    return _C.Ops("cpu"), device
