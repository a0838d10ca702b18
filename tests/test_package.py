"""The package as a user meets it: imports without a GPU, probes CUDA without
crashing, the synthetic checkpoint reads in transformers, the CLI runs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import replace

from conftest import assert_close, hf_logits, random_tokens, transformers

import pytest

import mixtral_ext
from mixtral_ext import _C
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint


def test_cuda_probe_never_crashes():
    info = mixtral_ext.cuda_info()
    assert set(info) == {"built", "device_count", "summary"}
    assert info["device_count"] == -1 or info["device_count"] >= 0
    assert isinstance(info["summary"], str) and info["summary"]


def test_a_cuda_library_of_another_interface_is_refused():
    """The core opens the CUDA library only if it reports the core's version of core/backend.h (a
    library without the report, here the core's own module, is refused, never called)."""
    count, summary = _C.probe_cuda(_C.__file__)
    assert count == -1 and "mixtral_ext_cuda_backend_abi" in summary


def test_cuda_backend_is_built_where_nvcc_and_cublas_are():
    """CI compiles the CUDA backend with nvcc, so a change that breaks it is seen."""
    if os.environ.get("MIXTRAL_EXT_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("built with MIXTRAL_EXT_CUDA=OFF")
    has_cublas = importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.cu13") is not None or importlib.util.find_spec("nvidia.cublas") is not None
    )
    if shutil.which("nvcc") and has_cublas:
        assert mixtral_ext.cuda_info()["built"]


def test_synthetic_checkpoint_reads_in_transformers(tmp_path):
    config = replace(DEMO_CONFIG, hidden_size=40, num_layers=2, head_dim=8, intermediate_size=24, vocab_size=77)
    write_random_checkpoint(tmp_path, config, seed=3)
    model = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager").eval()
    engine = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)
    ids = random_tokens(20, 77)
    assert_close(engine.logits(ids), hf_logits(model, ids), 1e-4)


def test_cli_demo_runs():
    result = subprocess.run([sys.executable, "-m", "mixtral_ext", "demo", "--max-tokens", "6", "--seed", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Mixtral is a sparse mixture of experts model that")
    assert "RANDOM" in result.stderr and "6 tokens" in result.stderr and "tokens/s" in result.stderr


def test_cli_reports_bad_model_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mixtral_ext", "generate", "--model", str(tmp_path / "x"),
                             "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "not found" in result.stderr


def test_cli_help_shows_every_default():
    result = subprocess.run([sys.executable, "-m", "mixtral_ext", "generate", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--max-tokens", "--temperature", "--top-p", "--seed", "--device", "--dtype"):
        assert option in result.stdout
    text = " ".join(result.stdout.split())
    assert "(default: 48)" in text and "(default: 0.7)" in text and "(default: random)" in text
    assert "(default: None)" not in text


def test_cli_chat_survives_ctrl_c(monkeypatch):
    """Ctrl-C at the prompt clears the line; during a reply it stops that reply, gives its pages
    back and keeps the conversation."""
    from mixtral_ext.__main__ import chat_loop

    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=1, head_dim=16, intermediate_size=96)
    engine = mixtral_ext.Engine.synthetic(config, max_context=256)
    real_stream = engine.chat_stream

    def interrupted_after_two(*args, **kwargs):
        stream = real_stream(*args, **kwargs)
        yield next(stream)
        yield next(stream)
        stream.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "chat_stream", interrupted_after_two)
    lines = iter([KeyboardInterrupt, "Hello there", "/exit"])

    def read_line(_prompt):
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    args = type("Args", (), dict(system=None, max_tokens=50, temperature=0.0, top_p=1.0, seed=0))()
    messages = chat_loop(engine, args, read_line)  # (random weights: an EOS first would end the reply early)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hello there"
    engine.clear_prefix_cache()
    info = engine.kv_cache_info()
    assert info["free_pages"] == info["num_pages"]


def test_cli_chat_says_why_a_turn_fails_and_goes_on(monkeypatch):
    """A turn the engine refuses when the stream is made (the history outgrew the context) is said
    on stderr and dropped; the chat goes on."""
    from mixtral_ext.__main__ import chat_loop

    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=1, head_dim=16, intermediate_size=96)
    engine = mixtral_ext.Engine.synthetic(config, max_context=32)
    lines = iter(["word " * 60, "Hi", "/exit"])
    args = type("Args", (), dict(system=None, max_tokens=3, temperature=0.0, top_p=1.0, seed=0))()
    messages = chat_loop(engine, args, lambda _prompt: next(lines))
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi"]
