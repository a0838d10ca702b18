"""The CUDA backend against its CPU twin (marked cuda; skipped without a GPU).

Every operation runs on both backends through mixtral_ext._C.Ops on random
inputs of odd sizes in float32, bfloat16 and float16 (both sides read the same
rounded inputs; every output buffer has guard bytes checked after the op);
integer outputs (expert ids, offsets, row maps) must be equal. Then the whole
engine: GPU logits against the CPU engine and transformers, greedy generation
token for token, seeded sampling, and a device out-of-memory as a Python
exception. Without a GPU, two stand-ins run the same tests:
MIXTRAL_EXT_TEST_DEVICE=emulator with MIXTRAL_EXT_CUDA_LIBRARY naming the CUDA
emulator's build (tests/run_cuda_emulator.sh) runs the CUDA backend's own code,
kernels and cuBLAS calls included, on the CPU; MIXTRAL_EXT_TEST_DEVICE=cpu puts
the CPU backend under test, which checks the tests themselves.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import (SAMPLING_LOGITS, SAMPLING_SETTINGS, assert_close, hf_logits, random_tokens,
                      truncated_softmax)

import mixtral_ext
from mixtral_ext import _C
from mixtral_ext.cuda import backend_library

EMULATED = os.environ.get("MIXTRAL_EXT_TEST_DEVICE") == "emulator"
DEVICE = "cuda" if EMULATED else os.environ.get("MIXTRAL_EXT_TEST_DEVICE", "cuda")
# The emulator runs a kernel's threads one after another: the longest tests shrink there.
SAMPLING_DRAWS = 600 if EMULATED else 3000
LONG_CONTEXT = 1000 if EMULATED else 3000
DTYPES = ["float32", "bfloat16", "float16"]
# max |device - cpu| <= REL * max |cpu|: one rounding of the output dtype, or float32 sums in another order.
REL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}

pytestmark = pytest.mark.cuda


def gpu_available() -> bool:
    return DEVICE == "cpu" or mixtral_ext.cuda_info()["device_count"] > 0


def need_gpu() -> None:
    """Skips the test without a usable device; with MIXTRAL_EXT_REQUIRE_GPU=1 (the device check)
    fails it instead, so that a backend that does not load cannot pass as 400 skips."""
    if not gpu_available():
        message = f"no CUDA device: {mixtral_ext.cuda_info()['summary']}"
        if os.environ.get("MIXTRAL_EXT_REQUIRE_GPU") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def ops():
    need_gpu()
    device = _C.Ops(DEVICE, backend_library() if DEVICE == "cuda" else "")
    return _C.Ops("cpu"), device


def rng(seed: int):
    return np.random.default_rng(seed)


def normal(r, *shape, scale=1.0):
    return (r.normal(0.0, scale, size=shape)).astype(np.float32)


def close(actual, expected, dtype, rel_scale=1.0):
    assert_close(np.asarray(actual), np.asarray(expected), REL[dtype] * rel_scale)


# ---- single operations ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(ops, dtype):
    r = rng(1)
    table, ids = normal(r, 301, 67), r.integers(0, 301, size=13).astype(np.int32)
    cpu, dev = (o.embedding(table, ids, dtype) for o in ops)
    np.testing.assert_array_equal(dev, cpu)  # a copy: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm(ops, dtype, with_delta):
    r = rng(2)
    residual, delta, weight = normal(r, 11, 1031), normal(r, 11, 1031), r.uniform(0.5, 1.5, 1031).astype(np.float32)
    (cpu_res, cpu_out), (dev_res, dev_out) = (o.add_rmsnorm(residual, delta if with_delta else None, weight, 1e-5, dtype)
                                              for o in ops)
    np.testing.assert_array_equal(dev_res, cpu_res)  # one rounded add: exact
    close(dev_out, cpu_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", ["same", "float32"])
@pytest.mark.parametrize("m", [1, 5, 77])
def test_matmul(ops, dtype, out_dtype, m):
    r = rng(3)
    x, w = normal(r, m, 333), normal(r, 129, 333, scale=0.05)
    out_dtype = dtype if out_dtype == "same" else out_dtype
    cpu, dev = (o.matmul(x, w, dtype, out_dtype) for o in ops)
    close(dev, cpu, out_dtype, rel_scale=4.0)


def paged_setup(r, tokens_before, tokens, heads, kv_heads, head_dim, page_size, dtype_pages=23, spare_pages=0):
    """A shuffled page table covering positions [0, tokens_before + tokens), plus spare_pages more
    (a table longer than the context, as a captured decode step sees it), and random pools."""
    pages_needed = (tokens_before + tokens + page_size - 1) // page_size + spare_pages
    table = r.permutation(dtype_pages)[:pages_needed].astype(np.int32)
    k_pool = normal(r, dtype_pages, kv_heads, page_size, head_dim)
    v_pool = normal(r, dtype_pages, kv_heads, page_size, head_dim)
    qkv = normal(r, tokens, (heads + 2 * kv_heads) * head_dim)
    positions = np.arange(tokens_before, tokens_before + tokens, dtype=np.int32)
    return qkv, positions, k_pool, v_pool, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 10), (8, 8, 16), (12, 1, 64), (6, 3, 128)])
def test_rope_kv_append(ops, dtype, heads, kv_heads, head_dim):
    r = rng(4)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, 37, 9, heads, kv_heads, head_dim, page_size=5)
    positions[-1] = 70000  # a long-context angle; its page is the last of the table
    table = np.concatenate([table, np.full(70000 // 5 + 1 - len(table), table[0], np.int32)])
    cpu, dev = (o.rope_kv_append(qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool, table, dtype)
                for o in ops)
    for c, d in zip(cpu, dev):
        close(d, c, dtype, rel_scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size", [(6, 2, 10, 5), (8, 8, 16, 16), (12, 1, 64, 7),
                                                               (6, 3, 128, 16), (12, 2, 128, 16), (4, 2, 256, 3)])
@pytest.mark.parametrize("before,tokens,spare", [(0, 1, 0), (0, 19, 0), (45, 1, 0), (100, 33, 0), (37, 150, 0),
                                                 (700, 1, 0), (520, 70, 0), (1999, 3, 40), (8190, 2, 0),
                                                 (9000, 1, 0)]
                         + ([] if EMULATED else [(5000, 300, 0)]))
def test_attention(ops, dtype, heads, kv_heads, head_dim, page_size, before, tokens, spare):
    """Short caches take one block per (token, KV head); past 256 positions few tokens split the
    cache (flash-decoding) into at most 64 splits of at least 128 positions (longer past 8192),
    including splits past the end of the context (spare pages); more tokens in bfloat16/float16
    with head_dim 64 or 128 run on the tensor cores (blocks of 64 (token, head) rows, tiles of 64
    positions: these lengths cross both, and pages)."""
    r = rng(5)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, before, tokens, heads, kv_heads, head_dim, page_size,
                                                        dtype_pages=(before + tokens) // page_size + spare + 9,
                                                        spare_pages=spare)
    cpu = ops[0].attention(qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, table, dtype)
    # On the GPU both kernels: "auto" sends prefill in half precision (head_dim 64, 128) to the tensor cores.
    for mode in ("auto", "simple") if DEVICE == "cuda" else ("auto",):
        if DEVICE == "cuda":
            ops[1].set_option("attention", mode)
        dev = ops[1].attention(qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, table, dtype)
        close(dev, cpu, dtype, rel_scale=2.0)
    if DEVICE == "cuda":
        ops[1].set_option("attention", "auto")


def test_attention_group_past_the_registers_is_a_shape_error(ops):
    """32 query heads per KV head would be a block of 1024 threads, more than the decode kernel's
    registers allow (672 at 94 per thread on sm_90a): a ShapeError before the launch, and the
    backend stays usable."""
    if DEVICE != "cuda":
        pytest.skip("a limit of the CUDA kernel")
    r = rng(29)
    args = paged_setup(r, 20, 1, 32, 1, 128, 16)
    qkv, positions, k_pool, v_pool, table = args
    with pytest.raises(mixtral_ext.ShapeError, match="registers per thread allow"):
        ops[1].attention(qkv, 32, 1, 128, positions, k_pool, v_pool, table, "float32")
    qkv, positions, k_pool, v_pool, table = paged_setup(r, 20, 1, 6, 1, 128, 16)
    close(ops[1].attention(qkv, 6, 1, 128, positions, k_pool, v_pool, table, "float32"),
          ops[0].attention(qkv, 6, 1, 128, positions, k_pool, v_pool, table, "float32"), "float32", rel_scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size", [(6, 2, 10, 5), (12, 1, 64, 7), (12, 2, 128, 16)])
@pytest.mark.parametrize("before,tokens,spare", [(0, 1, 0), (45, 1, 0), (700, 1, 40), (9000, 1, 0), (100, 3, 0)])
def test_rope_attention_equals_rope_kv_append_then_attention(ops, dtype, heads, kv_heads, head_dim, page_size, before,
                                                             tokens, spare):
    """For one token (decode) the GPU rotates q as it reads it and the block holding the token's
    position writes its k and v into the cache and uses them in place of that row (with and
    without splits); more tokens run the two operations."""
    r = rng(19)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, before, tokens, heads, kv_heads, head_dim, page_size,
                                                        dtype_pages=(before + tokens) // page_size + spare + 9,
                                                        spare_pages=spare)
    cpu, dev = (o.rope_attention(qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool, table, dtype)
                for o in ops)
    for c, d in zip(cpu, dev):  # the output, then both pools with the token's rows written
        close(d, c, dtype, rel_scale=2.0)


@pytest.mark.parametrize("experts,k", [(8, 2), (5, 1), (13, 4)])
def test_router_and_permutation_are_exact(ops, experts, k):
    r = rng(6)
    logits = normal(r, 37, experts, scale=2.0)
    (cpu_ids, cpu_w), (dev_ids, dev_w) = (o.router_topk(logits, k) for o in ops)
    np.testing.assert_array_equal(dev_ids, cpu_ids)
    assert_close(dev_w, cpu_w, 1e-6)
    cpu_perm, dev_perm = (o.moe_permute(cpu_ids, experts) for o in ops)
    for c, d in zip(cpu_perm, dev_perm):
        np.testing.assert_array_equal(d, c)
    skewed = np.where(r.random(cpu_ids.shape) < 0.7, 0, cpu_ids).astype(np.int32)  # empty and crowded experts
    for c, d in zip(*(o.moe_permute(skewed, experts) for o in ops)):
        np.testing.assert_array_equal(d, c)
    # Past 48 KiB of ids the GPU kernel reads them from global memory instead of a shared copy.
    many = r.integers(0, experts, size=(12289 // k + 1, k)).astype(np.int32)
    for c, d in zip(*(o.moe_permute(many, experts) for o in ops)):
        np.testing.assert_array_equal(d, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts,k", [(1, 96, 8, 2), (3, 37, 5, 1), (8, 200, 13, 4), (8, 64, 32, 3),
                                                     (9, 40, 8, 2)])
def test_route_equals_router_matmul_topk_and_permutation(ops, dtype, tokens, hidden, experts, k):
    """The routing of a layer as one operation: fused into one kernel on the GPU for up to 8 tokens
    and 32 experts (16-byte loads when the hidden size allows, else single elements), the four
    operations beyond; expert ids, offsets, row maps and the gathered rows exactly the CPU's."""
    r = rng(16)
    x, router = normal(r, tokens, hidden), normal(r, experts, hidden, scale=0.5)
    cpu, dev = (o.route(x, router, k, dtype) for o in ops)
    close(dev[0], cpu[0], "float32", rel_scale=10.0)  # logits: float32 sums in another order
    assert_close(dev[2], cpu[2], 1e-4)  # routing weights
    for c, d in zip(cpu[1:2] + cpu[3:], dev[1:2] + dev[3:]):
        np.testing.assert_array_equal(d, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,ffn", [(93, 71), (96, 40)])  # single elements; 16 bytes at a time on the GPU
def test_gather_silu_unpermute(ops, dtype, hidden, ffn):
    r = rng(7)
    tokens, k = 19, 2
    ids = r.integers(0, 6, size=(tokens, k)).astype(np.int32)
    _, p2e, e2p = ops[0].moe_permute(ids, 6)
    x = normal(r, tokens, hidden)
    cpu, dev = (o.moe_gather(x, p2e, k, dtype) for o in ops)
    np.testing.assert_array_equal(dev, cpu)
    gate_up = normal(r, tokens * k, 2 * ffn)
    cpu, dev = (o.silu_mul(gate_up, dtype) for o in ops)
    close(dev, cpu, dtype)
    y, weights = normal(r, tokens * k, hidden), r.dirichlet(np.ones(k), size=tokens).astype(np.float32)
    cpu, dev = (o.moe_unpermute(y, e2p, weights, dtype) for o in ops)
    close(dev, cpu, dtype)
    # Combined straight into the residual stream and its norm, for all tokens or the last 3 only
    # (y keeps every token's rows).
    residual, norm_weight = normal(r, tokens, hidden), r.uniform(0.5, 1.5, hidden).astype(np.float32)
    for first in (0, tokens - 3):
        cpu, dev = (o.moe_unpermute_add_rmsnorm(y, e2p[first * k:], weights[first:], residual[first:], norm_weight,
                                                1e-5, dtype) for o in ops)
        for c, d in zip(cpu, dev):
            close(d, c, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert", [[1, 0, 1, 0, 0], [0, 0, 2, 0, 0], [9, 0, 31, 4, 1], [40, 33, 0, 7, 57]])
def test_expert_matmul_three_paths(ops, dtype, rows_per_expert):
    cpu_ops, dev_ops = ops
    r = rng(8)
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x, w = normal(r, int(offsets[-1]), 203), normal(r, len(rows_per_expert), 117, 203, scale=0.07)
    expected = cpu_ops.expert_matmul(x, w, offsets, dtype, dtype)
    results = {}
    paths = ["auto", "per_expert", "batched"] + (["grouped"] if DEVICE == "cuda" else [])
    for path in paths:
        if DEVICE == "cuda":
            dev_ops.set_option("expert_gemm", path)
        results[path] = dev_ops.expert_matmul(x, w, offsets, dtype, dtype)
        close(results[path], expected, dtype, rel_scale=4.0)
    if DEVICE == "cuda":
        dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,ffn,experts,k", [(1, 96, 40, 8, 2), (5, 37, 23, 5, 1), (8, 64, 30, 13, 4),
                                                         (9, 40, 17, 8, 2), (23, 48, 29, 6, 2)])
def test_moe_equals_route_then_expert_ffn(ops, dtype, tokens, hidden, ffn, experts, k):
    """A layer's experts as one operation on every expert GEMM path: on the batched path the routing
    kernel writes both GEMMs' pointer arrays (up to 8 tokens), or one launch does after the unfused
    routing; the other paths read the offsets once on the host. Routing exactly the CPU's."""
    cpu_ops, dev_ops = ops
    r = rng(17)
    x, router = normal(r, tokens, hidden), normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 2 * ffn, hidden, scale=0.15), normal(r, experts, hidden, ffn, scale=0.15)
    expected_routing, *expected_ffn = cpu_ops.moe(x, router, w13, w2, k, dtype)
    paths = ["auto", "per_expert", "batched", "grouped"] if DEVICE == "cuda" else ["auto"]
    try:
        for path in paths:
            if DEVICE == "cuda":
                dev_ops.set_option("expert_gemm", path)
            routing, *ffn_out = dev_ops.moe(x, router, w13, w2, k, dtype)
            close(routing[0], expected_routing[0], "float32", rel_scale=10.0)  # logits
            assert_close(routing[2], expected_routing[2], 1e-4)  # routing weights
            for index in (1, 3, 4, 5, 6):  # ids, offsets, both row maps, the gathered rows
                np.testing.assert_array_equal(routing[index], expected_routing[index])
            for actual, expected in zip(ffn_out, expected_ffn):  # gate_up, act, out
                close(actual, expected, dtype, rel_scale=4.0)
    finally:
        if DEVICE == "cuda":
            dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts,k", [(1, 96, 8, 2), (8, 40, 13, 3), (9, 56, 8, 2)])
def test_add_rmsnorm_moe_equals_add_rmsnorm_then_moe(ops, dtype, tokens, hidden, experts, k):
    """The FFN half of a layer as one operation: for up to 8 tokens on the batched path the routing
    kernel does the norm first (one launch for norm, routing and both GEMMs' pointers)."""
    cpu_ops, dev_ops = ops
    r = rng(18)
    residual, delta = normal(r, tokens, hidden), normal(r, tokens, hidden)
    norm_weight = r.uniform(0.5, 1.5, hidden).astype(np.float32)
    router = normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 34, hidden, scale=0.15), normal(r, experts, hidden, 17, scale=0.15)
    args = (residual, delta, norm_weight, 1e-5, router, w13, w2, k, dtype)
    cpu = cpu_ops.add_rmsnorm_moe(*args)
    paths = ["auto", "per_expert"] if DEVICE == "cuda" else ["auto"]
    try:
        for path in paths:
            if DEVICE == "cuda":
                dev_ops.set_option("expert_gemm", path)
            dev = dev_ops.add_rmsnorm_moe(*args)
            close(dev[0], cpu[0], dtype)  # the residual stream after the add
            close(dev[1], cpu[1], dtype)  # its norm: the routing's input
            for index in (1, 3, 4, 5):  # ids, offsets, both row maps
                np.testing.assert_array_equal(dev[2][index], cpu[2][index])
            close(dev[2][6], cpu[2][6], dtype)  # the gathered rows of the norm
            for actual, expected in zip(dev[3:], cpu[3:]):  # gate_up, act, out
                close(actual, expected, dtype, rel_scale=4.0)
    finally:
        if DEVICE == "cuda":
            dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert,width", [([1, 0, 1, 0, 0], 203), ([0, 0, 2, 0, 0], 208),
                                                   ([9, 0, 3, 4, 0], 203), ([9, 0, 3, 4, 0], 208),
                                                   ([0, 17, 0, 0, 0], 203), ([40, 33, 0, 7, 57], 208)])
def test_fp8_expert_matmul(ops, dtype, rows_per_expert, width):
    """float8_e4m3 expert weights (the same quantized bytes and row scales on both sides): up to 16
    rows the hand-written kernel, 16 bytes per load when the width allows (208); more rows are
    dequantized in chunks for cuBLAS."""
    cpu_ops, dev_ops = ops
    r = rng(19)
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x, w = normal(r, int(offsets[-1]), width), normal(r, len(rows_per_expert), 117, width, scale=0.07)
    expected = cpu_ops.expert_matmul(x, w, offsets, dtype, dtype, "float8_e4m3")
    close(dev_ops.expert_matmul(x, w, offsets, dtype, dtype, "float8_e4m3"), expected, dtype, rel_scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_prefill_chunks_keep_the_gemm_output_aligned(ops, dtype):
    """FP8 experts past 16 rows are dequantized a chunk of output columns at a time for cuBLAS: a
    small scratch makes many chunks, each starting on a 16-byte boundary of the output rows (the
    emulator's cuBLAS refuses an operand off it whose rows are on it, as a slow path on a GPU)."""
    if DEVICE != "cuda":
        pytest.skip("a CUDA backend option")
    cpu_ops, dev_ops = ops
    r = rng(23)
    offsets = np.array([0, 19, 19, 40], dtype=np.int32)
    x, w = normal(r, 40, 208), normal(r, 3, 120, 208, scale=0.07)
    expected = cpu_ops.expert_matmul(x, w, offsets, dtype, dtype, "float8_e4m3")
    dev_ops.set_option("dequantize_chunk_bytes", "1024")  # 2 rows of bfloat16 weights: rounded up to 8
    try:
        close(dev_ops.expert_matmul(x, w, offsets, dtype, dtype, "float8_e4m3"), expected, dtype, rel_scale=4.0)
    finally:
        dev_ops.set_option("dequantize_chunk_bytes", str(64 << 20))


def test_fp8_expert_gemv_keeps_enough_warps_per_sm():
    """The decode FP8 kernel only streams weights: its registers (as nvcc compiles it for sm_90a)
    must leave 16 warps per SM for up to 2 rows and 12 for up to 16 (it had 201 to 240: 8)."""
    table = os.environ.get("MIXTRAL_EXT_KERNEL_RESOURCES")
    if not table:
        pytest.skip("no kernel resource table (tests/run_cuda_emulator.sh names nvcc's)")
    kernels = [line.split("\t") for line in open(table).read().splitlines() if "expert_gemv_fp8_kernel<" in line]
    assert len(kernels) == 12
    for registers, _, _, name in kernels:
        per_warp = (int(registers) * 32 + 255) // 256 * 256
        needed = 16 if ", 2>(" in name else 12
        assert 65536 // per_warp >= needed, f"{name}: {registers} registers leave {65536 // per_warp} warps per SM"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 8, 12])
def test_fp8_moe_and_add_rmsnorm_moe(ops, dtype, tokens):
    """A layer's experts in float8_e4m3: up to 8 tokens the fused routing kernel (with the norm) and
    the hand-written expert kernel, with no pointer arrays; 12 tokens the separate routing ops and
    dequantized weights for cuBLAS."""
    cpu_ops, dev_ops = ops
    r = rng(20)
    hidden, ffn, experts, k = 48, 29, 8, 2
    residual, delta = normal(r, tokens, hidden), normal(r, tokens, hidden)
    norm_weight = r.uniform(0.5, 1.5, hidden).astype(np.float32)
    router = normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 2 * ffn, hidden, scale=0.15), normal(r, experts, hidden, ffn, scale=0.15)
    args = (residual, delta, norm_weight, 1e-5, router, w13, w2, k, dtype, "float8_e4m3")
    cpu, dev = (o.add_rmsnorm_moe(*args) for o in ops)
    close(dev[0], cpu[0], dtype)
    close(dev[1], cpu[1], dtype)
    for index in (1, 3, 4, 5):  # ids, offsets, both row maps
        np.testing.assert_array_equal(dev[2][index], cpu[2][index])
    for actual, expected in zip(dev[3:], cpu[3:]):  # gate_up, act, out
        close(actual, expected, dtype, rel_scale=4.0)
    (cpu_routing, *cpu_ffn), (dev_routing, *dev_ffn) = (o.moe(residual, router, w13, w2, k, dtype, "float8_e4m3")
                                                        for o in ops)
    np.testing.assert_array_equal(dev_routing[3], cpu_routing[3])
    for actual, expected in zip(dev_ffn, cpu_ffn):
        close(actual, expected, dtype, rel_scale=4.0)


def sampling_params(**settings):
    params = _C.SamplingParams()
    for name, value in settings.items():
        setattr(params, name, value)
    return params


def sampler_state(seen, counts, step):
    return np.concatenate([seen, counts, [step]]).astype(np.int32)


def test_sample_greedy_penalties_logprobs_and_state_match(ops):
    r = rng(9)
    logits = normal(r, 32768, scale=3.0)
    state = sampler_state(r.random(32768) < 0.01, r.integers(0, 3, 32768), 41)
    params = sampling_params(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                             logprobs=5)
    cpu, dev = (o.sample(logits, params, 1, state) for o in ops)
    assert dev[0] == cpu[0]  # the token
    assert abs(dev[1] - cpu[1]) < 1e-4  # its logprob
    np.testing.assert_array_equal(dev[2], cpu[2])  # top ids
    assert_close(dev[3], cpu[3], 1e-5)
    np.testing.assert_array_equal(dev[4], cpu[4])  # seen, counts and the counter after
    assert dev[4][-1] == 42 and dev[4][32768 + dev[0]] == state[32768 + dev[0]] + 1


@pytest.mark.parametrize("settings", SAMPLING_SETTINGS)
def test_sample_distribution_matches_truncated_softmax(ops, settings):
    logits = SAMPLING_LOGITS
    expected, keep = truncated_softmax(logits, settings)
    zeros = np.zeros(len(logits), np.int32)
    n = SAMPLING_DRAWS
    draws = [ops[1].sample(logits, sampling_params(**settings), 77, sampler_state(zeros, zeros, step))[0]
             for step in range(n)]
    counts = np.bincount(draws, minlength=len(logits)) / n
    assert np.all(counts[~keep] == 0)
    assert np.max(np.abs(counts - expected)) < 0.03 * np.sqrt(3000 / n), (counts, expected)
    again = [ops[1].sample(logits, sampling_params(**settings), 77, sampler_state(zeros, zeros, step))[0]
             for step in range(50)]
    assert again == draws[:50]  # seeded: the same (seed, step) draws the same token


@pytest.mark.parametrize("settings", SAMPLING_SETTINGS)
def test_sample_draws_equal_the_cpu_draws(ops, settings):
    """Both samplers walk the kept tokens in id order: a (seed, step) draws the same token, except
    where its uniform falls within the device's rounding of a boundary of the cumulative mass (its
    expf differs by an ulp or two): then it draws the neighbouring kept token, rarely."""
    r = rng(10)
    logits = normal(r, 1000, scale=2.0)
    zeros = np.zeros(len(logits), np.int32)
    cpu, dev = ([o.sample(logits, sampling_params(**settings), 3, sampler_state(zeros, zeros, step))[0]
                 for step in range(100)] for o in ops)
    kept = np.flatnonzero(truncated_softmax(logits, settings)[1])
    differing = [(d, c) for d, c in zip(dev, cpu) if d != c]
    assert len(differing) <= 2, differing
    for d, c in differing:
        assert abs(int(np.searchsorted(kept, d)) - int(np.searchsorted(kept, c))) == 1, (d, c)


@pytest.mark.parametrize("settings", [dict(temperature=0.0, logprobs=3), dict(temperature=1.0, logprobs=3),
                                      dict(temperature=0.8, top_p=0.7), dict(temperature=1.0, top_k=5, min_p=0.1)])
def test_nan_and_infinite_logits_draw_as_on_the_cpu(ops, settings):
    """NaN logits are never drawn; -inf ones are never drawn unless all are, and then token 0 is."""
    logits = normal(rng(11), 97, scale=2.0)
    logits[::7], logits[3::11] = np.nan, -np.inf
    zeros = np.zeros(len(logits), np.int32)
    cpu, dev = ([o.sample(logits, sampling_params(**settings), 5, sampler_state(zeros, zeros, step))
                 for step in range(20)] for o in ops)
    assert [d[0] for d in dev] == [c[0] for c in cpu]
    assert all(np.isfinite(logits[d[0]]) for d in dev)
    hopeless = np.full(33, -np.inf, np.float32)
    draws = [o.sample(hopeless, sampling_params(**settings), 5, sampler_state(zeros[:33], zeros[:33], 0)) for o in ops]
    assert [d[0] for d in draws] == [0, 0]
    if settings.get("logprobs"):
        assert [list(d[2]) for d in draws] == [[0, 1, 2], [0, 1, 2]]


def test_bad_option_is_an_error(ops):
    with pytest.raises(mixtral_ext.MixtralError, match="option"):
        ops[1].set_option("no_such_option", "1")


# ---- the engine -------------------------------------------------------------------------

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


def test_device_out_of_memory_is_an_exception(tiny_dir, device_engines):
    with pytest.raises(mixtral_ext.DeviceOutOfMemoryError, match="out of memory"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, device=DEVICE, max_context=256, kv_cache_tokens=2**31 - 1)
    assert device_engines["float32"].logits([1, 2, 3]).shape == (3, 101)
