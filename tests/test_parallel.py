"""Tensor- and expert-parallel engines on the CPU (sharding.py, parallel.py): N ranks over gloo against
one rank on tiny random checkpoints whose heads, expert widths and experts divide (and one whose KV
heads N exceeds, so they are replicated), the consolidated, fused and int4 layouts, generation, chat and
cancellation, a killed worker, impossible settings, and torchrun."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import assert_close, make_hf_model, random_tokens, write_consolidated
from test_int4 import write_int4_checkpoint

import mixtral_ext
from mixtral_ext.errors import ModelLoadError, SettingError, ShapeError, WorkerError
from mixtral_ext.int4 import Int4Weight
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint

pytest.importorskip("torch.distributed")

# 8 query heads over 2 KV heads: 2 ranks split both, 4 ranks hold a KV head each for two of them.
# The expert width 44 splits into 22 and 11 columns; the 4 experts into 2 or 1 per rank.
SHAPE = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=6, intermediate_size=44)


@pytest.fixture(scope="module")
def model():
    return make_hf_model(seed=3, **SHAPE)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_model")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_rank(model_dir):
    return mixtral_ext.Engine.from_pretrained(model_dir, max_context=128)


def assert_same_model(sharded, one_rank, vocab: int) -> None:
    """Logits of a pass, of a prefill and its decode steps, greedy and sampled generations."""
    ids = random_tokens(21, vocab, seed=4)
    assert_close(sharded.logits(ids), one_rank.logits(ids), 1e-5)
    with sharded.new_sequence() as seq, one_rank.new_sequence() as reference:
        assert_close(seq.append(ids[:13]), reference.append(ids[:13]), 1e-5)
        for token in ids[13:16]:
            assert_close(seq.append([token]), reference.append([token]), 1e-5)
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    assert sharded.generate(ids, **greedy).token_ids == one_rank.generate(ids, **greedy).token_ids
    sampled = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True, logprobs=2)
    expected = one_rank.generate(ids, **sampled)
    result = sharded.generate(ids, **sampled)
    assert result.token_ids == expected.token_ids
    np.testing.assert_allclose(result.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor", "expert"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_engine_equals_one_rank(model_dir, one_rank, ranks, expert_parallel):
    with mixtral_ext.Engine.from_pretrained(model_dir, max_context=128, tensor_parallel=ranks,
                                            expert_parallel=expert_parallel) as sharded:
        assert sharded.weight_bytes < one_rank.weight_bytes  # rank 0 holds its slice only
        assert_same_model(sharded, one_rank, one_rank.config.vocab_size)


def test_expert_parallel_rank_holds_its_whole_experts_only(model_dir, one_rank):
    """Rank 0 of 4 holds expert 0 whole (as many bytes as a quarter of every expert) and no other."""
    with mixtral_ext.Engine.from_pretrained(model_dir, max_context=128, tensor_parallel=4) as tensor_parallel:
        quarter_bytes = tensor_parallel.weight_bytes
    with mixtral_ext.Engine.from_pretrained(model_dir, max_context=128, tensor_parallel=4,
                                            expert_parallel=True) as sharded:
        local = sharded._core._local
        assert local.missing_weights() == [] and local.weight_bytes == quarter_bytes
        w2 = np.ones((one_rank.config.hidden_size, one_rank.config.intermediate_size), np.float32)  # [H, F] whole
        local.load_weight("w2", 0, 0, 0, w2, "float32")
        with pytest.raises(ShapeError, match=r"expert 1 is not held here \(this engine holds experts \[0, 1\)\)"):
            local.load_weight("w2", 0, 1, 0, w2, "float32")


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor", "expert"])
def test_consolidated_checkpoint_shards_its_interleaved_heads(model, one_rank, tmp_path, expert_parallel):
    write_consolidated(model, tmp_path)
    with mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128, tensor_parallel=2,
                                            expert_parallel=expert_parallel) as sharded:
        ids = random_tokens(17, one_rank.config.vocab_size, seed=6)
        assert_close(sharded.logits(ids), one_rank.logits(ids), 1e-5)


@pytest.mark.parametrize("variant,expert_parallel", [("awq", False), ("gptq-channel", False), ("awq", True),
                                                     ("gptq-asym-act-order", True)])
def test_int4_checkpoint_shards_its_codes(tmp_path, variant, expert_parallel):
    """int4 experts stay int4 on every rank (w1's rows split, or whole experts; act order, whose columns
    cannot be split, whole only); attention is widened, then split."""
    write_int4_checkpoint(make_hf_model(seed=11, intermediate_size=32, head_dim=8), tmp_path, variant)
    one = mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64)
    with mixtral_ext.Engine.from_pretrained(tmp_path, max_context=64, tensor_parallel=2,
                                            expert_parallel=expert_parallel) as sharded:
        assert sharded.memory_report()["expert_dtype"] == "int4"
        ids = random_tokens(19, one.config.vocab_size, seed=12)
        assert_close(sharded.logits(ids), one.logits(ids), 1e-5)


def test_int4_columns_split_on_group_boundaries_only():
    rng = np.random.default_rng(0)
    rows, cols, group = 5, 48, 8
    groups = np.arange(cols) // group
    weight = Int4Weight(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                        rng.uniform(0.5, 2, (rows, cols // group)).astype(np.float32),
                        rng.integers(0, 16, (rows, cols // group)).astype(np.float32), groups)
    part = weight.columns(16, 40, group, "w2")
    np.testing.assert_array_equal(part.dequantized(), weight.dequantized()[:, 16:40])
    with pytest.raises(ModelLoadError, match="do not start a group"):
        weight.columns(12, 36, group, "w2")
    shuffled = Int4Weight(weight.packed, weight.scales, weight.zeros, rng.permutation(groups))  # act order
    with pytest.raises(ModelLoadError, match="w2"):
        shuffled.columns(16, 40, group, "w2")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96)
    return write_random_checkpoint(tmp_path_factory.mktemp("tp_chat"), config, seed=9)


def test_chat_and_cancellation_on_a_sharded_engine(chat_dir):
    one = mixtral_ext.Engine.from_pretrained(chat_dir, max_context=256)
    messages = [{"role": "user", "content": "Name three colours."}]
    settings = dict(max_tokens=10, temperature=0)
    with mixtral_ext.Engine.from_pretrained(chat_dir, max_context=256, tensor_parallel=2) as sharded:
        assert sharded.chat(messages, **settings).message.content == one.chat(messages, **settings).message.content

        async def first_two() -> int:
            deltas = sharded.astream("Once upon a time", max_tokens=200, ignore_eos=True)
            count = 0
            async for _ in deltas:
                count += 1
                if count == 2:
                    break
            await deltas.aclose()
            return count

        assert asyncio.run(first_two()) == 2
        assert sharded.kv_cache_info()["sequences"] <= 1  # at most the prefix kept for reuse
        prompt = "The weather today"
        assert sharded.generate(prompt, **settings).token_ids == one.generate(prompt, **settings).token_ids


def test_a_killed_worker_is_an_error_within_seconds(model_dir):
    engine = mixtral_ext.Engine.from_pretrained(model_dir, max_context=128, tensor_parallel=2)
    ids = random_tokens(9, engine.config.vocab_size, seed=7)
    stream = engine.stream(ids, max_tokens=100, temperature=0, ignore_eos=True)
    next(stream)
    os.kill(engine._core._workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - start < 10
    with pytest.raises(WorkerError, match="killed by SIGKILL"):  # and on every call after it
        engine.logits(ids)
    engine.close()
    assert engine.closed


def test_ranks_out_of_step_are_an_error_not_wrong_text(model_dir):
    """A sequence rank 0 made alone (as if a call had reached rank 0 only): the next handle differs
    from the workers', and they say so instead of going on with another sequence."""
    with mixtral_ext.Engine.from_pretrained(model_dir, max_context=64, tensor_parallel=2) as engine:
        engine._core._local.create_sequence()
        with pytest.raises(WorkerError, match="out of step"):
            with engine.new_sequence() as seq:
                seq.append([1, 2, 3])


def test_impossible_tensor_parallel_settings_name_the_limit(model_dir):
    for ranks, message in [(3, "8 attention heads"), (8, "expert width"), (0, "integer >= 1"), (True, "integer")]:
        with pytest.raises(SettingError, match=message):
            mixtral_ext.Engine.from_pretrained(model_dir, max_context=64, tensor_parallel=ranks)
    with pytest.raises(SettingError, match="tensor_parallel"):
        mixtral_ext.Engine.from_pretrained(model_dir, device="cuda", max_context=64, tensor_parallel=2)
    for ranks, expert_parallel, message in [(8, True, "divide the 4 experts"), (2, "yes", "True or False")]:
        with pytest.raises(SettingError, match=message):
            mixtral_ext.Engine.from_pretrained(model_dir, max_context=64, tensor_parallel=ranks,
                                               expert_parallel=expert_parallel)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor", "expert"])
def test_synthetic_sharded_engine_generates(model_dir, expert_parallel):
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96, vocab_size=300)
    with mixtral_ext.Engine.synthetic(config, max_context=64, tensor_parallel=2, seed=1,
                                      expert_parallel=expert_parallel) as engine:
        result = engine.generate([1, 2, 3], max_tokens=5, temperature=0, ignore_eos=True)
        assert len(result.token_ids) == 5


@pytest.mark.parametrize("split", ["tensor", "expert"])
def test_torchrun_starts_the_ranks(model_dir, split):
    """torchrun runs the command in every rank; rank 0 holds the engine, the others follow it."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = torchrun + ["-m", "mixtral_ext", "bench", "--model", model_dir, "--tensor-parallel", "2",
                          "--prompt-tokens", "8", "--new-tokens", "4"] + ["--expert-parallel"] * (split == "expert")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{split} parallel over 2 ranks" in done.stdout


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor", "expert"])
def test_fused_expert_tensors_shard_their_gate_and_up_rows(model, one_rank, tmp_path, expert_parallel):
    """Experts stored as transformers 5 holds them (mlp.experts.gate_up_proj [E, 2F, H]): each rank takes
    its F/N rows of the gate half and of the up half, or its experts of the E."""
    from safetensors.torch import save_file

    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with mixtral_ext.Engine.from_pretrained(tmp_path, max_context=128, tensor_parallel=2,
                                            expert_parallel=expert_parallel) as sharded:
        ids = random_tokens(15, one_rank.config.vocab_size, seed=8)
        assert_close(sharded.logits(ids), one_rank.logits(ids), 1e-5)
