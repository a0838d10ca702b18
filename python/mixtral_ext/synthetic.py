"""Random-weight Mixtral checkpoints written without torch, in the Hugging Face
layout (config.json + model.safetensors): for the demo and for tests that need
no downloaded model. Weights are drawn with a realistic spread (unit-variance
activations, decisive routing), not zeros. Also the published models' shapes,
for Engine.synthetic() (random weights made on the device, no file)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import save_file

from .config import MixtralConfig

DEMO_CONFIG = MixtralConfig(
    hidden_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=512,
    num_experts=8,
    experts_per_token=2,
    vocab_size=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)


# The published models' widths (their config.json files).
MIXTRAL_8X7B = MixtralConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             intermediate_size=14336, num_experts=8, experts_per_token=2, vocab_size=32000,
                             rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768)
MIXTRAL_8X22B = MixtralConfig(hidden_size=6144, num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128,
                              intermediate_size=16384, num_experts=8, experts_per_token=2, vocab_size=32768,
                              rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=65536)
SHAPES = {"demo": DEMO_CONFIG, "8x7b": MIXTRAL_8X7B, "8x22b": MIXTRAL_8X22B}


def write_random_checkpoint(path: str | os.PathLike, config: MixtralConfig = DEMO_CONFIG, seed: int = 0) -> str:
    """Writes a float32 random checkpoint of `config` to `path`; returns the path."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = config
    H, F, D = c.hidden_size, c.intermediate_size, c.head_dim

    def linear(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / math.sqrt(cols), size=(rows, cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, size=H).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": rng.normal(0.0, 1.0, size=(c.vocab_size, H)).astype(np.float32),
        "lm_head.weight": linear(c.vocab_size, H),
        "model.norm.weight": norm(),
    }
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm()
        tensors[p + "post_attention_layernorm.weight"] = norm()
        tensors[p + "self_attn.q_proj.weight"] = linear(c.num_heads * D, H)
        tensors[p + "self_attn.k_proj.weight"] = linear(c.num_kv_heads * D, H)
        tensors[p + "self_attn.v_proj.weight"] = linear(c.num_kv_heads * D, H)
        tensors[p + "self_attn.o_proj.weight"] = linear(H, c.num_heads * D)
        tensors[p + "block_sparse_moe.gate.weight"] = rng.normal(0.0, 1.0, size=(c.num_experts, H)).astype(np.float32)
        for e in range(c.num_experts):
            x = f"{p}block_sparse_moe.experts.{e}."
            tensors[x + "w1.weight"] = linear(F, H)
            tensors[x + "w3.weight"] = linear(F, H)
            tensors[x + "w2.weight"] = linear(H, F)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    hf_config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": H,
        "intermediate_size": F,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": D,
        "num_local_experts": c.num_experts,
        "num_experts_per_tok": c.experts_per_token,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    return path
