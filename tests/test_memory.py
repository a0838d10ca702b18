"""Memory planning before loading (mixtral_ext.memory, `python -m mixtral_ext memory`): the plan
equals what an engine of the same settings allocates, byte for byte; the 8x7B and 8x22B weight
bytes are their published parameter counts times each dtype's bytes (FP8 with its row scales, int4
with its group scales and zeros); 8x22B in int4 fits one H100; the
longest context that fits is the edge of the plan; bad shapes, configs and sizes say what is wrong."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mixtral_ext
from mixtral_ext import SHAPES, longest_context, parse_memory, plan_memory
from mixtral_ext.__main__ import main
from mixtral_ext.memory import CARDS, PLAN_DTYPES, memory_table

ALIGN = 256  # the weight arena aligns each slot (12 at most, with FP8 scales) to this many bytes


@pytest.mark.parametrize("dtype, expert_dtype", [("float32", None), ("bfloat16", None), ("float16", None),
                                                 ("bfloat16", "float8_e4m3"), ("float32", "float8_e4m3")])
def test_the_plan_is_what_the_engine_allocates(tiny_dir, dtype, expert_dtype):
    settings = dict(device="cpu", dtype=dtype, expert_dtype=expert_dtype, max_context=200, kv_cache_tokens=333,
                    page_size=16, max_batch_tokens=48)
    plan = plan_memory(tiny_dir, **settings)
    with mixtral_ext.Engine.from_pretrained(tiny_dir, **settings) as engine:
        report = engine.memory_report()
    assert plan.weight_bytes == report["weight_bytes"]
    assert plan.workspace_bytes == report["workspace_bytes"]
    assert plan.kv_bytes_per_token == report["kv_bytes_per_token"]
    assert plan.kv_cache_bytes == report["kv_cache_bytes"]
    assert report["kv_cache_tokens"] == 336 and plan.max_context == report["max_context"] == 200
    assert plan.total_bytes == plan.weight_bytes + plan.workspace_bytes + plan.reserve_bytes + plan.kv_cache_bytes


def test_the_int4_plan_is_what_the_engine_allocates(tmp_path):
    """int4 experts, quantized as they load (even widths: two codes a byte)."""
    from conftest import make_hf_model

    make_hf_model(seed=3, intermediate_size=40).save_pretrained(tmp_path)
    settings = dict(device="cpu", dtype="float32", expert_dtype="int4", max_context=64, page_size=16)
    plan = plan_memory(tmp_path, **settings)
    with mixtral_ext.Engine.from_pretrained(tmp_path, **settings) as engine:
        report = engine.memory_report()
    assert report["expert_dtype"] == plan.expert_dtype == "int4"
    assert plan.weight_bytes == report["weight_bytes"] < plan_memory(tmp_path, device="cpu", max_context=64).weight_bytes


@pytest.mark.parametrize("shape, published", [("8x7b", 46.7e9), ("8x22b", 140.6e9)])
def test_weight_bytes_are_the_parameters_times_their_bytes(shape, published):
    c = SHAPES[shape]
    params = c.parameter_count()
    assert abs(params - published) < 0.05e9
    expert_params = c.num_layers * c.num_experts * 3 * c.hidden_size * c.intermediate_size
    expert_rows = c.num_layers * c.num_experts * (2 * c.intermediate_size + c.hidden_size)
    # int4: half a byte per weight, a float16 scale and a uint8 zero per group of 128 input columns, and
    # the column orders act order would use (int32, one per input column of w1, w3 and w2: 0.04% of 8x22B's).
    int4_groups = c.num_layers * c.num_experts * 3 * c.hidden_size * c.intermediate_size // 128
    int4_orders = 4 * c.num_layers * c.num_experts * (2 * c.hidden_size + c.intermediate_size)
    expected = {("bfloat16", None): 2 * params, ("float16", None): 2 * params,
                ("bfloat16", "float8_e4m3"): 2 * (params - expert_params) + expert_params + 4 * expert_rows,
                ("bfloat16", "int4"): 2 * (params - expert_params) + expert_params // 2 + 3 * int4_groups + int4_orders}
    for (dtype, expert_dtype), exact in expected.items():
        weights = plan_memory(shape, dtype=dtype, expert_dtype=expert_dtype, max_context=4096).weight_bytes
        assert 0 <= weights - exact < 12 * ALIGN, (dtype, expert_dtype)
    # The KV cache: 2 (K and V) x layers x KV heads x head_dim x 2 bytes per token.
    assert plan_memory(shape, max_context=4096).kv_bytes_per_token == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2


def test_longest_context_is_the_edge_of_the_plan():
    settings = dict(dtype="bfloat16", expert_dtype="float8_e4m3")
    longest = longest_context("8x22b", CARDS["h200"], **settings)
    assert 0 < longest < SHAPES["8x22b"].max_position_embeddings
    assert plan_memory("8x22b", max_context=longest, **settings).total_bytes <= CARDS["h200"]
    assert plan_memory("8x22b", max_context=longest + 1, **settings).total_bytes > CARDS["h200"]
    assert longest_context("8x22b", CARDS["h100"], **settings) == 0  # the FP8 weights alone are 136 GiB
    assert longest_context("8x7b", CARDS["h200"]) == SHAPES["8x7b"].max_position_embeddings  # capped by the model


def test_table_rows_mark_what_fits():
    rows = memory_table("8x7b", memory_bytes=parse_memory("80GB"), contexts=(4096, 65536))
    assert [row["dtype"] for row in rows] == list(PLAN_DTYPES)
    bf16, fp8, int4 = rows[0], rows[2], rows[3]
    assert bf16["total_bytes"][65536] is None  # past the model's 32768 positions
    assert not bf16["fits"][4096] and bf16["longest_context"] == 0 and bf16["kv_tokens"] == 0
    assert fp8["fits"][4096] and fp8["longest_context"] == 32768
    assert int4["weight_bytes"] < fp8["weight_bytes"] and int4["kv_tokens"] > fp8["kv_tokens"] > 32768
    left = parse_memory("80GB") - int4["weight_bytes"] - int4["workspace_bytes"] - int4["reserve_bytes"]
    assert int4["kv_tokens"] == left // int4["kv_bytes_per_token"]


def test_8x22b_in_int4_fits_one_h100():
    rows = {row["dtype"]: row for row in memory_table("8x22b", memory_bytes=CARDS["h100"], contexts=(4096,))}
    assert rows["int4"]["longest_context"] > 8192 and rows["fp8"]["longest_context"] == 0


@pytest.mark.parametrize("text, expected", [("80GB", 80 * 10**9), ("80 GiB", 80 << 30), ("1.5tb", 1.5e12),
                                            ("85e9", 85 * 10**9), ("H200", CARDS["h200"]), (4096, 4096),
                                            (".5GB", 5 * 10**8), ("80G", 80 * 10**9), ("1e-3TB", 10**9),
                                            ("80gb ", 80 * 10**9), (np.int64(7), 7)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["eighty", "80XB", "-5GB", "0", "", None, True, 2.5, "h300", "1e400", "0.0001"])
def test_bad_memory_sizes_say_what_is_expected(bad):
    with pytest.raises(mixtral_ext.SettingError, match="80GB"):
        parse_memory(bad)


def test_bad_models_and_settings_say_what_is_wrong(tmp_path):
    with pytest.raises(mixtral_ext.ModelLoadError, match="not found"):
        plan_memory("8x99b")
    with pytest.raises(mixtral_ext.ModelLoadError, match="no config.json"):
        plan_memory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(mixtral_ext.ModelLoadError, match="config.json"):
        plan_memory(tmp_path)
    with pytest.raises(mixtral_ext.SettingError, match="model must be"):
        plan_memory(42)
    with pytest.raises(mixtral_ext.SettingError, match="max_context"):
        plan_memory("8x7b", max_context=10**6)
    with pytest.raises(mixtral_ext.SettingError, match="expert_dtype"):
        plan_memory("8x7b", expert_dtype="int3")
    with pytest.raises(mixtral_ext.SettingError, match="searches max_context"):
        longest_context("8x7b", CARDS["h100"], max_context=4096)
    with pytest.raises(mixtral_ext.SettingError, match="contexts"):
        memory_table("8x7b", contexts=())
    assert main(["memory", "--shape", "8x7b", "--contexts", "0,4096"]) == 1


def test_memory_command_prints_writes_json_and_plots(tmp_path, capsys):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["memory", "--shape", "8x22b", "--gpu-memory", "h200", "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "| fp8 | 136.0 |" in table and "does not fit" in table and "15,4" in table
    data = json.loads(out_json.read_text())
    assert data["gpu_memory_bytes"] == CARDS["h200"] and len(data["rows"]) == 4
    assert data["rows"][2]["longest_context"] == longest_context("8x22b", CARDS["h200"], expert_dtype="float8_e4m3")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out_png) > 10_000


def test_memory_command_reads_a_model_directory_config_alone(tiny_dir, tmp_path, capsys):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes(open(os.path.join(tiny_dir, "config.json"), "rb").read())
    assert main(["memory", "--model", str(config_only), "--contexts", "64,128"]) == 0
    assert "| total at 64 | total at 128 |" in capsys.readouterr().out
    assert main(["memory", "--shape", "8x7b", "--gpu-memory", "lots"]) == 1
    assert "80GB" in capsys.readouterr().err
