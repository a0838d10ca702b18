"""Bad input never crashes: each failure raises a named mixtral_ext exception,
and the engine (or a new one) keeps working afterwards."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import assert_close, hf_logits, random_tokens, safetensors_torch, torch

import mixtral_ext
from mixtral_ext import (
    ContextOverflowError,
    KvCacheFullError,
    MixtralError,
    ModelLoadError,
    SequenceClosedError,
    SettingError,
    TokenError,
)


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_dir, path)
    return path


def rewrite_tensors(path, edit) -> None:
    """Loads model.safetensors, lets edit() change the dict, writes it back."""
    file = os.path.join(path, "model.safetensors")
    tensors = safetensors_torch.load_file(file)
    edit(tensors)
    safetensors_torch.save_file(tensors, file)


def expect_load_error(path, *words):
    with pytest.raises(ModelLoadError) as info:
        mixtral_ext.Engine.from_pretrained(path)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_missing_directory(tmp_path):
    expect_load_error(tmp_path / "nowhere", "not found")


def test_missing_config(model_copy):
    os.remove(model_copy / "config.json")
    expect_load_error(model_copy, "config.json")


def test_config_not_json(model_copy):
    (model_copy / "config.json").write_text("{ not json")
    expect_load_error(model_copy, "not valid JSON")


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("model_type", "llama", ["model_type"]),
        ("num_key_value_heads", 4, ["num_key_value_heads"]),
        ("hidden_size", -3, ["hidden_size"]),
        ("num_experts_per_tok", 9, ["num_experts_per_tok"]),
        ("vocab_size", "many", ["vocab_size"]),
    ],
)
def test_bad_config_values(model_copy, field, value, words):
    config = json.loads((model_copy / "config.json").read_text())
    config[field] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    expect_load_error(model_copy, *words)


def test_missing_weights_file(model_copy):
    os.remove(model_copy / "model.safetensors")
    expect_load_error(model_copy, "no safetensors")


def test_missing_tensor(model_copy):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    rewrite_tensors(model_copy, lambda t: t.pop(name))
    expect_load_error(model_copy, "missing tensor", name)


def test_wrong_shape(model_copy):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_tensors(model_copy, lambda t: t.update({name: t[name][:-1].contiguous()}))
    expect_load_error(model_copy, name, "shape")


def test_unsupported_dtype(model_copy):
    name = "model.norm.weight"
    rewrite_tensors(model_copy, lambda t: t.update({name: t[name].to(torch.float64)}))
    expect_load_error(model_copy, name, "F64")


def test_truncated_file(model_copy):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    expect_load_error(model_copy, "truncated")


@pytest.mark.parametrize("prefix", [b"", b"\x05", b"\xff" * 8, (20).to_bytes(8, "little") + b"[1, 2, 3]" + b" " * 11])
def test_corrupt_header(model_copy, prefix):
    (model_copy / "model.safetensors").write_bytes(prefix)
    expect_load_error(model_copy, "model.safetensors")


def test_corrupt_offsets(model_copy):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], header[name]["data_offsets"][0] + 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text = text.ljust(n)
    file.write_bytes(data[:8] + text + data[8 + n :])
    expect_load_error(model_copy, name, "bytes do not hold")


def test_bad_engine_arguments(tiny_dir):
    for kwargs in [dict(dtype="int8"), dict(device="tpu"), dict(max_context=0), dict(max_context=10**9),
                   dict(page_size=0), dict(kv_cache_tokens=-1), dict(max_batch_tokens=1.5)]:
        with pytest.raises(ValueError):
            mixtral_ext.Engine.from_pretrained(tiny_dir, **kwargs)


def test_cuda_without_a_usable_gpu_raises_device_error(tiny_dir):
    if mixtral_ext.cuda_info()["device_count"] > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(mixtral_ext.DeviceError, match="(?i)cuda"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, device="cuda")
    assert mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=8).logits([1, 2]).shape == (2, 101)


@pytest.mark.parametrize("bad", [[5, -1], [101], [2**40], ["a"], [1.5], "hello", [[1, 2]], [True], [True, 2],
                                 np.array([False, True])])
def test_token_out_of_range(tiny_engine, tiny_model, bad):
    with pytest.raises(TokenError):
        tiny_engine.logits(bad)
    with tiny_engine.new_sequence() as seq:
        with pytest.raises(TokenError):
            seq.append(bad)
        assert len(seq) == 0
        ids = random_tokens(5, 101)
        assert_close(seq.append(ids), hf_logits(tiny_model, ids)[-1], 1e-4)


def test_empty_inputs(tiny_engine):
    with pytest.raises(TokenError):
        tiny_engine.logits([])
    with tiny_engine.new_sequence() as seq, pytest.raises(TokenError):
        seq.append([])


def test_context_overflow(tiny_dir, tiny_model):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=32)
    with pytest.raises(ContextOverflowError):
        engine.logits(random_tokens(33, 101))
    ids = random_tokens(30, 101)
    with engine.new_sequence() as seq:
        seq.append(ids)
        with pytest.raises(ContextOverflowError, match="max_context 32"):
            seq.append([1, 2, 3])
        assert seq.tokens == ids
        out = seq.append([7, 8])  # still fits
    assert_close(out, hf_logits(tiny_model, ids + [7, 8])[-1], 1e-4)


def test_kv_cache_out_of_pages_leaves_other_sequences_intact(tiny_dir, tiny_model):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=64, kv_cache_tokens=64, page_size=16)
    a, b = random_tokens(40, 101, seed=2), random_tokens(30, 101, seed=3)
    first, second = engine.new_sequence(), engine.new_sequence()
    first.append(a)  # 3 of 4 pages
    with pytest.raises(KvCacheFullError, match="kv cache full"):
        second.append(b)  # needs 2 pages, 1 is free
    assert len(second) == 0 and engine.kv_cache_info()["free_pages"] == 1
    assert_close(first.append([9]), hf_logits(tiny_model, a + [9])[-1], 1e-4)
    assert_close(second.append(b[:10]), hf_logits(tiny_model, b[:10])[-1], 1e-4)
    first.close()
    assert_close(second.append(b[10:]), hf_logits(tiny_model, b)[-1], 1e-4)
    second.close()
    assert engine.kv_cache_info()["free_pages"] == 4


def test_sampling_settings_as_a_service_passes_them(tiny_engine):
    """numpy scalars are the numbers they hold; an unknown setting, a stop id past the vocabulary and
    a prompt past the context raise when stream() is called, before the first delta is asked for."""
    ids = random_tokens(5, 101)
    result = tiny_engine.generate(ids, max_tokens=np.int64(3), temperature=np.float32(0.0), seed=np.uint64(3),
                                  top_k=np.int32(5), stop_token_ids=[np.int32(100)])
    assert len(result.token_ids) == 3 and result.usage.total_tokens == 8
    with pytest.raises(SettingError, match="unknown sampling setting 'max_new_tokens'; the settings are max_tokens"):
        tiny_engine.stream(ids, max_new_tokens=3)
    with pytest.raises(SettingError, match=r"stop_token_ids \[101\] lie outside the vocabulary"):
        tiny_engine.stream(ids, stop_token_ids=[101])
    with pytest.raises(SettingError, match="seed"):
        tiny_engine.stream(ids, seed=np.float64(1.5))
    short = mixtral_ext.Engine.from_pretrained(tiny_engine.path, max_context=16)
    with pytest.raises(ContextOverflowError):
        short.stream(random_tokens(16, 101))
    until_full = short.generate(ids, max_tokens=None, temperature=0, ignore_eos=True)
    assert until_full.finish_reason == "length" and len(ids) + len(until_full.token_ids) == 16


def test_engine_lifetime_device_names_and_reprs(tiny_dir):
    with pytest.raises(SettingError, match="cuda:0"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, device="cuda:1")
    with mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=32) as engine:
        seq = engine.new_sequence()
        seq.append([1, 2, 3])
        assert repr(seq) == "Sequence(3 tokens)" and "2 layers" in repr(engine) and "cpu" in repr(engine)
    assert engine.closed and repr(engine).endswith("closed)")
    for use in (lambda: engine.logits([1]), lambda: engine.generate([1], max_tokens=1), engine.new_sequence,
                lambda: seq.append([4])):
        with pytest.raises(mixtral_ext.EngineClosedError, match="closed"):
            use()
    seq.close()
    engine.close()  # twice is fine
    # A stream still open when its engine closes ends quietly; a generation waiting for KV pages is woken.
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=32, kv_cache_tokens=32, page_size=16)
    stream = engine.stream([1, 2, 3], max_tokens=20, temperature=0)
    next(stream)
    waiting = []
    worker = threading.Thread(target=lambda: waiting.append(
        pytest.raises(mixtral_ext.EngineClosedError, engine.generate, [4, 5], max_tokens=20)))
    worker.start()
    time.sleep(0.2)
    engine.close()
    worker.join(timeout=10)
    assert waiting and not worker.is_alive()
    stream.close()
    assert set(mixtral_ext.SHAPES) >= {"8x7b", "8x22b"} and mixtral_ext.SHAPES["8x22b"].num_layers == 56


def test_closed_sequence(tiny_engine):
    seq = tiny_engine.new_sequence()
    seq.close()
    seq.close()
    with pytest.raises(SequenceClosedError):
        seq.append([1])
    with pytest.raises(MixtralError):
        seq.truncate(0)


def test_truncate_bounds(tiny_engine):
    with tiny_engine.new_sequence() as seq:
        seq.append([1, 2, 3])
        for bad in (-1, 4, 1.0):
            with pytest.raises(ValueError):
                seq.truncate(bad)
        assert len(seq) == 3


def test_errors_form_one_hierarchy():
    for name in mixtral_ext.__all__:
        obj = getattr(mixtral_ext, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, MixtralError)
    assert issubclass(TokenError, ValueError) and issubclass(ContextOverflowError, ValueError)
    assert np is not None


def test_expert_gemm_path_is_a_cuda_setting(tiny_engine):
    with pytest.raises(mixtral_ext.SettingError, match="CUDA"):
        tiny_engine.set_expert_gemm_path("grouped")


def test_settings_past_int32_and_out_of_memory_at_load(tiny_dir):
    with pytest.raises(mixtral_ext.SettingError, match="page_size"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, page_size=2**31)
    with pytest.raises(mixtral_ext.DeviceOutOfMemoryError, match="out of memory"):  # 343 GB of KV cache
        mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=64, kv_cache_tokens=2**31 - 1)
    assert mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=8).logits([3]).shape == (1, 101)
