"""FP8 expert weights (expert_dtype="float8_e4m3") on the CPU: the quantizer against PyTorch's
float8_e4m3fn, the CPU expert GEMM against numpy on the dequantized weights, the engine against
transformers' MixtralForCausalLM whose expert weights went through the same quantization, and FP8
checkpoints (the layout AutoFP8 and llm-compressor write) against transformers on their weights
widened by torch. (The CUDA kernels are held to these CPU twins in test_ops.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (TINY, assert_close, hf_logits, make_hf_model, quantized_projections, random_tokens,
                      unquantized_tensors, with_projections)

import mixtral_ext
from mixtral_ext import _C


def torch_quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of w [rows, cols] as float8_e4m3fn, scaled by max |row| / 448 (1 for a zero row)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).to(torch.float8_e4m3fn), scale[:, 0]


def dequantized(w: np.ndarray) -> np.ndarray:
    """w [..., rows, cols] float32 through the FP8 round trip, as torch computes it."""
    flat = torch.from_numpy(np.ascontiguousarray(w).reshape(-1, w.shape[-1]))
    q, scale = torch_quantized(flat)
    return (q.float() * scale[:, None]).numpy().reshape(w.shape)


def test_every_fp8_value_quantizes_to_its_own_byte():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)  # all but the NaNs
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    rows = np.stack([values, np.full_like(values, 448.0)], axis=1)  # max |row| = 448: scale 1
    q, scales = _C.quantize_fp8(rows)
    np.testing.assert_array_equal(scales, np.ones(len(codes), np.float32))
    np.testing.assert_array_equal(q[:, 0], codes)  # subnormals, -0 and the largest values included


@pytest.mark.parametrize("spread", [1.0, 1e-3, 300.0])
def test_quantizer_rounds_as_torch_does(spread):
    r = np.random.default_rng(3)
    w = (r.standard_normal((37, 211)) * spread).astype(np.float32)
    w[5] *= 1e-6  # a row of tiny values: scaled up to the same range
    w[7, :40] = 0.0
    w[11] = 0.0  # an all-zero row: scale 1, all bytes 0
    q, scales = _C.quantize_fp8(w)
    expected_q, expected_scales = torch_quantized(torch.from_numpy(w))
    np.testing.assert_array_equal(scales, expected_scales.numpy())
    np.testing.assert_array_equal(q, expected_q.view(torch.uint8).numpy())
    assert scales[11] == 1.0 and not q[11].any()


def test_cpu_expert_matmul_in_fp8_is_the_product_with_dequantized_weights():
    r = np.random.default_rng(4)
    rows_per_expert = [3, 0, 7, 1, 12]
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x = r.standard_normal((int(offsets[-1]), 93)).astype(np.float32)
    w = (r.standard_normal((len(rows_per_expert), 41, 93)) * 0.1).astype(np.float32)
    got = _C.Ops("cpu").expert_matmul(x, w, offsets, "float32", "float32", "float8_e4m3")
    w_fp8 = dequantized(w)
    expected = np.concatenate([x[offsets[e]:offsets[e + 1]] @ w_fp8[e].T for e in range(len(rows_per_expert))])
    assert_close(got, expected, 1e-5)
    assert np.abs(expected - np.concatenate(
        [x[offsets[e]:offsets[e + 1]] @ w[e].T for e in range(len(rows_per_expert))])).max() > 1e-4  # FP8 did round


@pytest.fixture(scope="module")
def fp8_reference():
    """transformers' model with every expert weight replaced by its FP8 round trip."""
    model = make_hf_model(seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(torch.from_numpy(dequantized(p.detach().numpy())))
    return model


def test_engine_with_fp8_experts_matches_transformers_on_the_round_tripped_weights(fp8_reference, tmp_path):
    make_hf_model(seed=5).save_pretrained(tmp_path)  # the original weights: the engine quantizes them
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, expert_dtype="float8_e4m3", max_context=128)
    ids = random_tokens(40, TINY["vocab_size"], seed=6)
    assert_close(engine.logits(ids), hf_logits(fp8_reference, ids), 1e-4)
    plain = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128)
    F, H, E, L = TINY["intermediate_size"], TINY["hidden_size"], TINY["num_local_experts"], TINY["num_hidden_layers"]
    expert_values, scales = 3 * F * H * E * L, (2 * F + H) * E * L  # 4 bytes each -> 1, plus a scale per row
    assert abs((plain.weight_bytes - engine.weight_bytes) - (3 * expert_values - 4 * scales)) <= 1024  # alignment
    greedy = engine.generate(ids[:9], max_tokens=12, temperature=0)
    assert len(greedy.token_ids) == 12


def test_synthetic_fp8_engine_runs_and_bad_expert_dtypes_are_refused():
    from dataclasses import replace

    from mixtral_ext.synthetic import DEMO_CONFIG

    config = replace(DEMO_CONFIG, num_layers=1)
    engine = mixtral_ext.Engine.synthetic(config, expert_dtype="float8_e4m3", max_context=32, seed=2)
    logits = engine.logits(random_tokens(5, config.vocab_size, seed=7))
    assert np.isfinite(logits).all() and logits.std() > 0
    # bfloat16 is no expert dtype of a float32 engine: the experts take the dtype or a quantized one
    for bad in ("float8", "int8", "bfloat16", 8):
        with pytest.raises(mixtral_ext.SettingError, match="expert_dtype"):
            mixtral_ext.Engine.synthetic(config, expert_dtype=bad, max_context=32)


def write_fp8_checkpoint(model, out_dir, per_row: bool) -> None:
    """The model as an FP8 checkpoint in the Hugging Face per-expert layout (as AutoFP8 and
    llm-compressor write them): every projection of the layers in F8_E4M3 with a float32
    weight_scale per tensor ([]) or per output row ([rows, 1]); embeddings, norms, router and
    lm_head unquantized."""
    import json
    import os

    from safetensors.torch import save_file

    out = unquantized_tensors(model)

    def put(name, w):
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0 if per_row else w.abs().amax() / 448.0
        out[name + ".weight"] = (w / scale).to(torch.float8_e4m3fn).contiguous()
        out[name + ".weight_scale"] = scale.float().contiguous()
        out[name + ".input_scale"] = torch.tensor(1.0)  # activation scales: not used by the engine

    for module, w in quantized_projections(model):
        put(module, w)
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)


def widened_reference(model, out_dir):
    """model with the weights of the FP8 checkpoint in out_dir, widened by torch (bytes x scale)."""
    import os

    from safetensors.torch import load_file

    tensors = load_file(os.path.join(out_dir, "model.safetensors"))

    def weight(name):
        return tensors[name + ".weight"].float() * tensors[name + ".weight_scale"]

    return with_projections(model, weight)


@pytest.mark.parametrize("per_row", [False, True])
def test_fp8_checkpoint_loads_as_it_is(tmp_path, per_row):
    """An FP8 checkpoint: its experts stay FP8 (bytes and scales as stored, per tensor or per row),
    its attention projections are widened; the logits equal transformers' on the widened weights."""
    model = make_hf_model(seed=8)
    write_fp8_checkpoint(model, tmp_path / "fp8", per_row)
    model.save_pretrained(tmp_path / "plain")
    engine = mixtral_ext.Engine.from_pretrained(tmp_path / "fp8", max_context=128)
    ids = random_tokens(40, TINY["vocab_size"], seed=9)
    assert_close(engine.logits(ids), hf_logits(widened_reference(model, tmp_path / "fp8"), ids), 1e-4)
    plain = mixtral_ext.Engine.from_pretrained(tmp_path / "plain", max_context=128)
    F, H, E, L = TINY["intermediate_size"], TINY["hidden_size"], TINY["num_local_experts"], TINY["num_hidden_layers"]
    expert_values, scales = 3 * F * H * E * L, (2 * F + H) * E * L
    assert abs((plain.weight_bytes - engine.weight_bytes) - (3 * expert_values - 4 * scales)) <= 1024  # FP8 kept


def test_fp8_checkpoint_without_scales_and_other_quantizations_are_refused(tmp_path):
    import json
    import os

    from safetensors.torch import load_file, save_file

    write_fp8_checkpoint(make_hf_model(seed=8), tmp_path, per_row=False)
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight_scale"]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(mixtral_ext.ModelLoadError, match="w3.weight_scale"):
        mixtral_ext.Engine.from_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(mixtral_ext.ModelLoadError, match="'bitsandbytes' quantization is not supported"):
        mixtral_ext.Engine.from_pretrained(tmp_path)
