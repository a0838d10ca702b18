"""The paged KV cache: pages are taken on append, freed on truncate and
close, and the numbers reported by kv_cache_info() add up."""

from __future__ import annotations

from conftest import random_tokens

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
