"""Text generation on an Engine: sampling settings, the token loop with stop
strings and stop tokens, streaming deltas, and prefix reuse (the engine keeps
the KV cache of its last prompt + output; a new prompt that shares a prefix
with it prefills only the rest). Tokens are drawn by the engine's sampler on
the engine's device (core/sampling.h), so logits never come back to Python."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import _C
from .errors import ContextOverflowError, EngineClosedError, KvCacheFullError, SettingError, ShapeError
from .tokenizer import StreamDecoder


def _plain_number(value):
    """A numpy (or other) integer as int, real as float and boolean as bool, so that np.int64(3) is
    the 3 it stands for; everything else as it is, for the checks to judge."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the floats
        return False


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs, named as in the OpenAI and vLLM APIs."""

    max_tokens: int | None = 256  # None: until EOS, a stop, or the end of the context
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # generate past EOS (benchmarks)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingSettings":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise SettingError(f"unknown sampling setting {unknown[0]!r}; the settings are {', '.join(names)}")
        kwargs = {name: _plain_number(value) for name, value in kwargs.items()}
        stop = kwargs.pop("stop", None)
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif hasattr(stop, "__iter__") and not isinstance(stop, (bytes, dict)):
            stop = tuple(stop)
        if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):
            raise SettingError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        stop_token_ids = kwargs.pop("stop_token_ids", None)
        if stop_token_ids is None:
            stop_token_ids = ()
        if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
            raise SettingError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        stop_token_ids = tuple(_plain_number(t) for t in stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_token_ids):
            raise SettingError(f"stop_token_ids must be non-negative integers, got {stop_token_ids!r}")
        kwargs["stop_token_ids"] = stop_token_ids
        # None is each setting's default, except max_tokens, where it means no limit.
        settings = cls(stop=stop, **{k: v for k, v in kwargs.items() if v is not None or k == "max_tokens"})
        settings.validate()
        return settings

    def validate(self) -> None:
        def integer(name, low, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise SettingError(f"{name} must be an integer {bound}, got {value!r}")

        if not isinstance(self.ignore_eos, bool):
            raise SettingError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.max_tokens is not None:
            integer("max_tokens", 1)
        integer("top_k", 0, 2**31 - 1)
        if self.logprobs is not None:
            integer("logprobs", 0, 20)
        if self.seed is not None:
            integer("seed", 0, 2**64 - 1)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise SettingError(f"{name} must be a finite number, got {value!r}")
        try:
            self.core_params().validate()
        except ShapeError as e:
            raise SettingError(str(e)) from None

    def core_params(self):
        p = _C.SamplingParams()
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(p, name, float(getattr(self, name)))
        p.top_k = self.top_k
        p.logprobs = self.logprobs or 0
        return p


@dataclass
class Delta:
    """One streamed step: the new text (may be empty while a character or a
    possible stop string is incomplete), the token id, and its logprobs."""

    text: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # set on the last delta: "stop", "length" or "tool_calls"
    tool_calls: list | None = None  # chat only: the parsed ToolCalls, on the last delta
    usage: "Usage | None" = None  # on the last delta: the generation's token counts


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    usage: Usage
    time_to_first_token: float  # seconds
    tokens_per_second: float  # decode rate after the first token
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


class _StopMatcher:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Progress:
    """What one generation did, filled in as it runs."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    tool_calls_from: int | None = None  # index in token_ids just after a [TOOL_CALLS] token
    start: float = 0.0
    first_token: float | None = None
    end: float = 0.0

    @property
    def time_to_first_token(self) -> float:
        return (self.first_token or self.end) - self.start

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, len(self.token_ids), self.cached_tokens)

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token."""
        decode_time = self.end - (self.first_token or self.end)
        return (len(self.token_ids) - 1) / decode_time if decode_time > 0 else float("nan")


class GenerationSession:
    """Runs generations on one engine. Each generation leases a sequence: the
    idle one kept from the last generation that finished (its KV cache holds
    that prompt + output, so a prompt sharing a prefix with it prefills only
    the rest), or a new one while that is busy. Generations on several threads
    run side by side, each step taking the engine lock. A generation that is
    cancelled, closed early or fails closes its sequence, freeing its pages."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards _idle only; never held while taking the engine lock
        self._idle = None  # the Sequence kept for prefix reuse
        self._reserved_pages = 0  # KV pages running generations may still need (engine lock)

    def _reserve(self, pages: int, cancel: threading.Event | None) -> int | None:
        """Admits a generation that may need `pages` KV pages (its prompt + max_tokens, up to the
        context): waits, up to the engine's kv_cache_wait seconds, until they fit beside what the
        running generations reserved, so that generations never wait for each other's pages midway
        (where all could wait at once). Returns the pages reserved (give them back with _unreserve),
        or None when `cancel` is set (before or while waiting)."""
        engine = self.engine
        with engine._lock:
            total = engine._core.num_pages
            pages = min(pages, total)
            deadline = time.monotonic() + engine.kv_cache_wait
            while not (cancel is not None and cancel.is_set()):
                if self._reserved_pages + pages <= total:
                    self._reserved_pages += pages
                    return pages
                if engine.closed:  # close() wakes the waiters
                    raise EngineClosedError("the engine was closed while a generation waited for KV pages")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KvCacheFullError(
                        f"waited {engine.kv_cache_wait:g} s for {pages} KV pages: running generations hold or may "
                        f"still need {self._reserved_pages} of the {total}; size kv_cache_tokens for the generations "
                        f"that run at once (each prompt + max_tokens), or raise engine.kv_cache_wait")
                engine._pages_freed.wait(min(remaining, 0.05))  # and looks at `cancel` again
            return None

    def _unreserve(self, pages: int) -> None:
        with self.engine._lock:
            self._reserved_pages -= pages
        self.engine._pages_changed()

    def _lease(self):
        with self._lock:
            seq, self._idle = self._idle, None
        return seq if seq is not None and not seq.closed else self.engine.new_sequence()

    def _give_back(self, seq, keep: bool) -> None:
        if keep:
            with self._lock:
                if self._idle is None:
                    self._idle, seq = seq, None
        if seq is not None:
            seq.close()
        else:  # kept: its pages are reclaimable by a generation waiting for some
            self.engine._pages_changed()

    def _token_limit(self, settings: SamplingSettings) -> int:
        """The most tokens a generation may make: max_tokens, or the context when that is None."""
        return self.engine.max_context if settings.max_tokens is None else settings.max_tokens

    def drop_idle(self) -> bool:
        """Closes the idle sequence kept for prefix reuse; True if there was one."""
        with self._lock:
            seq, self._idle = self._idle, None
        if seq is None:
            return False
        seq.close()
        return True

    @staticmethod
    def _prefill(seq, prompt_ids: list[int], progress: Progress, sampler: int, cancel: threading.Event | None) -> tuple:
        shared = 0
        for a, b in zip(seq.tokens, prompt_ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt_ids) - 1)  # the last prompt token is run again for its logits
        seq.truncate(shared)
        progress.cached_tokens = shared
        return seq._append_sample(prompt_ids[shared:], sampler, cancel)

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, progress: Progress,
               cancel: threading.Event | None = None, tool_calls_id: int | None = None) -> Iterator[Delta]:
        """Yields one Delta per sampled token; the last one carries finish_reason.

        After a tool_calls_id token the deltas carry no text (the chat layer parses
        progress.token_ids[progress.tool_calls_from:]) and stop strings no longer apply."""
        engine = self.engine
        if engine.closed:  # here, not at the first delta
            raise EngineClosedError("the engine is closed")
        tokenizer = engine.tokenizer if settings.stop else engine.tokenizer_or_none()
        # Checked now, before the first delta is asked for (an HTTP stream would have begun by then).
        if len(prompt_ids) + 1 > engine.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens; max_context {engine.max_context} leaves no room to generate"
            )
        outside = [t for t in settings.stop_token_ids if t >= engine.config.vocab_size]
        if outside:
            raise SettingError(f"stop_token_ids {outside} lie outside the vocabulary [0, {engine.config.vocab_size})")
        return self._deltas(prompt_ids, settings, progress, cancel, tool_calls_id, tokenizer)

    def _deltas(self, prompt_ids: list[int], settings: SamplingSettings, progress: Progress,
                cancel: threading.Event | None, tool_calls_id: int | None, tokenizer) -> Iterator[Delta]:
        engine = self.engine
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little")
        stop_ids = set(settings.stop_token_ids) | ({tokenizer.eos_id} if tokenizer and not settings.ignore_eos else set())
        decoder = StreamDecoder(tokenizer) if tokenizer else None
        matcher = _StopMatcher(settings.stop)

        def held_back_text() -> str:
            return (matcher.feed(decoder.flush())[0] + matcher.flush()) if decoder else ""

        progress.prompt_tokens, progress.start = len(prompt_ids), time.perf_counter()
        tokens = min(len(prompt_ids) + self._token_limit(settings), engine.max_context)
        with contextlib.ExitStack() as undo:  # each step undone, in reverse, even when a later one fails
            reserved = self._reserve(-(-tokens // engine._core.page_size), cancel)
            if reserved is None:  # cancelled before it started
                return
            undo.callback(self._unreserve, reserved)
            sampler = engine._new_sampler(settings.core_params(), seed, prompt_ids)
            undo.callback(engine._release_sampler, sampler)
            seq, finished = self._lease(), False
            undo.callback(lambda: self._give_back(seq, keep=finished))
            undo.callback(lambda: setattr(progress, "end", time.perf_counter()))
            drawn = self._prefill(seq, prompt_ids, progress, sampler, cancel)
            while True:
                token, logprob, top_ids, top_lps = drawn
                progress.first_token = progress.first_token or time.perf_counter()
                progress.token_ids.append(token)
                top = dict(zip(top_ids, top_lps)) if settings.logprobs else None
                if token in stop_ids:
                    finished = True
                    yield Delta(held_back_text(), token, logprob, top, "stop", usage=progress.usage())
                    return
                if token == tool_calls_id and progress.tool_calls_from is None:
                    progress.tool_calls_from = len(progress.token_ids)
                    text, hit = held_back_text(), False
                    decoder = None
                else:
                    text, hit = matcher.feed(decoder.push(token)) if decoder else ("", False)
                if hit:
                    finished = True
                    yield Delta(text, token, logprob, top, "stop", usage=progress.usage())
                    return
                if cancel is not None and cancel.is_set():
                    return
                if len(progress.token_ids) >= self._token_limit(settings) or len(seq) + 1 >= engine.max_context:
                    finished = True
                    yield Delta(text + held_back_text(), token, logprob, top, "length", usage=progress.usage())
                    return
                # The step after this one is queued ahead (on the GPU) to run while the caller
                # handles the token, unless this token is the last one max_tokens allows.
                queue_ahead = len(progress.token_ids) + 1 < self._token_limit(settings)
                yield Delta(text, token, logprob, top)
                drawn = seq._decode_next(token, sampler, queue_ahead, cancel)
