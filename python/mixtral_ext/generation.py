"""Text generation on an Engine: sampling settings, the token loop with stop
strings and stop tokens, streaming deltas, and prefix reuse (the engine keeps
the KV cache of its last prompt + output; a new prompt that shares a prefix
with it prefills only the rest)."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import _C
from .errors import ContextOverflowError, ShapeError
from .tokenizer import StreamDecoder


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs, named as in the OpenAI and vLLM APIs."""

    max_tokens: int = 256
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

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingSettings":
        stop = kwargs.pop("stop", None)
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        else:
            stop = tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        kwargs["stop_token_ids"] = tuple(kwargs.pop("stop_token_ids", None) or ())
        settings = cls(stop=stop, **{k: v for k, v in kwargs.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        def integer(name, low, high=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an integer {bound}, got {value!r}")

        integer("max_tokens", 1)
        integer("top_k", 0)
        if self.logprobs is not None:
            integer("logprobs", 0, 20)
        if self.seed is not None:
            integer("seed", 0, 2**64 - 1)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        try:
            self.core_params().validate()
        except ShapeError as e:
            raise ValueError(str(e)) from None

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
    finish_reason: str | None = None  # set on the last delta


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


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
    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    start: float = 0.0
    first_token: float | None = None
    end: float = 0.0


class GenerationSession:
    """Runs generations on one engine, one at a time, keeping the KV cache of
    the last prompt + output for prefix reuse."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self._cached = None  # the Sequence kept for prefix reuse

    def _prefill(self, prompt_ids: list[int], progress: Progress) -> np.ndarray:
        engine = self.engine
        if self._cached is None or self._cached.closed:
            self._cached = engine.new_sequence()
        seq = self._cached
        cached = seq.tokens
        shared = 0
        for a, b in zip(cached, prompt_ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt_ids) - 1)  # the last prompt token is run again for its logits
        seq.truncate(shared)
        progress.cached_tokens = shared
        return seq.append(prompt_ids[shared:])

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, progress: Progress,
               cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Yields one Delta per sampled token; the last one carries finish_reason."""
        engine = self.engine
        tokenizer = engine.tokenizer if settings.stop else engine.tokenizer_or_none()
        if len(prompt_ids) + 1 > engine.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens; max_context {engine.max_context} leaves no room to generate"
            )
        seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little")
        sampler = _C.Sampler(engine.config.vocab_size, settings.core_params(), seed)
        sampler.add_prompt(np.asarray(prompt_ids, dtype=np.int32))
        stop_ids = set(settings.stop_token_ids) | ({tokenizer.eos_id} if tokenizer else set())
        decoder = StreamDecoder(tokenizer) if tokenizer else None
        matcher = _StopMatcher(settings.stop)

        def held_back_text() -> str:
            return (matcher.feed(decoder.flush())[0] + matcher.flush()) if decoder else ""

        with self.lock:
            progress.prompt_tokens, progress.start = len(prompt_ids), time.perf_counter()
            try:
                logits = self._prefill(prompt_ids, progress)
                seq = self._cached
                while True:
                    token, logprob, top_ids, top_lps = sampler.sample(logits)
                    progress.first_token = progress.first_token or time.perf_counter()
                    progress.token_ids.append(token)
                    top = dict(zip(top_ids, top_lps)) if settings.logprobs else None
                    if token in stop_ids:
                        yield Delta(held_back_text(), token, logprob, top, "stop")
                        return
                    text, hit = matcher.feed(decoder.push(token)) if decoder else ("", False)
                    if hit:
                        yield Delta(text, token, logprob, top, "stop")
                        return
                    full = len(progress.token_ids) >= settings.max_tokens or len(seq) + 1 >= engine.max_context
                    if full or (cancel is not None and cancel.is_set()):
                        yield Delta(text + held_back_text(), token, logprob, top, "length")
                        return
                    yield Delta(text, token, logprob, top)
                    logits = seq.append([token])
            finally:
                progress.end = time.perf_counter()
