"""The engine on the device (marked cuda; skipped without a GPU): its logits against the CPU engine
and transformers in float32, bfloat16 and float16 weights, incremental decode against a full pass,
greedy generation token for token against the CPU engine (on every expert GEMM path), seeded
sampling, decode steps recorded as CUDA graphs against direct ones, pipelined decode (stopped
anywhere, every KV page given back), a synthetic model, a long context with and without chunked
prefill, FP8 and int4 experts, a device out-of-memory as a Python exception, and an engine sharded
over two GPU ranks whose all-reduces are NCCL's (on the emulator, its NCCL stand-in). The single operations are
held to their CPU twins in test_ops.py.

    bash tests/run_cuda_emulator.sh -k engine      # without a GPU: on the CUDA emulator

MIXTRAL_EXT_TEST_DEVICE=cpu puts the CPU backend in the device's place (device_helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import assert_close, hf_logits, random_tokens
from device_helpers import DEVICE, DTYPES, EMULATED, need_gpu

import mixtral_ext
from mixtral_ext.errors import SettingError

pytestmark = pytest.mark.cuda
LONG_CONTEXT = 1000 if EMULATED else 3000  # the emulator runs a kernel's threads one after another

# Greedy tokens of the device and the CPU agree except past a near-tie: nvcc's fused multiply-adds,
# the device's expf and cuBLAS' summation order may break a tie of float32 logits the other way.
GREEDY_TIE = 1e-3  # far above their logits' difference (~1e-5), far below a typical top-two gap


def assert_greedy_agrees(got, expected, reference, prompt):
    """got equals expected token for token, or up to a first difference where the reference engine's
    top two logits lie within GREEDY_TIE (the two then go on from different tokens: not compared)."""
    got, expected = list(got), list(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            top_two = np.sort(reference.logits(list(prompt) + expected[:i])[-1])[-2:]
            assert top_two[1] - top_two[0] <= GREEDY_TIE, f"token {i}: {a} != {b}, clear margin {np.diff(top_two)}"
            return
    assert len(got) == len(expected)


@pytest.fixture(scope="module")
def device_engines(tiny_dir):
    need_gpu()
    return {dtype: mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, dtype=dtype, max_context=256,
                                                      page_size=7, max_batch_tokens=48)
            for dtype in DTYPES}


def test_engine_logits_match_cpu_and_transformers(device_engines, tiny_engine, tiny_model, tiny_dir):
    ids = random_tokens(100, 101, seed=31)
    cpu = tiny_engine.logits(ids)
    assert_close(device_engines["float32"].logits(ids), cpu, 1e-4)
    assert_close(device_engines["float32"].logits(ids), hf_logits(tiny_model, ids), 1e-4)
    # Half-precision weights: against the CPU engine on the same rounded weights (which keeps its
    # activations in float32), over a short prompt so that rounding rarely flips a routing choice.
    short = ids[:24]
    for dtype, rel in (("bfloat16", 5e-2), ("float16", 1e-2)):
        same_weights = mixtral_ext.Engine.from_pretrained(tiny_dir, dtype=dtype, max_context=64)
        assert_close(device_engines[dtype].logits(short), same_weights.logits(short), rel)


def test_engine_incremental_decode_equals_full_pass(device_engines):
    engine, ids = device_engines["float32"], random_tokens(60, 101, seed=32)
    full = engine.logits(ids)
    with engine.new_sequence() as seq:
        steps = [seq.append(ids[:23])] + [seq.append([t]) for t in ids[23:]]
    assert_close(np.stack(steps), full[22:], 1e-4)


def test_greedy_generation_equals_cpu_and_seeded_sampling_repeats(device_engines, tiny_engine):
    prompt = random_tokens(11, 101, seed=33)
    cpu = tiny_engine.generate(prompt, max_tokens=30, temperature=0)
    assert_greedy_agrees(device_engines["float32"].generate(prompt, max_tokens=30, temperature=0).token_ids,
                         cpu.token_ids, tiny_engine, prompt)
    runs = [device_engines["bfloat16"].generate(prompt, max_tokens=20, temperature=0.9, top_p=0.9, seed=5).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]
    if DEVICE == "cuda":  # each expert GEMM path gives the same greedy tokens
        engine = device_engines["float32"]
        for path in ("per_expert", "batched", "grouped", "auto"):
            engine.set_expert_gemm_path(path)
            assert_greedy_agrees(engine.generate(prompt, max_tokens=30, temperature=0).token_ids, cpu.token_ids,
                                 tiny_engine, prompt)


def test_recorded_decode_steps_equal_direct_ones(device_engines, tiny_dir):
    """cuda_graphs=True: the second decode step is recorded as a CUDA graph and replayed for every
    later token, across page boundaries (page_size 7), for greedy and seeded sampling."""
    graphs = mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, dtype="bfloat16", max_context=256,
                                                page_size=7, max_batch_tokens=48, cuda_graphs=True)
    prompt = random_tokens(13, 101, seed=36)
    for settings in (dict(temperature=0), dict(temperature=0.8, top_k=20, seed=9, logprobs=2)):
        expected = device_engines["bfloat16"].generate(prompt, max_tokens=40, **settings)
        got = graphs.generate(prompt, max_tokens=40, **settings)
        assert got.token_ids == expected.token_ids
    assert graphs.kv_cache_info()["free_pages"] >= 0


def test_pipelined_decode_stops_anywhere_and_gives_every_page_back(device_engines, tiny_engine):
    """On the device each decode step is queued before the host reads the previous token; a
    generation that stops (stop token, max_tokens, a closed stream) gives back the step queued
    ahead: the tokens agree with the CPU engine's, a repeated prompt gives the same tokens and
    reuses exactly the cached prefix, and every KV page comes back."""
    engine, prompt = device_engines["float32"], random_tokens(9, 101, seed=38)
    full = engine.generate(prompt, max_tokens=24, temperature=0).token_ids
    assert_greedy_agrees(full, tiny_engine.generate(prompt, max_tokens=24, temperature=0).token_ids, tiny_engine, prompt)
    for settings in (dict(max_tokens=24), dict(max_tokens=1), dict(max_tokens=24, stop_token_ids=[full[5]])):
        got = engine.generate(prompt, temperature=0, **settings)
        expected = full[: full.index(full[5]) + 1] if "stop_token_ids" in settings else full[: settings["max_tokens"]]
        assert got.token_ids == expected
        assert got.finish_reason == ("stop" if "stop_token_ids" in settings else "length")
        again = engine.generate(prompt, temperature=0, **settings)  # the cached prompt is reused
        assert again.token_ids == expected and again.usage.cached_tokens == len(prompt) - 1
    stream = engine.stream(prompt, max_tokens=24, temperature=0)
    assert [next(stream).token_id for _ in range(4)] == full[:4]
    stream.close()
    engine.clear_prefix_cache()
    info = engine.kv_cache_info()
    assert info["free_pages"] == info["num_pages"]


def test_pipelined_streams_stepped_alternately_equal_their_serial_runs(device_engines):
    engine = device_engines["bfloat16"]
    jobs = [(random_tokens(7 + i, 101, seed=40 + i), dict(max_tokens=15, temperature=0.9, seed=i)) for i in range(2)]
    serial = [engine.generate(p, **s).token_ids for p, s in jobs]
    a, b = (engine.stream(p, **s) for p, s in jobs)
    pairs = list(zip(a, b))
    assert [x.token_id for x, _ in pairs] == serial[0] and [y.token_id for _, y in pairs] == serial[1]


def test_synthetic_engine_matches_the_cpu_one(device_engines):
    from dataclasses import replace

    from mixtral_ext.synthetic import DEMO_CONFIG

    config = replace(DEMO_CONFIG, num_layers=2)
    ids = random_tokens(40, config.vocab_size, seed=35)
    cpu = mixtral_ext.Engine.synthetic(config, max_context=64, seed=7).logits(ids)
    device = mixtral_ext.Engine.synthetic(config, device=DEVICE, dtype="float32", max_context=64, seed=7).logits(ids)
    assert_close(device, cpu, 1e-4)
    cpu_fp8 = mixtral_ext.Engine.synthetic(config, expert_dtype="float8_e4m3", max_context=64, seed=7).logits(ids)
    device_fp8 = mixtral_ext.Engine.synthetic(config, device=DEVICE, dtype="float32", expert_dtype="float8_e4m3",
                                              max_context=64, seed=7).logits(ids)
    assert_close(device_fp8, cpu_fp8, 1e-4)  # FP8 experts filled on the device: the same bytes and scales
    cpu_int4 = mixtral_ext.Engine.synthetic(config, expert_dtype="int4", max_context=64, seed=7).logits(ids)
    device_int4 = mixtral_ext.Engine.synthetic(config, device=DEVICE, dtype="float32", expert_dtype="int4",
                                               max_context=64, seed=7).logits(ids)
    assert_close(device_int4, cpu_int4, 1e-4)  # int4 codes, scales and zeros alike


def test_long_context_engine_matches_the_cpu_and_chunking_does_not_matter(device_engines):
    """A one-layer model (so a routing flip of an earlier token cannot reach the last logits) over
    LONG_CONTEXT tokens (3,000; 1,000 on the emulator): chunked prefill equals one-shot on the
    device, and both equal the CPU engine."""
    from dataclasses import replace

    from mixtral_ext.synthetic import DEMO_CONFIG

    config = replace(DEMO_CONFIG, num_layers=1, head_dim=64, num_heads=6, num_kv_heads=2)
    ids = random_tokens(LONG_CONTEXT, config.vocab_size, seed=37)
    for dtype, rel in (("float32", 1e-4), ("bfloat16", 5e-2)):
        cpu = mixtral_ext.Engine.synthetic(config, dtype=dtype, max_context=LONG_CONTEXT, max_batch_tokens=512, seed=8)
        with cpu.new_sequence() as seq:
            expected = seq.append(ids)
        results = []
        for chunk in (512, LONG_CONTEXT):
            engine = mixtral_ext.Engine.synthetic(config, device=DEVICE, dtype=dtype, max_context=LONG_CONTEXT,
                                                  max_batch_tokens=chunk, seed=8)
            with engine.new_sequence() as seq:
                results.append(seq.append(ids))
        assert_close(results[0], results[1], rel / 4)
        assert_close(results[1], expected, rel)


def test_fp8_expert_engine_matches_the_cpu_one(device_engines, tiny_dir):
    """expert_dtype="float8_e4m3": prompt chunks of 16 tokens take the dequantized cuBLAS path, decode
    steps the hand-written kernel (recorded as CUDA graphs too); logits and greedy tokens equal the
    CPU engine's on the same bytes."""
    ids = random_tokens(40, 101, seed=41)
    cpu = mixtral_ext.Engine.from_pretrained(tiny_dir, expert_dtype="float8_e4m3", max_context=64)
    device = mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, dtype="float32", expert_dtype="float8_e4m3",
                                                max_context=64, max_batch_tokens=16)
    assert_close(device.logits(ids), cpu.logits(ids), 1e-4)
    prompt = ids[:7]
    expected = device.generate(prompt, max_tokens=20, temperature=0).token_ids
    assert_greedy_agrees(expected, cpu.generate(prompt, max_tokens=20, temperature=0).token_ids, cpu, prompt)
    graphs = mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, dtype="float32", expert_dtype="float8_e4m3",
                                                max_context=64, max_batch_tokens=16, cuda_graphs=True)
    assert graphs.generate(prompt, max_tokens=20, temperature=0).token_ids == expected  # no host sync in a step
    short = ids[:24]
    cpu_bf16 = mixtral_ext.Engine.from_pretrained(tiny_dir, dtype="bfloat16", expert_dtype="float8_e4m3", max_context=64)
    device_bf16 = mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, dtype="bfloat16",
                                                     expert_dtype="float8_e4m3", max_context=64, max_batch_tokens=16)
    assert_close(device_bf16.logits(short), cpu_bf16.logits(short), 5e-2)


def test_int4_expert_engine_matches_the_cpu_one(device_engines, tmp_path):
    """int4 experts on the device: a GPTQ checkpoint with act order, kept as stored (x gathered into
    each projection's column order), and a float checkpoint quantized as it loads. Prompt chunks of 16
    tokens take the dequantized cuBLAS path, decode steps the hand-written kernel (recorded as CUDA
    graphs too); logits and greedy tokens equal the CPU engine's on the same codes."""
    from conftest import make_hf_model
    from test_int4 import SHAPE, write_int4_checkpoint

    model = make_hf_model(seed=13, **SHAPE)
    write_int4_checkpoint(model, tmp_path / "gptq", "gptq-asym-act-order")
    model.save_pretrained(tmp_path / "float")
    ids = random_tokens(40, model.config.vocab_size, seed=43)
    prompt = ids[:7]
    for path, expert_dtype in ((tmp_path / "gptq", None), (tmp_path / "float", "int4")):
        cpu = mixtral_ext.Engine.from_pretrained(path, expert_dtype=expert_dtype, max_context=64)
        settings = dict(device=DEVICE, dtype="float32", expert_dtype=expert_dtype, max_context=64, max_batch_tokens=16)
        device = mixtral_ext.Engine.from_pretrained(path, **settings)
        assert device.weight_bytes == cpu.weight_bytes < mixtral_ext.Engine.from_pretrained(
            path, expert_dtype="float32", max_context=64).weight_bytes  # the experts are int4 on both
        assert_close(device.logits(ids), cpu.logits(ids), 1e-4)
        expected = device.generate(prompt, max_tokens=20, temperature=0).token_ids
        assert_greedy_agrees(expected, cpu.generate(prompt, max_tokens=20, temperature=0).token_ids, cpu, prompt)
        graphs = mixtral_ext.Engine.from_pretrained(path, cuda_graphs=True, **settings)
        assert graphs.generate(prompt, max_tokens=20, temperature=0).token_ids == expected


def test_int4_act_order_in_bfloat16_with_experts_wider_than_twice_the_hidden_size(tmp_path):
    """w2's inputs in its column order (F a row) outgrow w1's and w3's (2H) when F > 2H: the engine's
    workspace holds them (a scratch too small would be a ShapeError), for prompt chunks (dequantized
    GEMMs) and decode steps (the GEMV), in bfloat16 (the CPU engine computes in float32: within 5e-2)."""
    from conftest import make_hf_model
    from test_int4 import write_int4_checkpoint

    need_gpu()
    model = make_hf_model(seed=14, intermediate_size=104, head_dim=8)  # F = 104 > 2H = 96
    write_int4_checkpoint(model, tmp_path, "gptq-asym-act-order")
    ids = random_tokens(20, model.config.vocab_size, seed=47)
    cpu = mixtral_ext.Engine.from_pretrained(tmp_path, dtype="bfloat16", max_context=64)
    device = mixtral_ext.Engine.from_pretrained(tmp_path, device=DEVICE, dtype="bfloat16", max_context=64,
                                                max_batch_tokens=16)
    assert device.memory_report()["expert_dtype"] == "int4"
    assert_close(device.logits(ids), cpu.logits(ids), 5e-2)
    with device.new_sequence() as seq, cpu.new_sequence() as reference:
        seq.append(ids[:5]), reference.append(ids[:5])
        for token in ids[5:8]:  # decode steps: one token, two expanded rows
            assert_close(seq.append([token]), reference.append([token]), 5e-2)


def test_device_out_of_memory_is_an_exception(tiny_dir, device_engines):
    with pytest.raises(mixtral_ext.DeviceOutOfMemoryError, match="out of memory"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, max_context=256, kv_cache_tokens=2**31 - 1)
    assert device_engines["float32"].logits([1, 2, 3]).shape == (3, 101)


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """A checkpoint whose heads and expert width split over two ranks; on the emulator, two emulated
    GPUs and NCCL's stand-in (in the emulator's library)."""
    from conftest import make_hf_model

    need_gpu()
    if EMULATED:
        monkeypatch.setenv("CUDA_EMULATOR_DEVICES", "2")
        monkeypatch.setenv("MIXTRAL_EXT_NCCL_LIBRARY", os.environ["MIXTRAL_EXT_CUDA_LIBRARY"])
    elif DEVICE == "cuda" and mixtral_ext.cuda_info()["device_count"] < 2:
        pytest.skip("one GPU: a sharded engine needs two")
    make_hf_model(seed=3, num_attention_heads=8, num_key_value_heads=2, head_dim=6,
                  intermediate_size=44).save_pretrained(tmp_path)
    return tmp_path


def test_sharded_engine_over_nccl_matches_the_cpu_one(two_gpus):
    """Two ranks, a process and a GPU each, sum their partial outputs with NCCL on their streams: the
    logits and greedy tokens equal the one-rank CPU engine's, and with CUDA graphs (the all-reduces
    recorded in each decode step's graph) equal the direct steps'."""
    cpu = mixtral_ext.Engine.from_pretrained(two_gpus, max_context=64)
    ids = random_tokens(30, cpu.config.vocab_size, seed=44)
    prompt = ids[:6]
    expected = cpu.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids
    settings = dict(device=DEVICE, dtype="float32", max_context=64, max_batch_tokens=16, tensor_parallel=2)
    with mixtral_ext.Engine.from_pretrained(two_gpus, **settings) as sharded:
        assert_close(sharded.logits(ids), cpu.logits(ids), 1e-4)
        direct = sharded.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids
        assert_greedy_agrees(direct, expected, cpu, prompt)
    with mixtral_ext.Engine.from_pretrained(two_gpus, cuda_graphs=True, **settings) as sharded:
        assert sharded.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids == direct


def test_expert_parallel_engine_over_nccl_matches_the_cpu_one(two_gpus):
    """Two ranks of two whole experts each: float32 experts (the per-expert GEMMs, offsets read on the
    host, so no CUDA graphs: refused by name) equal the CPU engine; FP8 experts (the GEMV reads the
    offsets on the device) equal the CPU's FP8 engine, and with CUDA graphs their own direct steps."""
    ids = random_tokens(30, 101, seed=45)
    prompt = ids[:6]
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    settings = dict(device=DEVICE, dtype="float32", max_context=64, max_batch_tokens=16, tensor_parallel=2,
                    expert_parallel=True)
    for expert_dtype in (None, "float8_e4m3"):
        cpu = mixtral_ext.Engine.from_pretrained(two_gpus, max_context=64, expert_dtype=expert_dtype)
        with mixtral_ext.Engine.from_pretrained(two_gpus, expert_dtype=expert_dtype, **settings) as sharded:
            assert_close(sharded.logits(ids), cpu.logits(ids), 1e-4)
            direct = sharded.generate(prompt, **greedy).token_ids
            assert_greedy_agrees(direct, cpu.generate(prompt, **greedy).token_ids, cpu, prompt)
        if expert_dtype is None:
            if DEVICE == "cuda":  # (the CPU in the GPU's place, tests/run_sanitizers.sh, records no graphs)
                with pytest.raises(SettingError, match="cuda_graphs cannot record an expert-parallel decode step"):
                    mixtral_ext.Engine.from_pretrained(two_gpus, cuda_graphs=True, **settings)
        else:
            with mixtral_ext.Engine.from_pretrained(two_gpus, expert_dtype=expert_dtype, cuda_graphs=True,
                                                    **settings) as sharded:
                assert sharded.generate(prompt, **greedy).token_ids == direct


def test_expert_parallel_int4_with_act_order_over_nccl(two_gpus):
    """A GPTQ checkpoint with act order, whose columns tensor parallelism cannot split, on two GPUs
    expert parallel: each rank gathers its experts' rows into their column orders by the offsets of
    its slice (the prompt's dequantized GEMMs, the decode steps' GEMV); equal to the CPU engine."""
    from conftest import make_hf_model
    from test_int4 import write_int4_checkpoint

    path = two_gpus / "act_order"
    path.mkdir()
    write_int4_checkpoint(make_hf_model(seed=11, intermediate_size=32, head_dim=8), path, "gptq-asym-act-order")
    cpu = mixtral_ext.Engine.from_pretrained(path, max_context=64)
    ids = random_tokens(25, cpu.config.vocab_size, seed=46)
    greedy = dict(max_tokens=8, temperature=0, ignore_eos=True)
    with mixtral_ext.Engine.from_pretrained(path, device=DEVICE, dtype="float32", max_context=64, tensor_parallel=2,
                                            expert_parallel=True) as sharded:
        assert sharded.memory_report()["expert_dtype"] == "int4"
        assert_close(sharded.logits(ids), cpu.logits(ids), 1e-4)
        got = sharded.generate(ids[:5], **greedy).token_ids
        assert_greedy_agrees(got, cpu.generate(ids[:5], **greedy).token_ids, cpu, ids[:5])


def test_a_dead_gpu_rank_is_an_error_not_a_hang(two_gpus):
    """A worker killed mid-generation: rank 0's watchdog aborts the NCCL group, so its step ends and the
    generation raises WorkerError. In a process of its own, as the aborted group's device error stays
    with the process (as a GPU context's would)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import mixtral_ext
        engine = mixtral_ext.Engine.from_pretrained({str(two_gpus)!r}, device={DEVICE!r}, dtype="float32",
                                                    max_context=256, tensor_parallel=2)
        stream = engine.stream([1, 2, 3], max_tokens=200, temperature=0, ignore_eos=True)
        next(stream)
        os.kill(engine._core._workers[0].pid, signal.SIGKILL)
        start = time.monotonic()
        try:
            for _ in stream:
                pass
        except mixtral_ext.WorkerError as e:
            print("WorkerError after", round(time.monotonic() - start, 1), "s:", e)
        engine.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WorkerError after" in done.stdout and "killed by SIGKILL" in done.stdout, done.stdout
    assert float(done.stdout.split("after")[1].split("s:")[0]) < 10

