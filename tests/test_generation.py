"""Text in, text out: mistral-common tokenizers, streaming detokenization, the
C++ sampler (seeded, statistically exact), generate/stream/async, stop
handling, prefix reuse, and greedy parity with transformers' generate()."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import SAMPLING_LOGITS, SAMPLING_SETTINGS, random_tokens, torch, truncated_softmax, uniform01

import mixtral_ext
from mixtral_ext import _C
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint
from mixtral_ext.tokenizer import StreamDecoder, Tokenizer, _shipped_path

mistral_common = pytest.importorskip("mistral_common")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, and\ttabs\nnewlines.",
    "Le café est très chaud, n'est-ce pas ? Où êtes-vous ?",
    "La bella vita è qui: perché no?",
    "Größe, Straße und Übermut sind schön.",
    "¿Dónde está la biblioteca? ¡Olé! España, niño.",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code",
    "Emoji: 🤖🚀👩‍💻 and CJK 漢字 かな",
]


@pytest.fixture(scope="module", params=["mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v1"])
def tokenizer(request):
    return Tokenizer(_shipped_path(request.param))


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96)
    path = write_random_checkpoint(tmp_path_factory.mktemp("text_model"), config, seed=5)
    return mixtral_ext.Engine.from_pretrained(path, max_context=256)


def test_the_model_directory_tokenizer_file_wins(tmp_path):
    """A bare tokenizer.model (the published repositories' name) is the model's tokenizer, read as v3
    for a 32768-word vocabulary; one that cannot be read fails the load, naming it; a model with no
    tokenizer runs on token ids, and text says what is missing."""
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=1, head_dim=16, intermediate_size=96)
    good = write_random_checkpoint(tmp_path / "good", config, seed=2)
    shutil.copy(_shipped_path("mistral_instruct_tokenizer_240323.model.v3"), tmp_path / "good" / "tokenizer.model")
    engine = mixtral_ext.Engine.from_pretrained(good, max_context=32)
    assert engine.tokenizer.path.endswith("/tokenizer.model")
    assert engine.tokenizer.special_id("[TOOL_CALLS]") is not None  # v3, with tool calls
    bad = write_random_checkpoint(tmp_path / "bad", config, seed=2)
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(mixtral_ext.ModelLoadError, match="tokenizer.model"):
        mixtral_ext.Engine.from_pretrained(bad, max_context=32)
    no_tokenizer = write_random_checkpoint(tmp_path / "small", replace(config, vocab_size=1000), seed=2)
    engine = mixtral_ext.Engine.from_pretrained(no_tokenizer, max_context=32)
    assert len(engine.generate([1, 2, 3], max_tokens=2, temperature=0).token_ids) == 2
    with pytest.raises(mixtral_ext.ModelLoadError, match="no tokenizer file .*tokenizer.model"):
        engine.generate("Hello", max_tokens=2)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_common(tokenizer, text):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(tokenizer.path).instruct_tokenizer.tokenizer
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, bos=True, eos=False) and ids[0] == tokenizer.bos_id
    assert tokenizer.encode(text, bos=False) == ids[1:]
    assert tokenizer.decode(ids) == reference.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_deltas_add_up(tokenizer, text):
    ids = tokenizer.encode(text, bos=False)
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


class HostSampler:
    """One generation's sampler on the CPU backend's sample op, its state kept here."""

    def __init__(self, vocab, seed, **settings):
        self.ops, self.params, self.seed = _C.Ops("cpu"), _C.SamplingParams(), seed
        for k, v in settings.items():
            setattr(self.params, k, v)
        self.state = np.zeros(2 * vocab + 1, np.int32)  # seen, counts, the draw counter

    def add_prompt(self, ids):
        self.state[np.asarray(ids)] = 1

    def sample(self, logits):
        token, logprob, top_ids, top_lps, self.state = self.ops.sample(logits, self.params, self.seed, self.state)
        return token, logprob, top_ids.tolist(), top_lps.tolist()


def sampler(vocab, seed, **settings):
    return HostSampler(vocab, seed, **settings)


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)

    def draw(seed):
        s = sampler(50, seed, temperature=1.3)
        return [s.sample(logits)[0] for _ in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize("settings", SAMPLING_SETTINGS)
def test_sample_distribution_matches_truncated_softmax(settings):
    logits = SAMPLING_LOGITS
    expected, keep = truncated_softmax(logits, settings)
    s = sampler(len(logits), 1234, **settings)
    n = 20000
    counts = np.bincount([s.sample(logits)[0] for _ in range(n)], minlength=len(logits)) / n
    assert np.all(counts[~keep] == 0)
    assert np.max(np.abs(counts - expected)) < 0.015, (counts, expected)


def reference_draw(logits: np.ndarray, settings: dict, u: float) -> int:
    """The token a draw u picks, by a full sort: probabilities in float32 relative to the most likely
    token, the top_k, min_p and top_p cuts in order of logit (ties to the lower id), then the kept
    tokens walked in id order until their cumulative mass passes u times the kept mass."""
    prob = np.exp((logits - logits.max()) / np.float32(settings["temperature"])).astype(np.float64)
    order = np.lexsort((np.arange(len(logits)), -logits))
    if settings.get("top_k"):
        order = order[:settings["top_k"]]
    total = prob[order].sum()
    order = order[prob[order] >= np.float32(settings.get("min_p", 0.0))]
    reached = np.flatnonzero(np.cumsum(prob[order]) >= np.float32(settings.get("top_p", 1.0)) * total)
    kept = np.sort(order[:reached[0] + 1] if len(reached) else order)
    cumulative = np.cumsum(prob[kept])
    return int(kept[min(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(kept) - 1)])


@pytest.mark.parametrize("vocab", [4099, 32768])
@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_p=0.5),
                                      dict(temperature=1.0, min_p=0.05), dict(temperature=1.0, top_k=300, top_p=0.8),
                                      dict(temperature=1.3, top_p=0.95, min_p=0.02)])
def test_cuts_at_a_full_vocabulary_draw_the_token_a_full_sort_draws(vocab, settings):
    """The top_p cut is found by selection, not by sorting the vocabulary; it must keep the same tokens."""
    rng = np.random.default_rng(vocab)
    for scale in (0.3, 3.0):  # flat (most of the vocabulary kept) and peaked
        logits = (scale * rng.standard_normal(vocab)).astype(np.float32)
        s = sampler(vocab, 11, **settings)
        drawn = [s.sample(logits)[0] for _ in range(6)]
        assert drawn == [reference_draw(logits, settings, uniform01(11, step)) for step in range(6)]


def test_tiny_temperatures_and_nan_logits():
    """A temperature whose inverse overflows a float draws the most likely token; NaN logits are never drawn."""
    logits = np.array([0.5, 3.0, -1.0, 2.5], dtype=np.float32)
    assert [sampler(4, seed, temperature=1e-38).sample(logits)[0] for seed in range(5)] == [1] * 5
    with_nan = np.array([np.nan, 1.0, np.nan, 0.5] * 40, dtype=np.float32)
    for settings in (dict(temperature=1.0), dict(temperature=1.0, top_p=0.5), dict(temperature=0.7, min_p=0.1)):
        s = sampler(len(with_nan), 3, **settings)
        assert all(not np.isnan(with_nan[s.sample(with_nan)[0]]) for _ in range(50))


def test_penalties_and_logprobs():
    logits = np.array([3.0, 2.9, -1.0, 0.5], dtype=np.float32)
    s = sampler(4, 0, temperature=0.0, repetition_penalty=2.0, logprobs=2)
    s.add_prompt([0])  # 3.0 / 2 = 1.5 < 2.9
    token, logprob, top_ids, top_lps = s.sample(logits)
    ref = logits - np.log(np.exp(logits).sum())
    assert token == 1 and logprob == pytest.approx(ref[1], abs=1e-5)
    assert top_ids == [0, 1] and np.allclose(top_lps, ref[[0, 1]], atol=1e-5)
    s = sampler(4, 0, temperature=0.0, frequency_penalty=1.0, presence_penalty=1.0)
    assert [s.sample(logits)[0] for _ in range(3)] == [0, 1, 0]  # 3.0-2 < 2.9, then 2.9-2 < 1.0


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(top_k=-1),
            dict(repetition_penalty=0.0), dict(max_tokens=0), dict(logprobs=50), dict(presence_penalty=5.0),
            dict(seed=-1), dict(temperature=float("nan")), dict(stop=[""]), dict(max_tokens=2.5),
            dict(stop=0.1), dict(stop=b"ab"), dict(stop_token_ids="ab"), dict(stop_token_ids=[-1]),
            dict(stop_token_ids=5), dict(stop_token_ids=0)])
def test_impossible_settings_raise_value_error_naming_them(text_engine, bad):
    name = next(iter(bad))
    with pytest.raises(mixtral_ext.SettingError, match=name):  # a ValueError
        text_engine.generate("hello", **bad)
    assert text_engine.generate("hello", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_generate_stream_and_stop_strings(text_engine):
    base = text_engine.generate("Once upon a time", max_tokens=40, temperature=0)
    assert base.finish_reason == "length" and len(base.token_ids) == 40
    assert base.text == text_engine.tokenizer.decode(base.token_ids)
    streamed = list(text_engine.stream("Once upon a time", max_tokens=40, temperature=0))
    assert "".join(d.text for d in streamed) == base.text and streamed[-1].finish_reason == "length"
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    cut = text_engine.generate("Once upon a time", max_tokens=40, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    assert "".join(d.text for d in text_engine.stream("Once upon a time", max_tokens=40, temperature=0,
                                                      stop=stop)) == cut.text
    by_token = text_engine.generate("Once upon a time", max_tokens=40, temperature=0,
                                    stop_token_ids=[base.token_ids[5]])
    assert by_token.finish_reason == "stop" and by_token.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[5]) + 1]


def test_prefix_reuse_gives_the_same_tokens(text_engine, tmp_path):
    first = text_engine.generate("The capital of France", max_tokens=6, temperature=0)
    follow = text_engine.tokenizer.encode("The capital of France") + first.token_ids + [1032, 2200]
    reused = text_engine.generate(follow, max_tokens=8, temperature=0)
    assert reused.usage.cached_tokens >= len(follow) - 3
    fresh = mixtral_ext.Engine.from_pretrained(text_engine.path, max_context=256)
    again = fresh.generate(follow, max_tokens=8, temperature=0)
    assert again.usage.cached_tokens == 0 and again.token_ids == reused.token_ids


def test_empty_prompt_and_context_overflow(text_engine):
    result = text_engine.generate("", max_tokens=3, temperature=0)
    assert result.usage.prompt_tokens == 1 and len(result.token_ids) == 3
    with pytest.raises(mixtral_ext.ContextOverflowError):
        text_engine.generate(random_tokens(256, 32768), max_tokens=3)
    long = text_engine.generate(random_tokens(250, 32768), max_tokens=50, temperature=0)
    assert long.finish_reason == "length" and len(long.token_ids) == 6  # the context is full


def test_seeded_generation_is_reproducible(text_engine):
    runs = [text_engine.generate("Hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=42).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_async_variants_and_cancellation(text_engine):
    async def scenario():
        full = await text_engine.agenerate("Hi there", max_tokens=8, temperature=0)
        parts = [d.text async for d in text_engine.astream("Hi there", max_tokens=8, temperature=0)]
        stream = text_engine.astream("Hi there", max_tokens=200, temperature=0)
        async for _ in stream:
            break
        await stream.aclose()  # cancelled midway: generation stops, the engine is free again
        after = await asyncio.wait_for(text_engine.agenerate("Hi there", max_tokens=8, temperature=0), 60)
        return full, parts, after

    full, parts, after = asyncio.run(scenario())
    assert "".join(parts) == full.text and after.token_ids == full.token_ids


def test_greedy_generate_equals_transformers(tiny_dir, tiny_model):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=128)
    prompt = random_tokens(9, 101, seed=21)
    ours = engine.generate(prompt, max_tokens=24, temperature=0, stop_token_ids=[tiny_model.config.eos_token_id])
    with torch.no_grad():
        theirs = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.token_ids == theirs


def run_in_threads(work, count: int) -> None:
    """work(i) for i in range(count), each on its own thread, all at once; returns when all are done."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def test_threads_and_interleaved_streams_share_one_engine(text_engine):
    jobs = [(f"Prompt number {i}", dict(max_tokens=10, temperature=0.9, seed=i)) for i in range(6)]
    serial = [text_engine.generate(p, **s).token_ids for p, s in jobs]
    results = [None] * len(jobs)

    def work(i):
        prompt, settings = jobs[i]
        if i % 2:
            results[i] = [d.token_id for d in text_engine.stream(prompt, **settings)]
        else:
            results[i] = text_engine.generate(prompt, **settings).token_ids

    run_in_threads(work, len(jobs))
    assert results == serial
    # Two streams stepped alternately from one thread: each keeps its own sequence.
    a, b = (text_engine.stream(p, **s) for p, s in jobs[:2])
    pairs = list(zip(a, b))
    assert [x.token_id for x, _ in pairs] == serial[0] and [y.token_id for _, y in pairs] == serial[1]


def test_cancelled_agenerate_and_achat_stop_and_free_their_pages(text_engine):
    """A timeout or task.cancel() on agenerate/achat stops the generation at its next token: its KV
    pages are back before the cancellation reaches the caller, and asyncio.run() does not wait for a
    generation running on to max_tokens."""
    engine = mixtral_ext.Engine.from_pretrained(text_engine.path, max_context=4096)  # ~4,000 tokens: seconds
    free = engine.kv_cache_info()["free_pages"]
    settings = dict(max_tokens=None, temperature=0, ignore_eos=True)

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.agenerate("A long story", **settings), 0.05)
        after_timeout = engine.kv_cache_info()
        task = asyncio.create_task(engine.achat([{"role": "user", "content": "A long story"}], **settings))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return after_timeout, engine.kv_cache_info()

    for info in asyncio.run(scenario()):
        assert (info["free_pages"], info["sequences"]) == (free, 0)
    assert engine.generate("A long story", max_tokens=3, temperature=0).finish_reason == "length"


def test_generations_wait_for_kv_pages_instead_of_failing_midway(tiny_dir):
    """Four threads whose generations together need twice the KV cache: each starts when its prompt
    + max_tokens fit beside what the running ones may still need, and all four make the tokens they
    make alone. A generation that finds the pages held by a sequence waits for them up to
    kv_cache_wait seconds (0: it fails at once), and the engine stays usable."""
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=64, kv_cache_tokens=96, page_size=16)
    jobs = [(random_tokens(8, 101, seed=50 + i), dict(max_tokens=40, temperature=0.8, seed=i)) for i in range(4)]
    alone = [engine.generate(p, **s).token_ids for p, s in jobs]
    results = [None] * len(jobs)

    def work(i):
        results[i] = engine.generate(jobs[i][0], **jobs[i][1]).token_ids

    run_in_threads(work, len(jobs))
    assert results == alone
    engine.clear_prefix_cache()
    holder = engine.new_sequence()
    holder.append(random_tokens(64, 101))  # 4 of the 6 pages: a 48-token generation runs out midway
    engine.kv_cache_wait = 0
    with pytest.raises(mixtral_ext.KvCacheFullError, match="kv_cache_tokens"):
        engine.generate(jobs[0][0], **jobs[0][1])
    engine.kv_cache_wait = 30
    threading.Timer(0.2, holder.close).start()
    assert engine.generate(jobs[0][0], **jobs[0][1]).token_ids == alone[0]
    with pytest.raises(mixtral_ext.SettingError, match="kv_cache_wait"):
        engine.kv_cache_wait = -1

    async def cancelled_while_waiting():
        blocker = engine.stream(jobs[0][0], max_tokens=56, temperature=0)  # may need 4 of the 6 pages
        next(blocker)
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):  # needs 3 more: waits, and stops when cancelled
            await asyncio.wait_for(engine.agenerate(jobs[1][0], **jobs[1][1]), 0.1)
        blocker.close()
        return time.monotonic() - start

    assert asyncio.run(cancelled_while_waiting()) < 5


def test_cancelled_streams_free_their_pages(text_engine):
    text_engine.clear_prefix_cache()
    free = text_engine.kv_cache_info()["free_pages"]
    stream = text_engine.stream("A long story", max_tokens=100, temperature=0)
    for _, _ in zip(range(3), stream):
        pass
    assert text_engine.kv_cache_info()["free_pages"] < free
    stream.close()
    assert text_engine.kv_cache_info()["free_pages"] == free

    async def cancel_midway():
        started = asyncio.Event()

        async def consume():
            async for _ in text_engine.astream("A long story", max_tokens=240, temperature=0, ignore_eos=True):
                started.set()
                await asyncio.sleep(0)
        task = asyncio.create_task(consume())
        await started.wait()  # cancelled after its first token, not after a time a fast machine beats
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert text_engine.kv_cache_info()["free_pages"] == free
    text_engine.generate("A long story", max_tokens=5)  # a finished generation keeps its pages for reuse
    assert text_engine.kv_cache_info()["free_pages"] < free
    text_engine.clear_prefix_cache()
    assert text_engine.kv_cache_info()["free_pages"] == free


def test_a_full_cache_evicts_the_prefix_cache_first(tmp_path):
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=1, head_dim=16, intermediate_size=64)
    engine = mixtral_ext.Engine.from_pretrained(write_random_checkpoint(tmp_path, config), max_context=64,
                                                kv_cache_tokens=64, page_size=8)
    engine.generate(random_tokens(40, 32768), max_tokens=4)  # keeps 6 of the 8 pages for prefix reuse
    with engine.new_sequence() as seq:
        seq.append(random_tokens(60, 32768))
        with engine.new_sequence() as other, pytest.raises(mixtral_ext.KvCacheFullError):
            other.append(random_tokens(10, 32768))


def test_synthetic_engine_and_bench_command(tmp_path, capsys):
    import json

    from mixtral_ext.__main__ import main

    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96)
    a, b = (mixtral_ext.Engine.synthetic(config, max_context=64, seed=s) for s in (3, 3))
    ids = random_tokens(12, 32768, seed=4)
    logits = a.logits(ids)
    assert np.isfinite(logits).all() and logits.std() > 0.1
    np.testing.assert_array_equal(logits, b.logits(ids))  # the seed decides every weight
    assert not np.array_equal(logits, mixtral_ext.Engine.synthetic(config, max_context=64, seed=4).logits(ids))
    result = a.generate(ids, max_tokens=20, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 20 and result.finish_reason == "length"
    with pytest.raises(mixtral_ext.SettingError, match="ignore_eos"):
        a.generate(ids, ignore_eos="yes")
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "demo", "--layers", "1", "--prompt-tokens", "9", "--new-tokens", "4",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["new_tokens"] == 4 and report["layers"] == 1 and report["decode_tokens_per_s"] > 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["bench", "--shape", "demo", "--layers", "1", "--prompt-tokens", "9", "--new-tokens", "4",
                 "--expert-dtype", "float8_e4m3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["expert_dtype"] == "float8_e4m3"
    assert "experts in float8_e4m3" in capsys.readouterr().out


def test_decode_steps_through_pinned_buffers_equal_direct_ones(text_engine):
    """cuda_graphs=True routes decode through the recordable step (on the CPU it runs directly)."""
    stepped = mixtral_ext.Engine.from_pretrained(text_engine.path, max_context=256, cuda_graphs=True)
    for settings in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=4, logprobs=3)):
        expected = text_engine.generate("A quiet morning", max_tokens=15, **settings)
        got = stepped.generate("A quiet morning", max_tokens=15, **settings)
        assert got.token_ids == expected.token_ids
        if settings.get("logprobs"):
            assert np.allclose(got.logprobs, expected.logprobs, atol=1e-5) and got.top_logprobs == expected.top_logprobs
    with pytest.raises(mixtral_ext.SettingError, match="cuda_graphs"):
        mixtral_ext.Engine.from_pretrained(text_engine.path, cuda_graphs="yes")
