"""int4 checkpoints (python/mixtral_ext/int4.py): AWQ GEMM, GPTQ and compressed-tensors
pack-quantized. Tiny models are quantized here by groups, packed as each format's reference code
packs them (compressed-tensors by its own pack_to_int32), and the packing is checked by unpacking
with the reference's own rule (compressed-tensors' unpack_from_int32; AWQ's and GPTQ's shifts
written out in torch) against the loader's unpacking. The engine's logits on each checkpoint equal
transformers' on the dequantized weights (float32), with act order and asymmetric zeros included;
malformed tensors and unsupported schemes give a ModelLoadError naming them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import (assert_close, hf_logits, make_hf_model, quantized_projections, random_tokens,
                      unquantized_tensors, with_projections)
from safetensors.torch import load_file, save_file

import mixtral_ext
from mixtral_ext.config import load_hf_config
from mixtral_ext.int4 import Int4Format, Int4Reader
from mixtral_ext.safetensors_file import SafetensorsFile

# Widths that every format packs: 8 codes per int32 along the input (GPTQ, compressed-tensors) or the
# output (AWQ); head_dim 8, so k and v have 16 rows.
SHAPE = dict(intermediate_size=40, head_dim=8)
GROUP = 8
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ's order_map: nibble i of a word holds column 8j + AWQ_ORDER[i]


def quantize(w: torch.Tensor, group: int, symmetric: bool, g_idx: torch.Tensor | None = None,
             scale_dtype=torch.float16):
    """w [out, in] by groups of input columns (group 0: one per row; g_idx: each column's group):
    codes [out, in] 0..15, scales [out, groups] (values of scale_dtype), zeros [out, groups] 1..15;
    the dequantized weight is (codes - zeros[:, g]) * scales[:, g]."""
    out, inp = w.shape
    groups = 1 if group == 0 else inp // group
    if g_idx is None:
        g_idx = torch.arange(inp) // (inp // groups)
    scales, zeros = torch.zeros(out, groups), torch.zeros(out, groups)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if symmetric:
            scales[:, g] = cols.abs().amax(dim=1) / 7.0
            zeros[:, g] = 8.0
        else:
            low, high = cols.amin(dim=1).clamp(max=0.0), cols.amax(dim=1).clamp(min=0.0)
            scales[:, g] = (high - low) / 15.0
            zeros[:, g] = torch.clamp(torch.round(-low / scales[:, g]), 1, 15)
    scales = scales.to(scale_dtype).float()
    codes = torch.clamp(torch.round(w / scales[:, g_idx]) + zeros[:, g_idx], 0, 15).to(torch.uint8)
    return codes, scales, zeros, g_idx.to(torch.int32)


def dequantized(codes, scales, zeros, g_idx) -> torch.Tensor:
    return (codes.float() - zeros[:, g_idx.long()]) * scales[:, g_idx.long()]


def pack_words(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """values [rows, 8n] 0..15 -> int32 [rows, n]: column 8j + order[i] into nibble i of word j."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(order):
        packed |= values[:, column::8].long() << (4 * i)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # the word's bits as an int32


def unpack_words(words: torch.Tensor, order=range(8)) -> torch.Tensor:
    """The reverse, as the formats' reference dequantization shifts: [rows, n] -> [rows, 8n]."""
    values = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.uint8)
    unsigned = words.long() & 0xFFFFFFFF
    for i, column in enumerate(order):
        values[:, column::8] = ((unsigned >> (4 * i)) & 0xF).to(torch.uint8)
    return values


def awq_tensors(codes, scales, zeros, g_idx):
    """AWQ GEMM (as its WQLinear_GEMM.from_linear packs): along the output in AWQ's order."""
    group_zeros = zeros.t().to(torch.uint8)  # [groups, out]
    tensors = {"qweight": pack_words(codes.t(), AWQ_ORDER), "qzeros": pack_words(group_zeros, AWQ_ORDER),
               "scales": scales.t().half().contiguous()}
    assert torch.equal(unpack_words(tensors["qweight"], AWQ_ORDER), codes.t())
    return tensors


def gptq_tensors(codes, scales, zeros, g_idx, act_order: bool):
    """GPTQ (as its QuantLinear.pack): codes along the input, zeros minus one along the output."""
    tensors = {"qweight": pack_words(codes.contiguous(), range(8)).t().contiguous(),  # [in/8, out]
               "qzeros": pack_words((zeros.t() - 1).to(torch.uint8), range(8)),
               "scales": scales.t().half().contiguous()}
    if act_order:
        tensors["g_idx"] = g_idx
    assert torch.equal(unpack_words(tensors["qweight"].t().contiguous()), codes)
    assert torch.equal(unpack_words(tensors["qzeros"]).float() + 1, zeros.t())
    return tensors


def compressed_tensors_tensors(codes, scales, zeros, g_idx, symmetric: bool, act_order: bool):
    """compressed-tensors pack-quantized, packed by its own pack_to_int32 (signed codes)."""
    # Imported here: test_cuda_engine.py writes AWQ and GPTQ checkpoints with this module on the GPU machine,
    # which has no compressed-tensors.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    out, inp = codes.shape
    tensors = {"weight_packed": pack_to_int32((codes.int() - 8).to(torch.int8), 4, packed_dim=1),
               "weight_scale": scales.bfloat16() if symmetric else scales.half(),  # as quantize() rounded them
               "weight_shape": torch.tensor([out, inp])}
    unpacked = unpack_from_int32(tensors["weight_packed"], 4, torch.Size([out, inp]), packed_dim=1)
    assert torch.equal(unpacked.int() + 8, codes.int())
    if not symmetric:
        signed = (zeros.int() - 8).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(signed, 4, packed_dim=0)
        assert torch.equal(unpack_from_int32(tensors["weight_zero_point"], 4, signed.shape, packed_dim=0), signed)
    if act_order:
        tensors["weight_g_idx"] = g_idx
    return tensors


VARIANTS = {
    "awq": dict(config={"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True,
                        "modules_to_not_convert": ["gate"]}, group=GROUP, symmetric=False),
    "gptq-sym": dict(config={"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
                             "checkpoint_format": "gptq"}, group=GROUP, symmetric=True),
    "gptq-asym-act-order": dict(config={"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False,
                                        "desc_act": True}, group=GROUP, symmetric=False, act_order=True),
    "gptq-channel": dict(config={"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False}, group=0,
                         symmetric=False),
    "ct-sym-group": dict(config={"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                       "strategy": "group", "group_size": GROUP}}},
        "ignore": ["lm_head", "re:.*block_sparse_moe.gate"]}, group=GROUP, symmetric=True,
        scale_dtype=torch.bfloat16),
    "ct-asym-channel": dict(config={"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                       "strategy": "channel"}}}}, group=0, symmetric=False),
    "ct-asym-act-order": dict(config={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                          "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                          "group_size": GROUP, "actorder": "group"}}}},
                              group=GROUP, symmetric=False, act_order=True),
}


def write_int4_checkpoint(model, out_dir, variant: str):
    """The model as an int4 checkpoint of `variant`; returns transformers' model on its dequantized
    weights."""
    spec = VARIANTS[variant]
    method = spec["config"]["quant_method"]
    rng = torch.Generator().manual_seed(5)
    out, widened = {}, {}
    for module, w in quantized_projections(model):
        g_idx = None
        if spec.get("act_order"):  # a group of GROUP columns each, in a shuffled order
            g_idx = (torch.arange(w.shape[1]) // GROUP)[torch.randperm(w.shape[1], generator=rng)]
        codes, scales, zeros, g_idx = quantize(w.float(), spec["group"], spec["symmetric"], g_idx,
                                               spec.get("scale_dtype", torch.float16))
        widened[module] = dequantized(codes, scales, zeros, g_idx)
        if method == "awq":
            tensors = awq_tensors(codes, scales, zeros, g_idx)
        elif method == "gptq":
            tensors = gptq_tensors(codes, scales, zeros, g_idx, spec.get("act_order", False))
        else:
            tensors = compressed_tensors_tensors(codes, scales, zeros, g_idx, spec["symmetric"], spec.get("act_order",
                                                                                                         False))
        out.update({f"{module}.{name}": t.contiguous() for name, t in tensors.items()})
    out.update(unquantized_tensors(model))
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = spec["config"]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)

    return with_projections(model, widened.__getitem__)


@pytest.fixture(scope="module")
def model():
    return make_hf_model(seed=11, **SHAPE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_checkpoint_logits_equal_transformers_on_the_dequantized_weights(model, tmp_path, variant):
    reference = write_int4_checkpoint(model, tmp_path, variant)
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, dtype="float32", max_context=64)
    ids = random_tokens(30, model.config.vocab_size, seed=12)
    assert_close(engine.logits(ids), hf_logits(reference, ids), 1e-4)
    assert engine.memory_report()["expert_dtype"] == "int4"  # the experts kept as stored
    widened = mixtral_ext.Engine.from_pretrained(tmp_path, dtype="float32", expert_dtype="float32", max_context=64)
    assert widened.memory_report()["expert_dtype"] == "float32" and widened.weight_bytes > engine.weight_bytes
    assert_close(widened.logits(ids), engine.logits(ids), 1e-5)
    plain = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]  # the quantization is not a no-op
    assert not torch.allclose(reference.state_dict()["model.layers.0.self_attn.q_proj.weight"], plain, atol=1e-3)


@pytest.mark.parametrize("variant", ["awq", "gptq-asym-act-order", "ct-asym-act-order"])
def test_unpacked_codes_scales_and_zeros_are_the_quantizer_s(model, tmp_path, variant):
    """The loader's unpacking of one projection against the quantizer's own codes, scales, zeros and
    groups (before any dequantization)."""
    write_int4_checkpoint(model, tmp_path, variant)
    st = SafetensorsFile(tmp_path / "model.safetensors")
    module, w = next(quantized_projections(model))
    spec = VARIANTS[variant]
    torch_g_idx = None
    if spec.get("act_order"):
        rng = torch.Generator().manual_seed(5)
        torch_g_idx = (torch.arange(w.shape[1]) // GROUP)[torch.randperm(w.shape[1], generator=rng)]
    codes, scales, zeros, g_idx = quantize(w.float(), spec["group"], spec["symmetric"], torch_g_idx,
                                           spec.get("scale_dtype", torch.float16))

    fmt = load_hf_config(str(tmp_path / "config.json")).int4
    got = Int4Reader(fmt, {name: st for name in st.keys()}).read(module, *w.shape)
    np.testing.assert_array_equal(got.codes, codes.numpy())
    np.testing.assert_array_equal(got.scales, scales.numpy())
    np.testing.assert_array_equal(got.zeros, zeros.numpy())
    np.testing.assert_array_equal(got.groups, g_idx.numpy())


@pytest.mark.parametrize("cols,group_size", [(256, 128), (200, 128), (96, 7)])
def test_int4_quantization_on_load_keeps_each_weight_within_half_a_step(cols, group_size):
    """The engine's quantizer (expert_dtype="int4"; csrc/core/int4.h) on rows whose last group may be
    short: codes 0..15, integer zeros, float16 scales spanning each group's range with zero, and every
    weight within half a step of its dequantized value; an all-zero group dequantizes to zeros."""
    w = np.random.default_rng(3).standard_normal((9, cols)).astype(np.float32)
    w[4, :group_size] = 0.0
    codes, scales, zeros = mixtral_ext._C.quantize_int4(w, group_size)
    groups = -(-cols // group_size)
    assert codes.shape == (9, cols) and scales.shape == zeros.shape == (9, groups)
    assert codes.max() <= 15 and np.array_equal(zeros, np.round(zeros)) and 0 <= zeros.min() and zeros.max() <= 15
    assert np.array_equal(scales, scales.astype(np.float16).astype(np.float32))
    g = np.arange(cols) // group_size
    dequantized = (codes - zeros[:, g]) * scales[:, g]
    assert np.all(np.abs(dequantized - w) <= 0.5 * scales[:, g] * (1 + 1e-3) + 1e-7)
    assert np.all(dequantized[4, :group_size] == 0.0)


def test_int4_quantization_error_is_about_four_times_fp8_s(tmp_path):
    """expert_dtype="int4" against "float8_e4m3" on the same float checkpoint (hidden 256, expert
    width 512: two groups of 128 a row of w1 and w3, four of w2): the logits' RMS error relative to
    the float32 engine's RMS. The figures the README quotes come from this test."""
    from conftest import make_hf_model

    make_hf_model(seed=17, hidden_size=256, intermediate_size=512, head_dim=32, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=512).save_pretrained(tmp_path)
    ids = random_tokens(64, 512, seed=18)
    reference = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128).logits(ids)
    errors = {}
    for expert_dtype in ("float8_e4m3", "int4"):
        logits = mixtral_ext.Engine.from_pretrained(tmp_path, expert_dtype=expert_dtype, max_context=128).logits(ids)
        errors[expert_dtype] = float(np.sqrt(np.mean((logits - reference) ** 2) / np.mean(reference**2)))
    print(f"relative RMS error of the logits: {errors}")
    assert 0.01 < errors["float8_e4m3"] < errors["int4"] < 0.2
    assert 2 < errors["int4"] / errors["float8_e4m3"] < 8


def test_int4_experts_need_even_widths(tiny_dir):
    with pytest.raises(mixtral_ext.SettingError, match="even widths.*expert width 37"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, expert_dtype="int4", max_context=64)
    assert mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=64).logits([1, 2]).shape == (2, 101)


def test_act_order_blocks_need_an_engine_made_for_them():
    """The workspace has room for the experts' inputs in their column orders only in an engine made
    with int4_act_order (from_pretrained sets it from the checkpoint's config): without it a block in
    act order is refused by name, not given a buffer outside the memory plan."""
    from dataclasses import replace

    from mixtral_ext import _C
    from mixtral_ext.errors import ShapeError
    from mixtral_ext.synthetic import DEMO_CONFIG

    H, F, group = 32, 16, 8
    config = replace(DEMO_CONFIG, hidden_size=H, num_layers=1, head_dim=8, intermediate_size=F, vocab_size=64)
    plain, act_order = (_C.Engine(config.to_core(), "cpu", "float32", "float32", 16, 16, 16, 8, expert_dtype="int4",
                                  int4_group_size=group, int4_act_order=flag) for flag in (False, True))
    room = max(2 * H, F) * 8 * config.experts_per_token * 4  # float32 inputs of 8 tokens' expanded rows
    assert act_order.workspace_bytes - plain.workspace_bytes >= room
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (F, H // 2), dtype=np.uint8)  # w1's rows of w13, one whole segment
    scales, zeros = np.ones((F, H // group), np.float32), np.full((F, H // group), 8, np.float32)
    column_groups = rng.permutation(np.arange(H) // group).astype(np.int32)
    with pytest.raises(ShapeError, match="int4_act_order"):
        plain.load_weight_int4("w13", 0, 0, 0, packed, scales, zeros, column_groups)
    act_order.load_weight_int4("w13", 0, 0, 0, packed, scales, zeros, column_groups)


def test_known_words_unpack_as_the_formats_define_them(tmp_path):
    """Fixed words, independent of this file's packers: AWQ's word 0x75316420 holds output columns
    0..7 = codes 0..7 (nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]); a GPTQ zero nibble 15 is
    zero 16 (stored minus one, never masked after the +1)."""
    from safetensors.numpy import save_file as save_numpy

    word = np.array([[0x75316420]], np.uint32).view(np.int32)
    save_numpy({"m.qweight": np.repeat(word, 8, axis=0), "m.qzeros": word, "m.scales": np.ones((1, 8), np.float16),
                "g.qweight": np.full((1, 8), 0x11111111, np.uint32).view(np.int32),
                "g.qzeros": np.array([[0xFFFFFFFF]], np.uint32).view(np.int32),
                "g.scales": np.full((1, 8), 0.5, np.float16)}, str(tmp_path / "words.safetensors"))
    st = SafetensorsFile(tmp_path / "words.safetensors")
    files = {name: st for name in st.keys()}
    awq = Int4Reader(Int4Format("awq", 8, False), files).read("m", 8, 8)
    np.testing.assert_array_equal(awq.codes, np.repeat(np.arange(8)[:, None], 8, axis=1))
    np.testing.assert_array_equal(awq.zeros[:, 0], np.arange(8))
    gptq = Int4Reader(Int4Format("gptq", 8, False), files).read("g", 8, 8)
    np.testing.assert_array_equal(gptq.zeros, np.full((8, 1), 16.0))
    np.testing.assert_array_equal(gptq.dequantized(), np.full((8, 8), (1 - 16) * 0.5, np.float32))


@pytest.mark.parametrize("change,message", [
    (dict(bits=8), "8 bits"), (dict(version="gemv"), "version 'gemv'"), (dict(group_size=7), "does not divide"),
    (dict(quant_method="gptq", checkpoint_format="gptq_v2"), "checkpoint_format 'gptq_v2'"),
    (dict(quant_method="gptq", is_marlin_format=True), "Marlin"),
    (dict(desc_act=False), "g_idx' puts the columns' groups out of column order"),  # act order not declared
])
def test_unsupported_int4_schemes_are_refused(model, tmp_path, change, message):
    write_int4_checkpoint(model, tmp_path, "gptq-asym-act-order" if "desc_act" in change else "awq")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["quantization_config"].update(change)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(mixtral_ext.ModelLoadError, match=message):
        mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)


@pytest.mark.parametrize("scheme,message", [
    (dict(num_bits=8, type="int"), "int weights of 8 bits"), (dict(strategy="tensor"), "strategy 'tensor'"),
    (dict(symmetric="false"), "symmetric 'false'"),
    ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config"),
    ({"quantization_status": "frozen"}, "quantization_status 'frozen'"),
])
def test_unsupported_compressed_tensors_schemes_are_refused(model, tmp_path, scheme, message):
    write_int4_checkpoint(model, tmp_path, "ct-sym-group")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    top_level = {key: scheme.pop(key) for key in ("transform_config", "quantization_status") if key in scheme}
    config["quantization_config"].update(top_level)
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(scheme)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(mixtral_ext.ModelLoadError, match=message):
        mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)


@pytest.mark.parametrize("variant,name,edit,message", [
    ("gptq-sym", "model.layers.1.block_sparse_moe.experts.3.w2.qweight", lambda t: t[:-1],
     r"is I32\[4, 48\], expected I32 \[5, 48\]"),
    ("gptq-sym", "model.layers.0.self_attn.k_proj.scales", None,
     "missing tensor 'model.layers.0.self_attn.k_proj.scales'"),
    ("awq", "model.layers.1.block_sparse_moe.experts.0.w1.qweight", lambda t: t.float(), "w1.qweight' is F32"),
    ("ct-asym-channel", "model.layers.0.block_sparse_moe.experts.2.w3.weight_zero_point", None,
     "missing tensor 'model.layers.0.block_sparse_moe.experts.2.w3.weight_zero_point'"),
    ("ct-asym-act-order", "model.layers.0.self_attn.o_proj.weight_g_idx", lambda t: t + 100, "group indices"),
    ("gptq-asym-act-order", "model.layers.1.self_attn.v_proj.g_idx", None,
     "missing tensor 'model.layers.1.self_attn.v_proj.g_idx'"),
    ("ct-sym-group", "model.layers.0.self_attn.k_proj.weight_shape", lambda t: t.flip(0), "weight_shape"),
    ("gptq-asym-act-order", "model.layers.0.block_sparse_moe.experts.1.w2.g_idx", torch.zeros_like,
     "w2.qweight': w2: act-order groups must hold 8 columns each"),
])
def test_malformed_int4_tensors_are_named(model, tmp_path, variant, name, edit, message):
    write_int4_checkpoint(model, tmp_path, variant)
    tensors = load_file(tmp_path / "model.safetensors")
    if edit is None:
        del tensors[name]
    else:
        tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(mixtral_ext.ModelLoadError, match=message):
        mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)
