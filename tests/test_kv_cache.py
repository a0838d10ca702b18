"""The paged KV cache: pages are taken on append, freed on truncate and
close, and the numbers reported by kv_cache_info() add up."""

from __future__ import annotations

from conftest import random_tokens

import pytest

import mixtral_ext


def test_pages_follow_sequence_lengths(tiny_dir):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=100, kv_cache_tokens=100, page_size=8)
    info = engine.kv_cache_info()
    assert info["num_pages"] == 13 and info["free_pages"] == 13 and info["page_size"] == 8
    c = engine.config
    assert info["bytes"] == c.num_layers * 2 * 13 * c.num_kv_heads * 8 * c.head_dim * 4
    seq = engine.new_sequence()
    seq.append(random_tokens(17, 101))  # 3 pages
    assert engine.kv_cache_info()["free_pages"] == 10
    seq.append([4])  # 18 tokens: still 3 pages
    assert engine.kv_cache_info()["free_pages"] == 10
    seq.truncate(8)  # exactly one page
    assert engine.kv_cache_info()["free_pages"] == 12
    seq.truncate(0)
    assert engine.kv_cache_info()["free_pages"] == 13
    seq.append(random_tokens(9, 101))
    other = engine.new_sequence()
    other.append([1])
    assert engine.kv_cache_info() | {"bytes": 0} == {"num_pages": 13, "free_pages": 10, "page_size": 8,
                                                     "bytes": 0, "sequences": 2}
    seq.close()
    other.close()
    assert engine.kv_cache_info()["free_pages"] == 13 and engine.kv_cache_info()["sequences"] == 0


def test_logits_calls_leave_no_pages_behind(tiny_engine):
    before = tiny_engine.kv_cache_info()
    for n in (1, 15, 16, 17, 70):
        tiny_engine.logits(random_tokens(n, 101, seed=n))
    assert tiny_engine.kv_cache_info() == before


def test_dropped_sequence_frees_its_pages(tiny_engine):
    before = tiny_engine.kv_cache_info()["free_pages"]
    seq = tiny_engine.new_sequence()
    seq.append(random_tokens(40, 101))
    del seq
    assert tiny_engine.kv_cache_info()["free_pages"] == before


def test_kv_cache_sized_from_free_memory_and_memory_report(tiny_dir):
    free, total = mixtral_ext._C.device_memory("cpu")
    assert 0 < free <= total
    per_token = 2 * 2 * 2 * 10 * 4  # layers x (k, v) x KV heads x head_dim x float32
    fraction = 100 * per_token / free  # about a hundred tokens' worth of the free memory
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, kv_cache_fraction=fraction, page_size=8)
    report = engine.memory_report()
    assert report["kv_bytes_per_token"] == per_token
    assert 0 < report["kv_cache_tokens"] <= 112 and report["max_context"] <= report["kv_cache_tokens"]
    assert report["free_kv_tokens"] == report["kv_cache_tokens"]
    assert report["weight_bytes"] >= engine.config.parameter_count() * 4
    # The plan the cache was sized from is what the engine allocated (the default 256-token chunks).
    plan = mixtral_ext._C.Engine.memory_plan(engine.config.to_core(), "float32", "float32", report["max_context"], 8, 256)
    assert plan == (report["weight_bytes"], report["workspace_bytes"], per_token)
    with engine.new_sequence() as seq:
        seq.append(list(range(1, 20)))
        assert engine.memory_report()["free_kv_tokens"] == report["kv_cache_tokens"] - 24  # 3 pages of 8
    with pytest.raises(mixtral_ext.DeviceOutOfMemoryError, match="max_context 500"):
        mixtral_ext.Engine.from_pretrained(tiny_dir, kv_cache_fraction=fraction, max_context=500)
    for bad in (dict(kv_cache_fraction=0.0), dict(kv_cache_fraction=1.5), dict(kv_cache_fraction="all"),
                dict(kv_cache_fraction=0.5, kv_cache_tokens=64)):
        with pytest.raises(mixtral_ext.SettingError, match="kv_cache"):
            mixtral_ext.Engine.from_pretrained(tiny_dir, **bad)
