"""Model configuration: read from a Hugging Face config.json (as transformers
4.x and 5.x write it) or a consolidated Mistral params.json, checked, and
handed to the C++ core as a ModelConfig."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .errors import ModelLoadError
from .int4 import Int4Format, parse_int4_format


@dataclass(frozen=True)
class MixtralConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    checkpoint_dtype: str | None = None  # the dtype the checkpoint declares, if any
    int4: Int4Format | None = None  # the int4 format of the checkpoint's quantized weights, if any

    def parameter_count(self) -> int:
        """Weights the engine holds (lm_head counted even when tied)."""
        H, F, E, D = self.hidden_size, self.intermediate_size, self.num_experts, self.head_dim
        per_layer = 2 * H + (self.num_heads + 2 * self.num_kv_heads) * D * H + H * self.num_heads * D + E * H + E * 3 * F * H
        return 2 * self.vocab_size * H + H + self.num_layers * per_layer

    def to_core(self):
        from . import _C

        core = _C.ModelConfig()
        for field, value in asdict(self).items():
            if field not in ("tie_word_embeddings", "checkpoint_dtype", "int4"):
                setattr(core, field, value)
        try:
            core.validate()
        except Exception as e:
            raise ModelLoadError(str(e)) from e
        return core


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _int(data: dict, key: str, path: str, default=None) -> int:
    value = data.get(key, default)
    if value is None:
        raise ModelLoadError(f"{path}: missing '{key}'")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def _float(data: dict, key: str, path: str, default=None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ModelLoadError(f"{path}: '{key}' must be a positive finite number, got {value!r}")
    return float(value)


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# quantization_config.quant_method of the quantized checkpoints the loader reads: FP8 (AutoFP8, llm-compressor),
# whose quantized weights are F8_E4M3 tensors, each with a float32 weight_scale (per tensor or per output row),
# and int4 (AWQ, GPTQ, compressed-tensors pack-quantized: int4.py).
QUANT_METHODS = ("fp8", "compressed-tensors", "awq", "gptq")


def load_hf_config(path: str) -> MixtralConfig:
    """config.json of a Hugging Face MixtralForCausalLM directory."""
    data = _read_json(path)
    if data.get("model_type") != "mixtral":
        raise ModelLoadError(f"{path}: model_type is {data.get('model_type')!r}, expected 'mixtral'")
    hidden = _int(data, "hidden_size", path)
    heads = _int(data, "num_attention_heads", path)
    # transformers 5.x nests RoPE settings in rope_parameters; 4.x keeps rope_theta at the top.
    rope = data.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"{path}: rope_parameters must be an object")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or data.get("rope_scaling"):
        raise ModelLoadError(f"{path}: RoPE scaling ({rope_type!r}, {data.get('rope_scaling')!r}) is not supported")
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 1e6))
    max_positions = _int(data, "max_position_embeddings", path)
    window = data.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ModelLoadError(f"{path}: sliding_window must be an integer or null, got {window!r}")
    if window is not None and window < max_positions:
        raise ModelLoadError(f"{path}: sliding_window {window} is not supported (Mixtral has none)")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {data.get('hidden_act')!r} is not supported (silu)")
    quantization = data.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
    if method is not None and not isinstance(quantization, dict):
        raise ModelLoadError(f"{path}: quantization_config must be an object, got {quantization!r}")
    if method not in (None, *QUANT_METHODS):
        raise ModelLoadError(f"{path}: {method!r} quantization is not supported; FP8 checkpoints (F8_E4M3 weights "
                             "with their weight_scale), int4 ones (AWQ GEMM, GPTQ, compressed-tensors "
                             "pack-quantized) and unquantized ones are")
    return MixtralConfig(
        hidden_size=hidden,
        num_layers=_int(data, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=_int(data, "num_key_value_heads", path, heads),
        head_dim=_int({"head_dim": data.get("head_dim") or hidden // heads}, "head_dim", path),
        intermediate_size=_int(data, "intermediate_size", path),
        num_experts=_int(data, "num_local_experts", path),
        experts_per_token=_int(data, "num_experts_per_tok", path),
        vocab_size=_int(data, "vocab_size", path),
        rope_theta=_float({"rope_theta": rope_theta}, "rope_theta", path),
        rms_norm_eps=_float(data, "rms_norm_eps", path, 1e-5),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        checkpoint_dtype=_DTYPE_NAMES.get(str(data.get("dtype") or data.get("torch_dtype"))),
        int4=parse_int4_format(quantization, path) if method else None,
    )


def load_params_json(path: str) -> MixtralConfig:
    """params.json of a consolidated Mistral checkpoint."""
    data = _read_json(path)
    moe = data.get("moe")
    if not isinstance(moe, dict):
        raise ModelLoadError(f"{path}: no 'moe' section: not a mixture-of-experts model")
    dim = _int(data, "dim", path)
    heads = _int(data, "n_heads", path)
    # params.json does not state the trained context; the published models have
    # 32k (8x7B, dim 4096) and 64k (8x22B).
    default_context = 32768 if dim == 4096 else 65536
    return MixtralConfig(
        hidden_size=dim,
        num_layers=_int(data, "n_layers", path),
        num_heads=heads,
        num_kv_heads=_int(data, "n_kv_heads", path, heads),
        head_dim=_int(data, "head_dim", path, dim // heads),
        intermediate_size=_int(data, "hidden_dim", path),
        num_experts=_int(moe, "num_experts", path),
        experts_per_token=_int(moe, "num_experts_per_tok", path),
        vocab_size=_int(data, "vocab_size", path),
        rope_theta=_float(data, "rope_theta", path, 1e6),
        rms_norm_eps=_float(data, "norm_eps", path, 1e-5),
        max_position_embeddings=_int(data, "max_seq_len", path, default_context),
    )
