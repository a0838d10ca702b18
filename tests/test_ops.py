"""One test per operation of csrc/core/backend.h, in the header's order: the operations (fill_uniform,
embedding, add_rmsnorm, matmul, rope_kv_append, attention, router_topk, moe_permute, moe_gather,
expert_matmul, silu_mul, moe_unpermute, sample), then the fusions (rope_attention, route, moe,
add_rmsnorm_moe, moe_unpermute_add_rmsnorm), each called alone through mixtral_ext._C.Ops on random
inputs of odd sizes in float32, bfloat16 and float16 (every output buffer has guard bytes, checked
after the op). Each test takes a device:

- "cpu": the CPU twin against a reference written here in numpy or torch, with transformers' own
  pieces where it has them (RMSNorm, rotate-half RoPE, repeat_kv before torch's scaled-dot-product
  attention), on the same rounded inputs;
- "cuda" (marked cuda): the device against the CPU twin; integer outputs (expert ids, offsets, row
  maps) and copies must be equal, float ones within REL of the largest (device_helpers.py).

A fusion is held to its operations run one after another on the same backend (its default body),
and on "cuda" to the CPU too. The checks tied to one op (the attention's register limit, the expert
GEMM paths, FP8 and int4 experts, the sampler's draws) follow its test, marked cuda. (The CPU's FP8
expert GEMM and its sampler's draws are held to numpy in test_fp8.py and test_generation.py; its int4
GEMM to numpy here.) The engine on
the device: test_cuda_engine.py.

    python -m pytest -q tests/test_ops.py          # the CPU cases; the cuda ones skip without a GPU
    bash tests/run_cuda_emulator.sh                # the cuda cases on the CUDA emulator, without a GPU

MIXTRAL_EXT_TEST_DEVICE=cpu puts the CPU backend in the device's place (device_helpers.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SAMPLING_LOGITS, SAMPLING_SETTINGS, assert_close, torch, truncated_softmax, uniform01
from device_helpers import DEVICE, DEVICES, DTYPES, EMULATED, close, normal, rng
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm, apply_rotary_pos_emb, repeat_kv

import mixtral_ext
from mixtral_ext import _C

# The emulator runs a kernel's threads one after another: the longest tests shrink there.
SAMPLING_DRAWS = 600 if EMULATED else 3000


@pytest.fixture(scope="module")
def cpu_twin():
    return _C.Ops("cpu")


@pytest.fixture
def backends(request, device, cpu_twin):
    """(the CPU twin, the backend under test): for "cpu" the twin itself, held to a reference; for
    "cuda" the device (the `ops` fixture: skipped without one), held to the twin."""
    if device == "cpu":
        return cpu_twin, cpu_twin
    return request.getfixturevalue("ops")


def rounded(a, dtype: str) -> np.ndarray:
    """a as an op reads it: rounded to dtype (to nearest even), widened back to float32."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    return a


def f64(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def ulp(a, dtype: str) -> np.ndarray:
    """The spacing of dtype's values at |a|."""
    a = np.abs(np.asarray(a, dtype=np.float32))
    if dtype == "float16":
        return np.spacing(a.astype(np.float16)).astype(np.float32)
    return np.spacing(a) * (2.0**16 if dtype == "bfloat16" else 1.0)


def permutation_of(ids: np.ndarray, experts: int):
    """moe_permute's contract in numpy: the expanded rows grouped by expert, stable."""
    flat = ids.reshape(-1)
    permuted_to_expanded = np.argsort(flat, kind="stable").astype(np.int32)
    expanded_to_permuted = np.argsort(permuted_to_expanded).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=experts))]).astype(np.int32)
    return offsets, permuted_to_expanded, expanded_to_permuted


def expert_product(x: np.ndarray, w: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """out[rows of e] = x[rows of e] @ w[e]^T in float64."""
    out = np.zeros((x.shape[0], w.shape[1]))
    for e in range(w.shape[0]):
        out[offsets[e]:offsets[e + 1]] = x[offsets[e]:offsets[e + 1]].astype(np.float64) @ w[e].T.astype(np.float64)
    return out


# ==== the operations =================================================================================


def uniform_fill(shape, seed: int, low: float, high: float) -> np.ndarray:
    """core/random.h's uniform_in for every element: low + (high - low) * uniform01(seed, i) in float64
    (low and high as float32 values), rounded once to float32."""
    u = uniform01(seed, np.arange(int(np.prod(shape)), dtype=np.uint64))
    low64, high64 = np.float64(np.float32(low)), np.float64(np.float32(high))
    return (low64 + (high64 - low64) * u).astype(np.float32).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,seed,low,high", [((5, 331), 7, -0.75, 1.25), ((3, 4, 5, 7), 2**64 - 3, -3.0, -1.5),
                                                 ((2, 37), 2**63 + 12345, 0.01, 0.02)])
@pytest.mark.parametrize("device", DEVICES)
def test_fill_uniform(backends, device, dtype, shape, seed, low, high):
    """Exact on the CPU; on the device within an ulp (nvcc may fuse the multiply-add; in double, a
    float differs in about one value of 2^29)."""
    cpu_ops, dev_ops = backends
    cpu = cpu_ops.fill_uniform(list(shape), seed, low, high, dtype)
    bounds = rounded([low, high], dtype)  # [low, high) in float32, closed once rounded to dtype
    assert cpu.shape == shape and bounds[0] <= cpu.min() and cpu.max() <= bounds[1]
    if device == "cpu":
        np.testing.assert_array_equal(cpu, rounded(uniform_fill(shape, seed, low, high), dtype))
    else:
        dev = dev_ops.fill_uniform(list(shape), seed, low, high, dtype)
        assert np.all(np.abs(dev - cpu) <= ulp(cpu, dtype)), np.max(np.abs(dev - cpu) / ulp(cpu, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_embedding(backends, device, dtype):
    cpu_ops, dev_ops = backends
    r = rng(1)
    table, ids = normal(r, 301, 67), r.integers(0, 301, size=13).astype(np.int32)
    cpu = cpu_ops.embedding(table, ids, dtype)
    expected = rounded(table, dtype)[ids] if device == "cpu" else dev_ops.embedding(table, ids, dtype)
    np.testing.assert_array_equal(expected, cpu)  # a copy: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rmsnorm(backends, device, dtype, with_delta):
    cpu_ops, dev_ops = backends
    r = rng(2)
    residual, delta, weight = normal(r, 11, 1031), normal(r, 11, 1031), r.uniform(0.5, 1.5, 1031).astype(np.float32)
    cpu_res, cpu_out = cpu_ops.add_rmsnorm(residual, delta if with_delta else None, weight, 1e-5, dtype)
    if device == "cpu":
        res = rounded(residual, dtype)
        if with_delta:
            res = rounded(res + rounded(delta, dtype), dtype)  # the float32 sum, rounded once
        norm = MixtralRMSNorm(1031, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(rounded(weight, dtype)))
            expected = norm(torch.from_numpy(res)).numpy()
        np.testing.assert_array_equal(cpu_res, res)
        close(cpu_out, expected, dtype)
    else:
        dev_res, dev_out = dev_ops.add_rmsnorm(residual, delta if with_delta else None, weight, 1e-5, dtype)
        np.testing.assert_array_equal(dev_res, cpu_res)  # one rounded add: exact
        close(dev_out, cpu_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", ["same", "float32"])
@pytest.mark.parametrize("m", [1, 5, 77])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul(backends, device, dtype, out_dtype, m):
    cpu_ops, dev_ops = backends
    r = rng(3)
    x, w = normal(r, m, 333), normal(r, 129, 333, scale=0.05)
    out_dtype = dtype if out_dtype == "same" else out_dtype
    cpu = cpu_ops.matmul(x, w, dtype, out_dtype)
    if device == "cpu":
        close(cpu, rounded(x, dtype).astype(np.float64) @ rounded(w, dtype).T.astype(np.float64), out_dtype,
              rel_scale=4.0)
    else:
        close(dev_ops.matmul(x, w, dtype, out_dtype), cpu, out_dtype, rel_scale=4.0)


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


def rope_reference(qkv, heads, kv_heads, head_dim, positions, theta, k_pool, v_pool, table, dtype):
    """transformers' apply_rotary_pos_emb (rotate-half) of q and k, in float64 at the angles the
    engine takes (float32 position times inv_freq = theta^(-2i/D) rounded to float32), the rotated
    k and the v of each token written to the cache slot of its position. Returns (qkv, k_pool,
    v_pool) rounded to dtype."""
    tokens, page_size, half = len(positions), k_pool.shape[2], head_dim // 2
    qkv, k_pool, v_pool = rounded(qkv, dtype), rounded(k_pool, dtype).copy(), rounded(v_pool, dtype).copy()
    inv_freq = (1.0 / theta ** (np.arange(half) * 2.0 / head_dim)).astype(np.float32)
    angles = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos, sin = (f64(np.concatenate([f(angles), f(angles)], axis=1))[None] for f in (np.cos, np.sin))
    q = f64(qkv[:, :heads * head_dim]).reshape(tokens, heads, head_dim).transpose(0, 1)[None]
    k = f64(qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]).reshape(tokens, kv_heads, head_dim).transpose(0, 1)
    q, k = apply_rotary_pos_emb(q, k[None], cos, sin)
    rotated = qkv.copy()
    rotated[:, :heads * head_dim] = q[0].transpose(0, 1).reshape(tokens, -1).numpy()
    rotated[:, heads * head_dim:(heads + kv_heads) * head_dim] = k[0].transpose(0, 1).reshape(tokens, -1).numpy()
    rotated = rounded(rotated, dtype)
    for t, position in enumerate(positions):
        page, row = table[position // page_size], position % page_size
        cached = rotated[t, heads * head_dim:].reshape(2, kv_heads, head_dim)
        k_pool[page, :, row], v_pool[page, :, row] = cached[0], cached[1]
    return rotated, k_pool, v_pool


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 10), (8, 8, 16), (12, 1, 64), (6, 3, 128)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope_kv_append(backends, device, dtype, heads, kv_heads, head_dim):
    cpu_ops, dev_ops = backends
    r = rng(4)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, 37, 9, heads, kv_heads, head_dim, page_size=5)
    positions[-1] = 70000  # a long-context angle; its page is the last of the table
    table = np.concatenate([table, np.full(70000 // 5 + 1 - len(table), table[0], np.int32)])
    args = (qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool, table, dtype)
    cpu = cpu_ops.rope_kv_append(*args)
    expected = rope_reference(*args) if device == "cpu" else dev_ops.rope_kv_append(*args)
    for c, e in zip(cpu, expected):  # qkv, then both pools with the tokens' rows written
        close(e, c, dtype, rel_scale=2.0)


def attention_reference(qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, table, dtype):
    """Scaled-dot-product attention in float64 (torch), token t's query heads over cache positions
    [0, positions[t]] gathered through the page table, each KV head repeated for its group of
    query heads (transformers' repeat_kv)."""
    tokens, page_size = len(positions), k_pool.shape[2]
    slots = np.arange(positions.max() + 1)
    pages, rows = table[slots // page_size], slots % page_size
    k, v = (f64(rounded(pool, dtype)[pages, :, rows]).transpose(0, 1)[None] for pool in (k_pool, v_pool))
    q = f64(rounded(qkv, dtype)[:, :heads * head_dim]).reshape(tokens, heads, head_dim).transpose(0, 1)[None]
    mask = torch.from_numpy(slots[None, :] <= positions[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, heads // kv_heads),
                                                           repeat_kv(v, heads // kv_heads), attn_mask=mask)
    return out[0].transpose(0, 1).reshape(tokens, heads * head_dim).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size", [(6, 2, 10, 5), (8, 8, 16, 16), (12, 1, 64, 7),
                                                               (6, 3, 128, 16), (12, 2, 128, 16), (4, 2, 256, 3)])
@pytest.mark.parametrize("before,tokens,spare", [(0, 1, 0), (0, 19, 0), (45, 1, 0), (100, 33, 0), (37, 150, 0),
                                                 (700, 1, 0), (520, 70, 0), (1999, 3, 40), (8190, 2, 0),
                                                 (9000, 1, 0)]
                         + ([] if EMULATED else [(5000, 300, 0)]))
@pytest.mark.parametrize("device", DEVICES)
def test_attention(backends, device, dtype, heads, kv_heads, head_dim, page_size, before, tokens, spare):
    """Short caches take one block per (token, KV head); past 256 positions few tokens split the
    cache (flash-decoding) into at most 64 splits of at least 128 positions (longer past 8192),
    including splits past the end of the context (spare pages); more tokens in bfloat16/float16
    with head_dim 64 or 128 run on the tensor cores (blocks of 64 (token, head) rows, tiles of 64
    positions: these lengths cross both, and pages)."""
    cpu_ops, dev_ops = backends
    r = rng(5)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, before, tokens, heads, kv_heads, head_dim, page_size,
                                                        dtype_pages=(before + tokens) // page_size + spare + 9,
                                                        spare_pages=spare)
    args = (qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, table, dtype)
    cpu = cpu_ops.attention(*args)
    if device == "cpu":
        close(cpu, attention_reference(*args), dtype, rel_scale=2.0)
        return
    # On the GPU both kernels: "auto" sends prefill in half precision (head_dim 64, 128) to the tensor cores.
    try:
        for mode in ("auto", "simple") if DEVICE == "cuda" else ("auto",):
            if DEVICE == "cuda":
                dev_ops.set_option("attention", mode)
            close(dev_ops.attention(*args), cpu, dtype, rel_scale=2.0)
    finally:
        if DEVICE == "cuda":
            dev_ops.set_option("attention", "auto")


@pytest.mark.cuda
def test_attention_group_past_the_registers_is_a_shape_error(ops):
    """32 query heads per KV head would be a block of 1024 threads, more than the decode kernel's
    registers allow (672 at 94 per thread on sm_90a): a ShapeError before the launch, and the
    backend stays usable."""
    if DEVICE != "cuda":
        pytest.skip("a limit of the CUDA kernel")
    r = rng(29)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, 20, 1, 32, 1, 128, 16)
    with pytest.raises(mixtral_ext.ShapeError, match="registers per thread allow"):
        ops[1].attention(qkv, 32, 1, 128, positions, k_pool, v_pool, table, "float32")
    qkv, positions, k_pool, v_pool, table = paged_setup(r, 20, 1, 6, 1, 128, 16)
    close(ops[1].attention(qkv, 6, 1, 128, positions, k_pool, v_pool, table, "float32"),
          ops[0].attention(qkv, 6, 1, 128, positions, k_pool, v_pool, table, "float32"), "float32", rel_scale=2.0)


@pytest.mark.parametrize("experts,k", [(8, 2), (5, 1), (13, 4)])
@pytest.mark.parametrize("device", DEVICES)
def test_router_topk(backends, device, experts, k):
    """On the CPU against the steps of transformers' Mixtral router, in torch: softmax over the
    experts (float64), top-k, renormalised over the k."""
    cpu_ops, dev_ops = backends
    logits = normal(rng(6), 37, experts, scale=2.0)
    cpu_ids, cpu_w = cpu_ops.router_topk(logits, k)
    if device == "cpu":
        weights, ids = torch.topk(torch.softmax(f64(logits), dim=-1), k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        expected_ids, expected_w = ids.numpy(), weights.numpy()
    else:
        expected_ids, expected_w = dev_ops.router_topk(logits, k)
    np.testing.assert_array_equal(expected_ids, cpu_ids)
    assert_close(expected_w, cpu_w, 1e-6)


@pytest.mark.parametrize("experts,k", [(8, 2), (5, 1), (13, 4)])
@pytest.mark.parametrize("device", DEVICES)
def test_moe_permute(backends, device, experts, k):
    """Random expert ids, then skewed ones (empty and crowded experts), then past 48 KiB of ids (the
    GPU kernel reads them from global memory instead of a shared copy): offsets and row maps exact."""
    cpu_ops, dev_ops = backends
    r = rng(6)
    ids = r.integers(0, experts, size=(37, k)).astype(np.int32)
    skewed = np.where(r.random(ids.shape) < 0.7, 0, ids).astype(np.int32)
    many = r.integers(0, experts, size=(12289 // k + 1, k)).astype(np.int32)
    for case in (ids, skewed, many):
        cpu = cpu_ops.moe_permute(case, experts)
        expected = permutation_of(case, experts) if device == "cpu" else dev_ops.moe_permute(case, experts)
        for c, e in zip(cpu, expected):
            np.testing.assert_array_equal(e, c)


def expanded_rows(r, tokens=19, k=2, experts=6):
    """The row maps of a random routing (permutation_of)."""
    return permutation_of(r.integers(0, experts, size=(tokens, k)).astype(np.int32), experts)[1:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [93, 96])  # single elements; 16 bytes at a time on the GPU
@pytest.mark.parametrize("device", DEVICES)
def test_moe_gather(backends, device, dtype, hidden):
    cpu_ops, dev_ops = backends
    r = rng(7)
    tokens, k = 19, 2
    p2e, _ = expanded_rows(r, tokens, k)
    x = normal(r, tokens, hidden)
    cpu = cpu_ops.moe_gather(x, p2e, k, dtype)
    expected = rounded(x, dtype)[p2e // k] if device == "cpu" else dev_ops.moe_gather(x, p2e, k, dtype)
    np.testing.assert_array_equal(expected, cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert", [[1, 0, 1, 0, 0], [0, 0, 2, 0, 0], [9, 0, 31, 4, 1], [40, 33, 0, 7, 57]])
@pytest.mark.parametrize("device", DEVICES)
def test_expert_matmul(backends, device, dtype, rows_per_expert):
    """The default ("auto") expert GEMM path; the others in the next test."""
    cpu_ops, dev_ops = backends
    r = rng(8)
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x, w = normal(r, int(offsets[-1]), 203), normal(r, len(rows_per_expert), 117, 203, scale=0.07)
    cpu = cpu_ops.expert_matmul(x, w, offsets, dtype, dtype)
    if device == "cpu":
        close(cpu, expert_product(rounded(x, dtype), rounded(w, dtype), offsets), dtype, rel_scale=4.0)
    else:
        close(dev_ops.expert_matmul(x, w, offsets, dtype, dtype), cpu, dtype, rel_scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert", [[1, 0, 1, 0, 0], [0, 0, 2, 0, 0], [9, 0, 31, 4, 1], [40, 33, 0, 7, 57]])
def test_expert_matmul_three_paths(ops, dtype, rows_per_expert):
    """Each expert GEMM path the "auto" choice may take on the GPU: one cuBLAS GEMM per expert, one
    batched GEMM over pointer arrays, cuBLAS' grouped GEMM."""
    cpu_ops, dev_ops = ops
    r = rng(8)
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x, w = normal(r, int(offsets[-1]), 203), normal(r, len(rows_per_expert), 117, 203, scale=0.07)
    expected = cpu_ops.expert_matmul(x, w, offsets, dtype, dtype)
    try:
        for path in ["per_expert", "batched", "grouped"] if DEVICE == "cuda" else ["auto"]:
            if DEVICE == "cuda":
                dev_ops.set_option("expert_gemm", path)
            close(dev_ops.expert_matmul(x, w, offsets, dtype, dtype), expected, dtype, rel_scale=4.0)
    finally:
        if DEVICE == "cuda":
            dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.cuda
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


@pytest.mark.cuda
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


def int4_parts(r, experts: int, rows: int, width: int, group_size: int, segments: int):
    """Random int4 expert weights by their parts (csrc/core/int4.h): codes [E, N, K] 0..15, scales
    (float16 values) and zeros 0..16 [E, N, groups], and with act order (segments > 0) a shuffled
    column order per expert and row segment [E, segments, K], else None. packed(codes) gives the
    codes as the op takes them."""
    groups = -(-width // group_size)
    codes = r.integers(0, 16, (experts, rows, width)).astype(np.int32)
    scales = r.uniform(0.005, 0.03, (experts, rows, groups)).astype(np.float16).astype(np.float32)
    zeros = r.integers(0, 17, (experts, rows, groups)).astype(np.float32)
    order = None
    if segments:
        order = np.stack([[r.permutation(width) for _ in range(segments)] for _ in range(experts)]).astype(np.int32)
    return codes, scales, zeros, order


def packed(codes: np.ndarray) -> np.ndarray:
    """Codes [..., K] two a byte along K, the lower column in the low nibble (csrc/core/int4.h)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def int4_expert_product(x, codes, scales, zeros, order, group_size, offsets) -> np.ndarray:
    """The int4 expert_matmul contract (csrc/core/backend.h) in float64: per expert and row segment,
    x's columns in the segment's order times (code - zero) * scale of each column's group."""
    experts, rows, width = codes.shape
    group = np.arange(width) // group_size
    weights = (codes - zeros[:, :, group]) * scales[:, :, group]
    segments = 1 if order is None else order.shape[1]
    out = np.zeros((x.shape[0], rows))
    for e in range(experts):
        for s in range(segments):
            columns = np.arange(width) if order is None else order[e, s]
            band = slice(s * rows // segments, (s + 1) * rows // segments)
            out[offsets[e]:offsets[e + 1], band] = (x[offsets[e]:offsets[e + 1]][:, columns].astype(np.float64)
                                                    @ weights[e, band].T.astype(np.float64))
    return out.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert,width,group_size,segments", [
    ([1, 0, 1, 0, 0], 224, 32, 0),       # decode, 16 bytes a load, one group a load
    ([1, 0, 1, 0, 0], 224, 32, 2),       # act order: w1's and w3's rows in their own column orders
    ([0, 0, 2, 0, 0], 210, 7, 0),        # odd groups: a byte's two codes in two groups (byte loads)
    ([9, 0, 3, 4, 0], 256, 128, 2),      # up to 16 rows
    ([9, 0, 3, 4, 0], 210, 30, 1),
    ([0, 17, 0, 0, 0], 224, 224, 0),     # one group a row (channel); 17 rows: dequantized for cuBLAS
    ([40, 33, 0, 7, 57], 256, 64, 2),
    ([40, 33, 0, 7, 57], 210, 7, 1)])
@pytest.mark.parametrize("device", DEVICES)
def test_int4_expert_matmul(backends, device, dtype, rows_per_expert, width, group_size, segments):
    """int4 expert weights given by their parts (the same codes, float16 scales, zeros and column
    orders on both sides), 118 output columns: up to 16 rows the hand-written kernel (16 bytes a load
    when the width and the groups are multiples of 32), more dequantized in chunks for cuBLAS."""
    cpu_ops, dev_ops = backends
    r = rng(29)
    offsets = np.concatenate([[0], np.cumsum(rows_per_expert)]).astype(np.int32)
    x = normal(r, int(offsets[-1]), width)
    codes, scales, zeros, order = int4_parts(r, len(rows_per_expert), 118, width, group_size, segments)
    cpu = cpu_ops.expert_matmul_int4(x, packed(codes), scales, zeros, order, group_size, offsets, dtype)
    if device == "cpu":
        close(cpu, int4_expert_product(rounded(x, dtype), codes, scales, zeros, order, group_size, offsets), dtype,
              rel_scale=4.0)
    else:
        close(dev_ops.expert_matmul_int4(x, packed(codes), scales, zeros, order, group_size, offsets, dtype), cpu,
              dtype, rel_scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_prefill_chunks_stay_in_their_segments(ops, dtype):
    """int4 experts past 16 rows with act order, dequantized two rows at a time for cuBLAS: every
    chunk lies in one row segment and multiplies x in that segment's column order."""
    if DEVICE != "cuda":
        pytest.skip("a CUDA backend option")
    cpu_ops, dev_ops = ops
    r = rng(31)
    offsets = np.array([0, 19, 19, 40], dtype=np.int32)
    x = normal(r, 40, 96)
    codes, scales, zeros, order = int4_parts(r, 3, 32, 96, 32, 2)  # segments of 16 rows: aligned chunks
    expected = cpu_ops.expert_matmul_int4(x, packed(codes), scales, zeros, order, 32, offsets, dtype)
    dev_ops.set_option("dequantize_chunk_bytes", "1024")
    try:
        close(dev_ops.expert_matmul_int4(x, packed(codes), scales, zeros, order, 32, offsets, dtype), expected,
              dtype, rel_scale=4.0)
    finally:
        dev_ops.set_option("dequantize_chunk_bytes", str(64 << 20))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["expert_gemv_fp8_kernel", "expert_gemv_int4_kernel"])
def test_quantized_expert_gemvs_keep_enough_warps_per_sm(kernel):
    """The decode FP8 and int4 kernels only stream weights: their registers (as nvcc compiles them for
    sm_90a) must leave 16 warps per SM for up to 2 rows and 12 for up to 16 (the FP8 one had 201 to
    240: 8)."""
    table = os.environ.get("MIXTRAL_EXT_KERNEL_RESOURCES")
    if not table:
        pytest.skip("no kernel resource table (tests/run_cuda_emulator.sh names nvcc's)")
    kernels = [line.split("\t") for line in open(table).read().splitlines() if f"{kernel}<" in line]
    assert len(kernels) == 12  # 3 dtypes x (2 load widths x 2 row bounds)
    for registers, _, _, name in kernels:
        per_warp = (int(registers) * 32 + 255) // 256 * 256
        needed = 16 if ", 2>(" in name else 12
        assert 65536 // per_warp >= needed, f"{name}: {registers} registers leave {65536 // per_warp} warps per SM"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ffn", [71, 40])  # single elements; 16 bytes at a time on the GPU
@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(backends, device, dtype, ffn):
    cpu_ops, dev_ops = backends
    gate_up = normal(rng(7), 38, 2 * ffn)
    cpu = cpu_ops.silu_mul(gate_up, dtype)
    if device == "cpu":
        g = f64(rounded(gate_up, dtype))
        close(cpu, (torch.nn.functional.silu(g[:, :ffn]) * g[:, ffn:]).numpy(), dtype)
    else:
        close(dev_ops.silu_mul(gate_up, dtype), cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [93, 96])  # single elements; 16 bytes at a time on the GPU
@pytest.mark.parametrize("first", [0, 16])  # all 19 tokens, or the last 3 of y's (R' > R)
@pytest.mark.parametrize("device", DEVICES)
def test_moe_unpermute(backends, device, dtype, hidden, first):
    cpu_ops, dev_ops = backends
    r = rng(7)
    tokens, k = 19, 2
    _, e2p = expanded_rows(r, tokens, k)
    y, weights = normal(r, tokens * k, hidden), r.dirichlet(np.ones(k), size=tokens).astype(np.float32)
    e2p, weights = e2p[first * k:], weights[first:]
    cpu = cpu_ops.moe_unpermute(y, e2p, weights, dtype)
    if device == "cpu":
        rows = rounded(y, dtype).astype(np.float64)[e2p].reshape(len(weights), k, hidden)
        close(cpu, np.einsum("tj,tjh->th", weights.astype(np.float64), rows), dtype)
    else:
        close(dev_ops.moe_unpermute(y, e2p, weights, dtype), cpu, dtype)


def sampling_params(**settings):
    params = _C.SamplingParams()
    for name, value in settings.items():
        setattr(params, name, value)
    return params


def sampler_state(seen, counts, step):
    return np.concatenate([seen, counts, [step]]).astype(np.int32)


def greedy_reference(logits, settings, state):
    """core/sampling.h at temperature 0 in numpy: the penalties in float32 (repetition over seen
    tokens, presence and frequency over output ones), the argmax (ties to the lower id), log-softmax
    of the raw logits; the state after records the token and counts the step."""
    vocab = len(logits)
    seen, counts = state[:vocab], state[vocab:2 * vocab]
    penalty = np.float32(settings["repetition_penalty"])
    penalized = np.where(seen != 0, np.where(logits > 0, logits / penalty, logits * penalty), logits)
    output_penalty = np.float32(settings["presence_penalty"]) + np.float32(settings["frequency_penalty"]) * counts
    penalized = np.where(counts > 0, penalized - output_penalty.astype(np.float32), penalized)
    token = int(np.argmax(penalized))
    logprobs = logits - np.max(logits.astype(np.float64))
    logprobs -= np.log(np.sum(np.exp(logprobs)))
    top = np.argsort(-logprobs, kind="stable")[:settings["logprobs"]].astype(np.int32)
    after = state.copy()
    after[token], after[vocab + token], after[-1] = 1, after[vocab + token] + 1, after[-1] + 1
    return token, logprobs[token], top, logprobs[top], after


@pytest.mark.parametrize("device", DEVICES)
def test_sample(backends, device):
    """Greedy with all three penalties and top logprobs: the token, its logprob, the top ids and
    logprobs, and the state after (seen, counts and the draw counter, updated by the op)."""
    cpu_ops, dev_ops = backends
    r = rng(9)
    logits = normal(r, 32768, scale=3.0)
    state = sampler_state(r.random(32768) < 0.01, r.integers(0, 3, 32768), 41)
    settings = dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logprobs=5)
    cpu = cpu_ops.sample(logits, sampling_params(**settings), 1, state)
    expected = greedy_reference(logits, settings, state) if device == "cpu" else \
        dev_ops.sample(logits, sampling_params(**settings), 1, state)
    assert expected[0] == cpu[0]  # the token
    assert abs(expected[1] - cpu[1]) < 1e-4  # its logprob
    np.testing.assert_array_equal(expected[2], cpu[2])  # top ids
    assert_close(expected[3], cpu[3], 1e-5)
    np.testing.assert_array_equal(expected[4], cpu[4])  # seen, counts and the counter after
    assert cpu[4][-1] == 42 and cpu[4][32768 + cpu[0]] == state[32768 + cpu[0]] + 1


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
def test_bad_option_is_an_error(ops):
    with pytest.raises(mixtral_ext.MixtralError, match="option"):
        ops[1].set_option("no_such_option", "1")


# ==== the fusions: each against its operations run in turn on the same backend (its default body) ====


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size", [(6, 2, 10, 5), (12, 1, 64, 7), (12, 2, 128, 16)])
@pytest.mark.parametrize("before,tokens,spare", [(0, 1, 0), (45, 1, 0), (700, 1, 40), (9000, 1, 0), (100, 3, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_rope_attention(backends, device, dtype, heads, kv_heads, head_dim, page_size, before, tokens, spare):
    """rope_kv_append, then attention. For one token (decode) the GPU rotates q as it reads it and the
    block holding the token's position writes its k and v into the cache and uses them in place of
    that row (with and without splits); more tokens run the two operations."""
    cpu_ops, dev_ops = backends
    r = rng(19)
    qkv, positions, k_pool, v_pool, table = paged_setup(r, before, tokens, heads, kv_heads, head_dim, page_size,
                                                        dtype_pages=(before + tokens) // page_size + spare + 9,
                                                        spare_pages=spare)
    fused = dev_ops.rope_attention(qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool, table, dtype)
    rotated, k_after, v_after = dev_ops.rope_kv_append(qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool,
                                                       table, dtype)
    expected = [(dev_ops.attention(rotated, heads, kv_heads, head_dim, positions, k_after, v_after, table, dtype),
                 k_after, v_after)]
    if device == "cuda":
        expected.append(cpu_ops.rope_attention(qkv, heads, kv_heads, head_dim, positions, 1e6, k_pool, v_pool, table,
                                               dtype))
    for wanted in expected:
        for actual, value in zip(fused, wanted):  # the output, then both pools with the token's rows written
            close(actual, value, dtype, rel_scale=2.0)


def assert_routing_equal(actual, expected, dtype, exact_gathered=True):
    """Two routings (logits, ids, weights, offsets, both row maps, the gathered rows): integer
    outputs equal, logits as float32 sums in another order."""
    close(actual[0], expected[0], "float32", rel_scale=10.0)
    assert_close(actual[2], expected[2], 1e-4)  # routing weights
    for index in (1, 3, 4, 5):  # ids, offsets, both row maps
        np.testing.assert_array_equal(actual[index], expected[index])
    if exact_gathered:
        np.testing.assert_array_equal(actual[6], expected[6])
    else:  # the gathered rows of a norm computed in another place
        close(actual[6], expected[6], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts,k", [(1, 96, 8, 2), (3, 37, 5, 1), (8, 200, 13, 4), (8, 64, 32, 3),
                                                     (9, 40, 8, 2)])
@pytest.mark.parametrize("device", DEVICES)
def test_route(backends, device, dtype, tokens, hidden, experts, k):
    """matmul into float32 logits, router_topk, moe_permute, moe_gather: fused into one kernel on the
    GPU for up to 8 tokens and 32 experts (16-byte loads when the hidden size allows, else single
    elements), the four operations beyond; expert ids, offsets, row maps and the gathered rows exact."""
    cpu_ops, dev_ops = backends
    r = rng(16)
    x, router = normal(r, tokens, hidden), normal(r, experts, hidden, scale=0.5)
    fused = dev_ops.route(x, router, k, dtype)
    logits = dev_ops.matmul(x, router, dtype, "float32")
    ids, weights = dev_ops.router_topk(logits, k)
    offsets, p2e, e2p = dev_ops.moe_permute(ids, experts)
    assert_routing_equal(fused, (logits, ids, weights, offsets, p2e, e2p, dev_ops.moe_gather(x, p2e, k, dtype)), dtype)
    if device == "cuda":
        assert_routing_equal(fused, cpu_ops.route(x, router, k, dtype), dtype)


def moe_unfused(ops, x, router, w13, w2, k, dtype, expert_dtype=""):
    """Backend::moe's default body: route, expert_matmul by w13, silu_mul, expert_matmul by w2."""
    routing = ops.route(x, router, k, dtype)
    gate_up = ops.expert_matmul(routing[6], w13, routing[3], dtype, dtype, expert_dtype)
    act = ops.silu_mul(gate_up, dtype)
    return routing, gate_up, act, ops.expert_matmul(act, w2, routing[3], dtype, dtype, expert_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,ffn,experts,k", [(1, 96, 40, 8, 2), (5, 37, 23, 5, 1), (8, 64, 30, 13, 4),
                                                         (9, 40, 17, 8, 2), (23, 48, 29, 6, 2)])
@pytest.mark.parametrize("device", DEVICES)
def test_moe(backends, device, dtype, tokens, hidden, ffn, experts, k):
    """route, then the expert FFN (expert_matmul, silu_mul, expert_matmul), on every expert GEMM path:
    on the batched path the routing kernel writes both GEMMs' pointer arrays (up to 8 tokens), or one
    launch does after the unfused routing; the other paths read the offsets once on the host.
    Routing exactly the unfused one's and the CPU's."""
    cpu_ops, dev_ops = backends
    r = rng(17)
    x, router = normal(r, tokens, hidden), normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 2 * ffn, hidden, scale=0.15), normal(r, experts, hidden, ffn, scale=0.15)
    cpu = [cpu_ops.moe(x, router, w13, w2, k, dtype)] if device == "cuda" else []
    on_gpu = device == "cuda" and DEVICE == "cuda"
    try:
        for path in ["auto", "per_expert", "batched", "grouped"] if on_gpu else ["auto"]:
            if on_gpu:
                dev_ops.set_option("expert_gemm", path)
            fused = dev_ops.moe(x, router, w13, w2, k, dtype)
            for expected in [moe_unfused(dev_ops, x, router, w13, w2, k, dtype)] + cpu:
                assert_routing_equal(fused[0], expected[0], dtype)
                for actual, wanted in zip(fused[1:], expected[1:]):  # gate_up, act, out
                    close(actual, wanted, dtype, rel_scale=4.0)
    finally:
        if on_gpu:
            dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,experts,k", [(1, 96, 8, 2), (8, 40, 13, 3), (9, 56, 8, 2)])
@pytest.mark.parametrize("device", DEVICES)
def test_add_rmsnorm_moe(backends, device, dtype, tokens, hidden, experts, k):
    """add_rmsnorm, then moe: for up to 8 tokens on the batched path the GPU's routing kernel does the
    norm first (one launch for norm, routing and both GEMMs' pointers)."""
    cpu_ops, dev_ops = backends
    r = rng(18)
    residual, delta = normal(r, tokens, hidden), normal(r, tokens, hidden)
    norm_weight = r.uniform(0.5, 1.5, hidden).astype(np.float32)
    router = normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 34, hidden, scale=0.15), normal(r, experts, hidden, 17, scale=0.15)
    args = (residual, delta, norm_weight, 1e-5, router, w13, w2, k, dtype)
    cpu = [cpu_ops.add_rmsnorm_moe(*args)] if device == "cuda" else []
    on_gpu = device == "cuda" and DEVICE == "cuda"
    try:
        for path in ["auto", "per_expert"] if on_gpu else ["auto"]:
            if on_gpu:
                dev_ops.set_option("expert_gemm", path)
            fused = dev_ops.add_rmsnorm_moe(*args)
            summed, h = dev_ops.add_rmsnorm(residual, delta, norm_weight, 1e-5, dtype)
            for expected in [(summed, h, *moe_unfused(dev_ops, h, router, w13, w2, k, dtype))] + cpu:
                close(fused[0], expected[0], dtype)  # the residual stream after the add
                close(fused[1], expected[1], dtype)  # its norm: the routing's input
                assert_routing_equal(fused[2], expected[2], dtype, exact_gathered=False)
                for actual, wanted in zip(fused[3:], expected[3:]):  # gate_up, act, out
                    close(actual, wanted, dtype, rel_scale=4.0)
    finally:
        if on_gpu:
            dev_ops.set_option("expert_gemm", "auto")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 8, 12])
@pytest.mark.parametrize("expert_dtype,hidden,ffn", [("float8_e4m3", 48, 29), ("int4", 160, 30)])
def test_quantized_moe_and_add_rmsnorm_moe(ops, dtype, tokens, expert_dtype, hidden, ffn):
    """A layer's experts in float8_e4m3, or in int4 (quantized in groups of 128 as they load: two
    groups of hidden 160, one short): up to 8 tokens the fused routing kernel (with the norm) and the
    hand-written expert kernel, with no pointer arrays; 12 tokens the separate routing ops and
    dequantized weights for cuBLAS."""
    cpu_ops, dev_ops = ops
    r = rng(20)
    experts, k = 8, 2
    residual, delta = normal(r, tokens, hidden), normal(r, tokens, hidden)
    norm_weight = r.uniform(0.5, 1.5, hidden).astype(np.float32)
    router = normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 2 * ffn, hidden, scale=0.15), normal(r, experts, hidden, ffn, scale=0.15)
    args = (residual, delta, norm_weight, 1e-5, router, w13, w2, k, dtype, expert_dtype)
    cpu, dev = (o.add_rmsnorm_moe(*args) for o in ops)
    close(dev[0], cpu[0], dtype)
    close(dev[1], cpu[1], dtype)
    for index in (1, 3, 4, 5):  # ids, offsets, both row maps
        np.testing.assert_array_equal(dev[2][index], cpu[2][index])
    for actual, expected in zip(dev[3:], cpu[3:]):  # gate_up, act, out
        close(actual, expected, dtype, rel_scale=4.0)
    (cpu_routing, *cpu_ffn), (dev_routing, *dev_ffn) = (o.moe(residual, router, w13, w2, k, dtype, expert_dtype)
                                                        for o in ops)
    np.testing.assert_array_equal(dev_routing[3], cpu_routing[3])
    for actual, expected in zip(dev_ffn, cpu_ffn):
        close(actual, expected, dtype, rel_scale=4.0)
    unfused = moe_unfused(dev_ops, residual, router, w13, w2, k, dtype, expert_dtype)
    np.testing.assert_array_equal(dev_routing[3], unfused[0][3])
    for actual, expected in zip(dev_ffn, unfused[1:]):
        close(actual, expected, dtype, rel_scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 12])
@pytest.mark.parametrize("expert_dtype,hidden,ffn", [("", 56, 23), ("float8_e4m3", 48, 29), ("int4", 160, 30)])
@pytest.mark.parametrize("device", DEVICES)
def test_moe_over_a_slice_of_the_experts(backends, device, dtype, tokens, expert_dtype, hidden, ffn):
    """An expert-parallel rank's moe and add_rmsnorm_moe: w13 and w2 hold experts [first, first + 3) of
    the router's 9, the routing is the whole layer's, the rows of those experts equal the whole
    layer's and every other row of out is zero; the slices' outputs add up to the layer's. On the GPU
    for every expert GEMM path setting (a slice never takes the batched one): float experts one GEMM
    per expert, offsets read on the host; FP8 and int4 for 1 token the fused routing kernel (with the
    norm in add_rmsnorm_moe) and the GEMV that reads the offsets on the device, for 12 tokens the
    separate routing ops and offsets read on the host."""
    cpu_ops, dev_ops = backends
    r = rng(21)
    experts, held, k = 9, 3, 2
    x, delta = normal(r, tokens, hidden), normal(r, tokens, hidden)
    norm_weight = r.uniform(0.5, 1.5, hidden).astype(np.float32)
    router = normal(r, experts, hidden, scale=0.5)
    w13, w2 = normal(r, experts, 2 * ffn, hidden, scale=0.15), normal(r, experts, hidden, ffn, scale=0.15)
    on_gpu = device == "cuda" and DEVICE == "cuda"
    try:
        for path in ["auto", "batched", "grouped"] if on_gpu and not expert_dtype else ["auto"]:
            if on_gpu:
                dev_ops.set_option("expert_gemm", path)
            routing, *layer = cpu_ops.moe(x, router, w13, w2, k, dtype, expert_dtype)
            owner = np.repeat(np.arange(experts), np.diff(routing[3]))  # each permuted row's expert
            whole = cpu_ops.add_rmsnorm_moe(x, delta, norm_weight, 1e-5, router, w13, w2, k, dtype, expert_dtype)
            owner_normed = np.repeat(np.arange(experts), np.diff(whole[2][3]))
            summed = np.zeros_like(layer[2])
            for first in range(0, experts, held):
                part = slice(first, first + held)
                mine = (owner >= first) & (owner < first + held)
                slice_routing, *ffn_out = dev_ops.moe(x, router, w13[part], w2[part], k, dtype, expert_dtype,
                                                      first_expert=first)
                for index in (1, 3, 4, 5):  # ids, offsets, both row maps: the whole layer's
                    np.testing.assert_array_equal(slice_routing[index], routing[index])
                for actual, expected in zip(ffn_out if mine.any() else [], layer):  # this slice's rows
                    close(actual[mine], expected[mine], dtype, rel_scale=4.0)
                np.testing.assert_array_equal(ffn_out[2][~mine], 0)
                summed += ffn_out[2]
                normed = dev_ops.add_rmsnorm_moe(x, delta, norm_weight, 1e-5, router, w13[part], w2[part], k, dtype,
                                                 expert_dtype, first_expert=first)
                mine_normed = (owner_normed >= first) & (owner_normed < first + held)
                if mine_normed.any():
                    close(normed[5][mine_normed], whole[5][mine_normed], dtype, rel_scale=4.0)
                np.testing.assert_array_equal(normed[5][~mine_normed], 0)
            close(summed, layer[2], dtype, rel_scale=4.0)
    finally:
        if on_gpu:
            dev_ops.set_option("expert_gemm", "auto")
    with pytest.raises(mixtral_ext.errors.ShapeError, match="outside the router's 9"):
        dev_ops.moe(x, router, w13[:3], w2[:3], k, dtype, expert_dtype, first_expert=7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [93, 96])  # single elements; 16 bytes at a time on the GPU
@pytest.mark.parametrize("first", [0, 16])  # all 19 tokens, or the last 3 (y keeps every token's rows)
@pytest.mark.parametrize("device", DEVICES)
def test_moe_unpermute_add_rmsnorm(backends, device, dtype, hidden, first):
    """moe_unpermute into delta, then add_rmsnorm: the experts' outputs combined straight into the
    residual stream and its norm."""
    cpu_ops, dev_ops = backends
    r = rng(7)
    tokens, k = 19, 2
    _, e2p = expanded_rows(r, tokens, k)
    y, weights = normal(r, tokens * k, hidden), r.dirichlet(np.ones(k), size=tokens).astype(np.float32)
    residual, norm_weight = normal(r, tokens, hidden), r.uniform(0.5, 1.5, hidden).astype(np.float32)
    args = (y, e2p[first * k:], weights[first:], residual[first:], norm_weight, 1e-5, dtype)
    fused = dev_ops.moe_unpermute_add_rmsnorm(*args)
    delta = dev_ops.moe_unpermute(y, e2p[first * k:], weights[first:], dtype)
    expected = [dev_ops.add_rmsnorm(residual[first:], delta, norm_weight, 1e-5, dtype)]
    if device == "cuda":
        expected.append(cpu_ops.moe_unpermute_add_rmsnorm(*args))
    for wanted in expected:
        for actual, value in zip(fused, wanted):  # the residual stream after the add, its norm
            close(actual, value, dtype)
