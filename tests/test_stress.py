"""Long runs and concurrency on one engine: 1,000 generate calls and 1,000
sequences leave host memory and KV pages where they started; many threads
mixing generate, stream and chat get the same outputs as a serial run and
never deadlock; asyncio streams cancelled midway free their pages. Each test
is bounded in time."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace

import pytest

import mixtral_ext
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint

pytest.importorskip("mistral_common")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = replace(DEMO_CONFIG, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=40, num_experts=4)
    path = write_random_checkpoint(tmp_path_factory.mktemp("stress_model"), config, seed=11)
    return mixtral_ext.Engine.from_pretrained(path, max_context=128, kv_cache_tokens=128 * 24)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def all_pages_free(engine) -> bool:
    engine.clear_prefix_cache()
    info = engine.kv_cache_info()
    return info["free_pages"] == info["num_pages"] and info["sequences"] == 0 and engine._core.num_samplers == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_a_thousand_generations_and_sequences_leak_nothing(engine):
    def generations(n):
        for i in range(n):
            engine.generate([1, 100 + i % 50, 200 + i % 7], max_tokens=3, temperature=0.8, seed=i, logprobs=2)

    def sequences(n):
        for i in range(n):
            with engine.new_sequence() as seq:
                seq.append([1, 5 + i % 90, 7, 9])
                seq.append([11])

    generations(100)  # warm-up: allocator pools, lazy imports, the tokenizer
    sequences(100)
    assert all_pages_free(engine)
    before = resident_bytes()
    generations(1000)
    sequences(1000)
    assert all_pages_free(engine)
    grown = resident_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 2,000 calls"


def test_threads_mixing_generate_stream_and_chat(engine):
    def job(kind, i):
        settings = dict(max_tokens=6, temperature=0.9, seed=i)
        if kind == "generate":
            return engine.generate([1, 40 + i, 41 + i], **settings).token_ids
        if kind == "stream":
            return [d.token_id for d in engine.stream([1, 40 + i, 41 + i], **settings)]
        reply = engine.chat([{"role": "user", "content": f"Question {i}?"}], **settings)
        return reply.message.content, [c.name for c in reply.message.tool_calls]

    jobs = [(kind, i) for i in range(8) for kind in ("generate", "stream", "chat")]
    expected = {job_id: job(*job_id) for job_id in jobs}
    results, errors = {}, []

    def worker(start):
        try:
            for job_id in jobs[start::8]:
                results[job_id] = job(*job_id)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker thread did not finish"
    assert not errors, errors
    generate_and_stream = {j: r for j, r in results.items() if j[0] != "chat"}
    assert generate_and_stream == {j: r for j, r in expected.items() if j[0] != "chat"}
    assert {j: r for j, r in results.items() if j[0] == "chat"} == {j: r for j, r in expected.items() if j[0] == "chat"}
    assert all_pages_free(engine)


def test_cancelled_async_streams_free_their_pages(engine):
    full = engine.generate([1, 2, 3], max_tokens=20, temperature=0).token_ids

    async def consume(cancel_after):
        tokens = []
        async for delta in engine.astream([1, 2, 3], max_tokens=20, temperature=0):
            tokens.append(delta.token_id)
            if len(tokens) == cancel_after:
                raise asyncio.CancelledError
        return tokens

    async def scenario():
        tasks = [asyncio.create_task(consume(i % 5 + 1 if i % 2 else None)) for i in range(20)]
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

    outcomes = asyncio.run(scenario())
    for i, outcome in enumerate(outcomes):
        if i % 2:
            assert isinstance(outcome, asyncio.CancelledError)
        else:
            assert outcome == full
    assert all_pages_free(engine)
