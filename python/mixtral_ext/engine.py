"""The user-facing engine: Engine.from_pretrained loads a checkpoint into the
C++ core (Engine.synthetic makes random weights on the device); Engine.logits
runs one stateless pass; Sequence holds KV-cached state for incremental
prefill and decode; generate/stream/chat and their asyncio twins produce text. Every input is checked here before
it reaches C++; every core call holds the engine's lock, so threads may share
one engine. Token ids are int32 numpy arrays at the core boundary; logits come
back as float32 numpy arrays [tokens, vocab_size] or [vocab_size]."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import numbers
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Iterable, Iterator, Sequence as SequenceType, TypeVar

import numpy as np

from . import _C
from .chat import (TOOL_CALLS_TOKEN, AssistantMessage, ChatResult, encode_chat, foreign_call_ids, parse_tool_calls,
                   tool_names)
from .config import MixtralConfig
from .cuda import backend_library, nccl_library
from .errors import (
    ContextOverflowError,
    DeviceError,
    DeviceOutOfMemoryError,
    EngineClosedError,
    KvCacheFullError,
    MixtralError,
    ModelLoadError,
    SequenceClosedError,
    SettingError,
    TokenError,
)
from .generation import Delta, GenerationResult, GenerationSession, Progress, SamplingSettings
from .parallel import RankSetup, ShardedCore, torchrun_rank, visible_gpus
from .sharding import Sharding
from .tokenizer import TOKENIZER_FILES, NoTokenizerError, Tokenizer
from .weights import check_plan, experts_in_fp8, experts_in_int4, load_into, open_checkpoint, tensor_plan

_Result = TypeVar("_Result")
_DTYPES = ("float32", "bfloat16", "float16")
# Expert weights (w1, w3, w2: 96% of an 8x22B layer's bytes) may instead be stored in FP8 E4M3 with
# one float32 scale per output row, quantized as they load: half the bytes of bfloat16, so
# Mixtral-8x22B (281 GB in bfloat16) fits one H200 (150 GB) and a decode step reads half as much.
# Or in int4: 4-bit codes with a float16 scale and a zero point per group of 128 input columns
# (or the checkpoint's groups), about a quarter of bfloat16's bytes (csrc/core/int4.h).
_EXPERT_DTYPES = ("float8_e4m3", "int4")
# int4 quantization at load: input columns per group (csrc/core/int4.h).
INT4_GROUP_SIZE = 128


# Tokens per forward chunk by default. On the GPU a prompt chunk must give each expert enough rows
# that its GEMMs are bound by compute, not by reading the weights again for every chunk: 2048 tokens
# at 2 of 8 experts give each about 512 rows, past the bf16 ridge of an H100/H200 (~180 FLOP per
# weight byte), where 256 tokens (64 rows) would reread 1.2 GB of 8x22B expert weights per layer
# eight times over a 2048-token prompt. The workspace grows with it (0.9 GB at 8x22B widths).
_DEFAULT_BATCH_TOKENS = {"cpu": 256, "cuda": 2048}

# Device memory kept out of the KV cache besides the plan's workspace when kv_cache_fraction sizes
# it: the runtime's own buffers (cuBLAS workspace, staging, scratch). memory.plan_memory counts it too.
RUNTIME_RESERVE_BYTES = 256 << 20


@dataclass(frozen=True)
class _EngineOptions:
    """The checked construction settings shared by from_pretrained() and synthetic()."""

    device: str
    dtype: str
    page_size: int
    max_batch_tokens: int
    cuda_graphs: bool
    expert_dtype: str  # "" for dtype
    num_threads: int  # 0: timed decode steps choose
    int4_group_size: int = INT4_GROUP_SIZE  # int4 experts' groups: the checkpoint's, or 128 (0: one per row)
    int4_act_order: bool = False  # the checkpoint's int4 experts come in act order (room for their column orders)

    @classmethod
    def checked(cls, device, dtype, page_size, max_batch_tokens, cuda_graphs, expert_dtype,
                num_threads) -> "_EngineOptions":
        if device == "cuda:0":  # the first GPU, the only one an engine runs on
            device = "cuda"
        if device not in ("cpu", "cuda"):
            raise SettingError(f"device must be 'cpu', 'cuda' or 'cuda:0' (one GPU, the first), got {device!r}")
        if dtype is None:
            dtype = "float32" if device == "cpu" else "bfloat16"
        if dtype not in _DTYPES:
            raise SettingError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if max_batch_tokens is None:
            max_batch_tokens = _DEFAULT_BATCH_TOKENS[device]
        for name, value in (("page_size", page_size), ("max_batch_tokens", max_batch_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
                raise SettingError(f"{name} must be an integer in [1, 2^31), got {value!r}")
        if not isinstance(cuda_graphs, bool):
            raise SettingError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if expert_dtype is not None and expert_dtype not in _EXPERT_DTYPES and expert_dtype != dtype:
            raise SettingError(f"expert_dtype must be None (the checkpoint's, else the dtype), the dtype ({dtype}) "
                               f"or one of {_EXPERT_DTYPES}, got {expert_dtype!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral)
                                        or not 1 <= num_threads <= 4096):
            raise SettingError(f"num_threads must be None (measured) or an integer in [1, 4096], got {num_threads!r}")
        expert_dtype = "" if expert_dtype == dtype else expert_dtype
        return cls(device, dtype, page_size, max_batch_tokens, cuda_graphs, expert_dtype or "", int(num_threads or 0))

    @property
    def activation_dtype(self) -> str:
        # The CPU computes in float32 whatever the weights; the GPU in the weight dtype.
        return "float32" if self.device == "cpu" else self.dtype

    def context(self, config: MixtralConfig, max_context, kv_cache_tokens, kv_cache_fraction,
                held_experts: int = 0) -> tuple[int, int]:
        """max_context and kv_cache_tokens, defaulted and checked against the model (a rank's slice of
        it, holding held_experts of its experts, 0: all) and the device.

        With a kv_cache_fraction (the default on the GPU: 0.9), the KV cache takes that fraction of
        the device memory left after the weights and the workspace, up to max_position_embeddings
        tokens; max_context shrinks to fit unless it was given."""
        limit = config.max_position_embeddings
        if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                        or not 1 <= max_context <= limit):
            raise SettingError(f"max_context must be an integer in [1, {limit}] (the model's max_position_embeddings), "
                               f"got {max_context!r}")
        if kv_cache_tokens is not None and kv_cache_fraction is not None:
            raise SettingError("give kv_cache_tokens or kv_cache_fraction, not both")
        if kv_cache_tokens is None and kv_cache_fraction is None and self.device == "cuda":
            kv_cache_fraction = 0.9
        if kv_cache_fraction is not None:
            if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, (int, float)) \
                    or not 0 < kv_cache_fraction <= 1:
                raise SettingError(f"kv_cache_fraction must be a number in (0, 1], got {kv_cache_fraction!r}")
            kv_cache_tokens = self._tokens_that_fit(config, kv_cache_fraction, held_experts)
            if max_context is not None and kv_cache_tokens < max_context:
                raise DeviceOutOfMemoryError(
                    f"max_context {max_context} does not fit: {kv_cache_fraction} of the {self.device} memory left "
                    f"after the weights holds a KV cache of {kv_cache_tokens} tokens")
            max_context = min(max_context or limit, kv_cache_tokens)
        if max_context is None:
            max_context = limit
        if kv_cache_tokens is None:
            kv_cache_tokens = max_context
        if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or not 1 <= kv_cache_tokens < 2**31:
            raise SettingError(f"kv_cache_tokens must be an integer in [1, 2^31), got {kv_cache_tokens!r}")
        return max_context, kv_cache_tokens

    def _tokens_that_fit(self, config: MixtralConfig, fraction: float, held_experts: int) -> int:
        free, _ = _C.device_memory(self.device, backend_library() if self.device == "cuda" else "")
        weights, workspace, token_bytes = _C.Engine.memory_plan(
            config.to_core(), self.dtype, self.activation_dtype, config.max_position_embeddings, self.page_size,
            self.max_batch_tokens, self.expert_dtype, self.int4_group_size, held_experts, self.int4_act_order)
        reserve = workspace + RUNTIME_RESERVE_BYTES
        tokens = int(fraction * (free - weights - reserve)) // token_bytes
        if tokens < 1:
            raise DeviceOutOfMemoryError(
                f"{self.device}: {free} bytes free cannot hold the weights ({weights} bytes) and a KV cache")
        return min(tokens, config.max_position_embeddings)

    def sharding(self, config: MixtralConfig, world: int, expert_parallel: bool) -> Sharding:
        """The split over `world` ranks; SettingError naming the limit when they cannot hold this model
        on this device."""
        sharding = Sharding.checked(config, world, expert_parallel)
        if world > 1 and self.device == "cuda" and torchrun_rank() is None:  # torchrun's ranks: a GPU per node rank
            visible_gpus(world, _C.probe_cuda(backend_library())[0])
        return sharding

    def rank_setup(self, sharding: Sharding, source, seed: int, max_context: int, kv_cache_tokens: int) -> RankSetup:
        if sharding.expert_parallel and self.device == "cuda" and self.cuda_graphs and not self.expert_dtype:
            raise SettingError(f"cuda_graphs cannot record an expert-parallel decode step with {self.dtype} experts "
                               "(their GEMMs read the expert offsets on the host); use FP8 or int4 experts "
                               "(expert_dtype) or cuda_graphs=False")
        if sharding.world == 1 or self.device == "cpu":
            return RankSetup(sharding, source, seed, self, max_context, kv_cache_tokens)
        gpus = () if torchrun_rank() else visible_gpus(sharding.world, _C.probe_cuda(backend_library())[0])
        return RankSetup(sharding, source, seed, self, max_context, kv_cache_tokens, nccl_library(), gpus)

    def make_core(self, config: MixtralConfig, max_context: int, kv_cache_tokens: int,
                  held_experts: tuple[int, int] | None = None):
        if self.expert_dtype == "int4" and (config.hidden_size % 2 or config.intermediate_size % 2):
            raise SettingError(f"int4 experts need even widths (two codes a byte); this model's hidden size is "
                               f"{config.hidden_size} and expert width {config.intermediate_size}")
        cuda_library = backend_library() if self.device == "cuda" else ""
        first_expert, held = held_experts or (0, config.num_experts)
        return _C.Engine(config.to_core(), self.device, self.dtype, self.activation_dtype, max_context,
                         kv_cache_tokens, self.page_size, self.max_batch_tokens, cuda_library, self.cuda_graphs,
                         self.expert_dtype, self.num_threads, self.int4_group_size, first_expert, held,
                         self.int4_act_order)


def build_rank(setup: RankSetup, rank: int, progress: bool | None):
    """The core of rank `rank` of setup.world (of the whole model for one): its slice of the checkpoint,
    loaded, or random weights of its shape."""
    options: _EngineOptions = setup.options
    sharding = setup.sharding
    if isinstance(setup.source, MixtralConfig):
        core = options.make_core(sharding.config(setup.source), setup.max_context, setup.kv_cache_tokens,
                                 sharding.held_experts(setup.source, rank))
        core.init_random(setup.seed)
        return core
    checkpoint = open_checkpoint(setup.source)
    plan = tensor_plan(checkpoint)
    total_bytes = check_plan(checkpoint, plan)
    config = checkpoint.config
    try:
        core = options.make_core(sharding.config(config), setup.max_context, setup.kv_cache_tokens,
                                 sharding.held_experts(config, rank))
        load_into(core, checkpoint, sharding.plan(plan, config, rank), total_bytes // setup.world, progress,
                  int4_experts=options.expert_dtype == "int4")
    except (ModelLoadError, DeviceError, SettingError):  # a device error (out of memory included) keeps its type
        raise
    except MixtralError as e:
        raise ModelLoadError(f"{setup.source}: {e}") from e
    return core


class Engine:
    """A Mixtral model loaded on one device, with its KV cache. close() (or a with block) frees its
    device memory at once instead of when the last reference goes."""

    def __init__(self, core, config: MixtralConfig, *, path: str | None, max_context: int) -> None:
        self._open_core = core
        self.config = config
        self.path = path
        self.max_context = max_context
        self._lock = threading.RLock()
        self._pages_freed = threading.Condition(self._lock)  # notified when KV pages are freed or idle
        self._kv_cache_wait = 30.0
        self._tokenizer = None
        self._generation = GenerationSession(self)

    # ---- construction ----------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        expert_dtype: str | None = None,
        max_context: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_fraction: float | None = None,
        page_size: int = 16,
        max_batch_tokens: int | None = None,
        cuda_graphs: bool = False,
        num_threads: int | None = None,
        progress: bool | None = None,
        tensor_parallel: int = 1,
        expert_parallel: bool = False,
    ) -> "Engine":
        """Loads a Hugging Face or consolidated Mistral Mixtral directory.

        device: "cpu", or "cuda" (the first GPU; DeviceError when this build or machine has none).
        dtype: weight dtype; default float32 on the CPU (exact numerics), bfloat16 on the GPU.
        expert_dtype: "float8_e4m3" stores the experts' weights in FP8 (E4M3, one float32 scale per
            output row, quantized as they load): half the bytes of bfloat16, for models that would not
            fit otherwise and a decode step that reads half as much; "int4" in 4-bit codes with a float16
            scale and a zero point per group of 128 input columns, about a quarter; the dtype itself
            widens them. Default: the checkpoint's for one whose experts are FP8 or int4 already (AWQ,
            GPTQ, compressed-tensors: their codes, groups and act order are kept as they are), else the
            dtype.
        max_context: tokens one sequence may hold (default: the model's max_position_embeddings,
            or what the KV cache holds when that is less).
        kv_cache_tokens: KV cache capacity over all open sequences (default: max_context on the CPU).
        kv_cache_fraction: instead, the fraction of the device memory left after the weights that
            the KV cache takes, up to max_position_embeddings tokens (default on the GPU: 0.9).
        page_size: tokens per KV page.
        max_batch_tokens: tokens per forward chunk (default 256 on the CPU, 2048 on the GPU).
        cuda_graphs: on the GPU, record each generation's decode step as a CUDA graph and replay it
            for every token (off by default until the device check has proven it on a GPU).
        num_threads: threads of the CPU's ops (ignored on the GPU). Default: the engine times its
            decode steps and keeps the fastest of the cores available halved down to one (16, 8, ..., 1),
            trying the neighbouring counts now and then, so it follows other processes that take
            cores (each op waits for its slowest thread). OMP_NUM_THREADS bounds it.
        progress: show a loading bar (default: for checkpoints of 256 MiB or more).
        tensor_parallel: ranks the model is split over, one process (and GPU) each (sharding.py:
            heads and expert width; parallel.py: rank 0 is this process, the others are started here and
            shut down by close(), or were started by torchrun). Everything else behaves as with one;
            the memory settings are per rank.
        expert_parallel: with tensor_parallel > 1, each rank holds E/N whole experts instead of every
            expert's 1/N of the width (attention is split by heads either way). For long prompts and
            for quantized checkpoints whose groups do not split along the width; a decode step is
            faster tensor parallel (sharding.py). On the GPU, unless the experts are FP8 or int4, its
            decode steps cannot be recorded (cuda_graphs).
        """
        path = os.fspath(path)
        options = _EngineOptions.checked(device, dtype, page_size, max_batch_tokens, cuda_graphs, expert_dtype,
                                         num_threads)
        checkpoint = open_checkpoint(path)
        config = checkpoint.config
        config.to_core()  # validates the config before any tensor is read
        sharding = options.sharding(config, tensor_parallel, expert_parallel)
        plan = tensor_plan(checkpoint)
        total_bytes = check_plan(checkpoint, plan)
        if expert_dtype is None and experts_in_fp8(checkpoint, plan):  # an FP8 checkpoint's experts stay FP8
            options = replace(options, expert_dtype="float8_e4m3")
        if experts_in_int4(checkpoint, plan):  # and an int4 one's stay int4, in its groups, unless told otherwise
            if expert_dtype is None:
                options = replace(options, expert_dtype="int4")
            options = replace(options, int4_group_size=config.int4.group_size, int4_act_order=config.int4.act_order)
        max_context, kv_cache_tokens = options.context(sharding.config(config), max_context, kv_cache_tokens,
                                                       kv_cache_fraction, sharding.held_experts(config, 0)[1])
        tokenizer = None  # a tokenizer file that cannot be read fails the load before the weights, naming it
        if any(glob.glob(os.path.join(glob.escape(path), pattern)) for pattern in TOKENIZER_FILES):
            with contextlib.suppress(NoTokenizerError):  # without mistral-common, token ids still work
                tokenizer = Tokenizer.for_model(path, config.vocab_size)
        setup = options.rank_setup(sharding, path, 0, max_context, kv_cache_tokens)
        core = build_rank(setup, 0, progress) if tensor_parallel == 1 else ShardedCore.start(setup, progress)
        engine = cls(core, config, path=path, max_context=max_context)
        engine.loaded_bytes = total_bytes
        engine._tokenizer = tokenizer
        return engine

    @classmethod
    def synthetic(
        cls,
        config: MixtralConfig,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        expert_dtype: str | None = None,
        max_context: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_fraction: float | None = None,
        page_size: int = 16,
        max_batch_tokens: int | None = None,
        cuda_graphs: bool = False,
        num_threads: int | None = None,
        seed: int = 0,
        tensor_parallel: int = 1,
        expert_parallel: bool = False,
    ) -> "Engine":
        """A model of `config` with random weights made on the device itself (no file is read or
        written): for benchmarks at real widths. Other arguments as from_pretrained(); its text
        tokenizer is the one mistral-common ships for the vocabulary size. With tensor_parallel > 1
        each rank draws its slices as random weights of its own shape (the tensors held whole are the
        same on every rank), so the model is another random model than the one rank would make."""
        options = _EngineOptions.checked(device, dtype, page_size, max_batch_tokens, cuda_graphs, expert_dtype,
                                         num_threads)
        config.to_core()
        sharding = options.sharding(config, tensor_parallel, expert_parallel)
        max_context, kv_cache_tokens = options.context(sharding.config(config), max_context, kv_cache_tokens,
                                                       kv_cache_fraction, sharding.held_experts(config, 0)[1])
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**60:
            raise SettingError(f"seed must be an integer in [0, 2^60), got {seed!r}")
        setup = options.rank_setup(sharding, config, seed, max_context, kv_cache_tokens)
        core = build_rank(setup, 0, None) if tensor_parallel == 1 else ShardedCore.start(setup, None)
        return cls(core, config, path=None, max_context=max_context)

    # ---- lifetime --------------------------------------------------------------

    @property
    def _core(self):
        core = self._open_core
        if core is None:
            raise EngineClosedError("the engine is closed")
        return core

    @property
    def closed(self) -> bool:
        return self._open_core is None

    def close(self) -> None:
        """Frees the weights, the KV cache and the workspace; the engine raises EngineClosedError
        afterwards, and its sequences are closed with it. Closing twice is fine."""
        self._generation.drop_idle()
        with self._lock:
            core, self._open_core = self._open_core, None
            self._pages_freed.notify_all()  # generations waiting for pages find the engine closed
            if isinstance(core, ShardedCore):
                core.close()  # and its workers with it

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        state = "closed" if self.closed else self.device
        return (f"Engine({self.path or 'synthetic'!r}, {c.num_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_experts} experts, vocab {c.vocab_size}, max_context {self.max_context}, {state})")

    # ---- properties ------------------------------------------------------------

    @property
    def device(self) -> str:
        return self._core.device

    @property
    def num_threads(self) -> int:
        """Threads the CPU's ops use now: num_threads as given, else the count measured fastest so
        far; 0 on the GPU."""
        with self._lock:  # the tuner changes during a step
            return self._core.num_threads

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take on the device."""
        return self._core.weight_bytes

    def kv_cache_info(self) -> dict:
        """Pages of the KV cache: total, free, tokens per page, bytes, open sequences."""
        with self._lock:
            core = self._core
            return {
                "num_pages": core.num_pages,
                "free_pages": core.free_pages,
                "page_size": core.page_size,
                "bytes": core.kv_cache_bytes,
                "sequences": core.num_sequences,
            }

    def memory_report(self) -> dict:
        """Where the device memory goes and how many tokens fit: the experts' dtype, bytes of the
        weights, the KV cache and the workspace, the KV bytes per token, the KV capacity and what is free of it now, the
        longest sequence (max_context), and the device's free and total bytes."""
        with self._lock:
            core = self._core
            free, total = core.memory_info()
            return {
                "device": core.device,
                "expert_dtype": core.expert_dtype,
                "weight_bytes": core.weight_bytes,
                "kv_cache_bytes": core.kv_cache_bytes,
                "workspace_bytes": core.workspace_bytes,
                "kv_bytes_per_token": core.kv_cache_bytes // (core.num_pages * core.page_size),
                "kv_cache_tokens": core.num_pages * core.page_size,
                "free_kv_tokens": core.free_pages * core.page_size,
                "max_context": self.max_context,
                "device_free_bytes": free,
                "device_total_bytes": total,
            }

    def set_expert_gemm_path(self, path: str) -> None:
        """CUDA only: how the expert GEMMs run: "auto" (default), "batched", "per_expert" or "grouped"."""
        if self.device != "cuda":
            raise SettingError(f"expert_gemm paths are a CUDA setting; this engine runs on {self.device}")
        with self._lock:
            try:
                self._core.set_backend_option("expert_gemm", path)
            except MixtralError as e:
                raise SettingError(str(e)) from None

    @property
    def kv_cache_wait(self) -> float:
        """Seconds a generation waits for KV pages when the cache is full (other generations free
        theirs as they finish) before it raises KvCacheFullError; default 30, 0 fails at once. A
        generation reserves its prompt + max_tokens (the whole context for max_tokens=None) when it
        starts, so one thread that steps several streams in turn must size the cache for all of them."""
        return self._kv_cache_wait

    @kv_cache_wait.setter
    def kv_cache_wait(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise SettingError(f"kv_cache_wait must be a number of seconds >= 0, got {seconds!r}")
        self._kv_cache_wait = float(seconds)

    def _pages_changed(self) -> None:
        """Wakes the generations waiting for KV pages: some were freed, or became reclaimable."""
        with self._lock:
            self._pages_freed.notify_all()

    def clear_prefix_cache(self) -> None:
        """Frees the KV pages kept from the last generation for prefix reuse."""
        self._generation.drop_idle()

    # ---- running ----------------------------------------------------------------

    def token_array(self, token_ids: Iterable[int]) -> np.ndarray:
        """token_ids as int32, each checked to lie in [0, vocab_size)."""
        if isinstance(token_ids, (str, bytes)):
            raise TokenError("token ids must be a sequence of integers, not a string")
        try:
            values = list(token_ids)
            ids = np.asarray(values)
        except (TypeError, ValueError, OverflowError) as e:  # not iterable, ragged, or too large to hold
            raise TokenError(f"token ids must be a sequence of integers: {e}") from e
        if ids.dtype == np.bool_ or any(isinstance(t, (bool, np.bool_)) for t in values):
            raise TokenError("token ids must be integers, not booleans")
        if ids.size and (ids.ndim != 1 or ids.dtype.kind not in "iu"):
            raise TokenError(f"token ids must be a flat sequence of integers, got {ids.dtype} with shape {ids.shape}")
        ids = ids.astype(np.int64, copy=False).reshape(-1)
        bad = np.flatnonzero((ids < 0) | (ids >= self.config.vocab_size))
        if bad.size:
            raise TokenError(
                f"token id {int(ids[bad[0]])} at index {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        return ids.astype(np.int32)

    def logits(self, token_ids: SequenceType[int]) -> np.ndarray:
        """float32 logits [len(token_ids), vocab_size] of one stateless pass."""
        ids = self.token_array(token_ids)
        if ids.size == 0:
            raise TokenError("logits() needs at least one token id")
        if ids.size > self.max_context:
            raise ContextOverflowError(f"{ids.size} tokens exceed max_context {self.max_context}")
        with self._lock:
            seq = self._core.create_sequence()
            try:
                return self._retry_when_full(lambda: self._core.append(seq, ids, True))
            finally:
                self._core.release_sequence(seq)
                self._pages_changed()

    def _retry_when_full(self, run, wait: bool = False, cancel: threading.Event | None = None):
        """run() under the engine lock. When the KV cache is full (the failed run changed nothing),
        frees the prefix cache and runs it again; with `wait`, then waits up to kv_cache_wait seconds
        for other sequences to free pages (the lock released meanwhile), running it again each time;
        a `cancel` set meanwhile ends the wait with the KvCacheFullError."""
        deadline = time.monotonic() + (self._kv_cache_wait if wait else 0.0)
        while True:
            try:
                return run()
            except KvCacheFullError as e:
                if self._generation.drop_idle():
                    continue
                remaining = deadline - time.monotonic()
                if remaining > 0 and not (cancel is not None and cancel.is_set()):
                    self._pages_freed.wait(min(remaining, 0.05))  # and looks at `cancel` again
                elif wait:
                    raise KvCacheFullError(
                        f"{e}, after waiting {self._kv_cache_wait:g} s for other sequences to free some: size "
                        f"kv_cache_tokens for the generations that run at once (each prompt + max_tokens) and the "
                        f"sequences kept open, or raise engine.kv_cache_wait") from None
                else:
                    raise

    def _new_sampler(self, params, seed: int, prompt_ids: list[int]) -> int:
        """A core sampler (its state on the device) for one generation; release it with _release_sampler."""
        with self._lock:
            return self._core.create_sampler(params, seed, np.asarray(prompt_ids, dtype=np.int32))

    def _release_sampler(self, sampler: int) -> None:
        with self._lock:
            if not self.closed:  # a closed engine freed its samplers with its core
                self._core.release_sampler(sampler)

    # ---- text ------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (mistral-common), loaded on first use; ModelLoadError if none fits."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = Tokenizer.for_model(self.path, self.config.vocab_size)
            return self._tokenizer

    def tokenizer_or_none(self) -> Tokenizer | None:
        """The tokenizer, or None when there is none to be had (token ids work without one); a
        tokenizer file that is there but unreadable still raises ModelLoadError."""
        try:
            return self.tokenizer
        except NoTokenizerError:
            return None

    def _prompt_ids(self, prompt: str | SequenceType[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)  # "" gives BOS alone
        ids = self.token_array(prompt).tolist()
        if not ids:
            raise TokenError("a prompt of token ids needs at least one id")
        return ids

    def stream(self, prompt: str | SequenceType[int], **sampling) -> Iterator[Delta]:
        """Yields a Delta per generated token (text, token_id, logprobs); the last has finish_reason and usage.

        Arguments as generate(). The concatenated delta texts equal generate()'s text."""
        return self._stream(prompt, sampling, Progress())

    def _stream(self, prompt, sampling: dict, progress: Progress, cancel: threading.Event | None = None) -> Iterator[Delta]:
        settings = SamplingSettings.from_kwargs(**sampling)
        ids = self._prompt_ids(prompt)
        return self._generation.stream(ids, settings, progress, cancel)

    def generate(
        self,
        prompt: str | SequenceType[int],
        *,
        max_tokens: int | None = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | SequenceType[str] | None = None,
        stop_token_ids: SequenceType[int] | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generates from a prompt (text, or token ids); temperature 0 is greedy.

        Stops at EOS, a stop token id, a stop string (not included in the text) or after
        max_tokens ("length"; None: at the end of the context). logprobs=n also returns the n most
        likely tokens per step; ignore_eos=True generates past EOS (for benchmarks)."""
        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                        logprobs=logprobs, ignore_eos=ignore_eos)
        return self._generate(prompt, sampling)

    def _generate(self, prompt, sampling: dict, cancel: threading.Event | None = None) -> GenerationResult:
        """generate() of checked-later settings; with `cancel`, the generation stops at the next token
        once it is set (the result is then incomplete: no finish_reason)."""
        progress = Progress()
        deltas = list(self._stream(prompt, sampling, progress, cancel))
        return GenerationResult(
            text="".join(d.text for d in deltas),
            token_ids=[d.token_id for d in deltas],
            finish_reason=deltas[-1].finish_reason if deltas else None,
            usage=progress.usage(),
            time_to_first_token=progress.time_to_first_token,
            tokens_per_second=progress.tokens_per_second,
            logprobs=[d.logprob for d in deltas] if sampling.get("logprobs") is not None else None,
            top_logprobs=[d.top_logprobs for d in deltas] if sampling.get("logprobs") else None,
        )

    # ---- chat --------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids of an OpenAI-style conversation in the model's chat format."""
        return encode_chat(self.tokenizer, messages, tools)

    def chat_stream(self, messages: list[dict], *, tools: list[dict] | None = None, **sampling) -> Iterator[Delta]:
        """Streams the assistant's reply to OpenAI-style messages (roles system, user, assistant, tool).

        tools: OpenAI-style function definitions. Content arrives as text deltas; when the model
        calls tools, the last delta has finish_reason "tool_calls" and the parsed tool_calls.
        Sampling arguments as generate()."""
        return self._chat_stream(messages, tools, sampling, Progress())

    def _chat_stream(self, messages, tools, sampling: dict, progress: Progress,
                     cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Checks the messages and settings at once; returns the generator of deltas."""
        tokenizer = self.tokenizer
        prompt_ids = encode_chat(tokenizer, messages, tools)
        settings = SamplingSettings.from_kwargs(**sampling)
        marker = tokenizer.special_id(TOOL_CALLS_TOKEN)
        generation = self._generation.stream(prompt_ids, settings, progress, cancel, marker)
        original_ids = {mapped: foreign for foreign, mapped in foreign_call_ids(messages).items()}
        return self._chat_deltas(generation, progress, tool_names(tools), original_ids)

    def _chat_deltas(self, generation: Iterator[Delta], progress: Progress, names: set[str],
                     original_ids: dict[str, str]) -> Iterator[Delta]:
        """The generation's deltas, with the tool calls (of the tools given, their ids as the caller
        wrote them) parsed on the last one."""
        tokenizer = self.tokenizer
        with contextlib.closing(generation) as deltas:
            for delta in deltas:
                if delta.finish_reason and progress.tool_calls_from is not None:
                    call_ids = progress.token_ids[progress.tool_calls_from :]
                    if delta.finish_reason == "stop":
                        call_ids = call_ids[:-1]  # the EOS or stop token
                    raw = tokenizer.decode(call_ids)
                    calls = parse_tool_calls(raw, names) if delta.finish_reason == "stop" else None
                    if calls:
                        for call in calls:
                            call.id = original_ids.get(call.id, call.id)
                        delta.tool_calls, delta.finish_reason = calls, "tool_calls"
                    else:  # not a valid call list of the tools given: the model's output comes back as text
                        delta.text += TOOL_CALLS_TOKEN + raw
                yield delta

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, **sampling) -> ChatResult:
        """The assistant's reply to OpenAI-style messages: ChatResult.message has content, or tool_calls
        (finish_reason "tool_calls"); message.to_openai() appends to the conversation. Sampling as generate()."""
        return self._chat(messages, tools, sampling)

    def _chat(self, messages, tools, sampling: dict, cancel: threading.Event | None = None) -> ChatResult:
        """chat(); with `cancel`, as _generate()."""
        progress = Progress()
        deltas = list(self._chat_stream(messages, tools, sampling, progress, cancel))
        tool_calls = (deltas[-1].tool_calls if deltas else None) or []
        return ChatResult(
            message=AssistantMessage(None if tool_calls else "".join(d.text for d in deltas), tool_calls),
            finish_reason=deltas[-1].finish_reason if deltas else None,
            usage=progress.usage(),
            time_to_first_token=progress.time_to_first_token,
            tokens_per_second=progress.tokens_per_second,
        )

    # ---- asyncio -----------------------------------------------------------------

    async def agenerate(self, prompt: str | SequenceType[int], **sampling) -> GenerationResult:
        """generate() on a worker thread, so the event loop keeps running. Cancelling the awaiting task
        (task.cancel(), an asyncio.wait_for timeout) stops the generation at its next token and frees
        its KV pages before the cancellation goes on."""
        return await _cancellable(lambda cancel: self._generate(prompt, sampling, cancel))

    async def achat(self, messages: list[dict], *, tools: list[dict] | None = None, **sampling) -> ChatResult:
        """chat() on a worker thread; cancelling it stops the generation as agenerate() does."""
        return await _cancellable(lambda cancel: self._chat(messages, tools, sampling, cancel))

    def astream(self, prompt: str | SequenceType[int], **sampling) -> AsyncIterator[Delta]:
        """stream() on a worker thread; cancelling the consumer stops generation and frees its KV pages."""
        return _async_deltas(lambda cancel: self._stream(prompt, sampling, Progress(), cancel))

    def achat_stream(self, messages: list[dict], *, tools: list[dict] | None = None, **sampling) -> AsyncIterator[Delta]:
        """chat_stream() on a worker thread; cancelling the consumer stops generation and frees its KV pages."""
        return _async_deltas(lambda cancel: self._chat_stream(messages, tools, sampling, Progress(), cancel))

    def new_sequence(self) -> "Sequence":
        """A new empty sequence with its own KV cache pages."""
        with self._lock:
            return Sequence(self, self._core.create_sequence())


class Sequence:
    """A token sequence with KV-cached state: append() prefills or decodes.

    Use as a context manager, or call close(), to give its KV pages back.
    """

    def __init__(self, engine: Engine, handle: int) -> None:
        self._engine = engine
        self._handle: int | None = handle
        self._tokens: list[int] = []

    def _live_handle(self) -> int:
        if self._handle is None:
            raise SequenceClosedError("the sequence is closed")
        return self._handle

    def append(self, token_ids: SequenceType[int]) -> np.ndarray:
        """Runs the tokens after the current end; returns float32 logits [vocab_size] after the last one."""
        ids = self._engine.token_array(token_ids)
        if ids.size == 0:
            raise TokenError("append() needs at least one token id")
        return self._run(ids, lambda handle: self._engine._core.append(handle, ids, False))

    def _append_sample(self, token_ids: list[int], sampler: int, cancel: threading.Event | None = None) -> tuple:
        """append() with no logits coming back: the engine's sampler draws the next token on the
        device. token_ids come from a generation, already checked. Returns (token, logprob, top_ids,
        top_logprobs)."""
        ids = np.asarray(token_ids, dtype=np.int32)
        return self._run(ids, lambda handle: self._engine._core.append_sample(handle, ids, sampler), True, cancel)

    def _decode_next(self, token: int, sampler: int, queue_ahead: bool, cancel: threading.Event | None = None) -> tuple:
        """The decode step of `token`, the sampler's last draw, which is already on the device
        (core decode_next: with queue_ahead the step after it is queued before this returns).
        Returns the tuple of _append_sample."""
        return self._run(np.asarray([token], dtype=np.int32),
                         lambda handle: self._engine._core.decode_next(handle, sampler, queue_ahead), True, cancel)

    def _run(self, ids: np.ndarray, call, wait: bool = False, cancel: threading.Event | None = None):
        """call(handle) under the engine lock (the core raises ContextOverflowError when ids do not
        fit, changing nothing); records ids after it succeeds. With `wait` (a generation's steps), a
        full KV cache is waited out for up to the engine's kv_cache_wait seconds."""
        engine = self._engine
        with engine._lock:
            handle = self._live_handle()
            result = engine._retry_when_full(lambda: call(handle), wait, cancel)
            self._tokens.extend(ids.tolist())
            return result

    def truncate(self, length: int) -> None:
        """Keeps the first `length` tokens and frees the KV pages past them."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(self._tokens):
            raise SettingError(f"truncate length must be an integer in [0, {len(self._tokens)}], got {length!r}")
        with self._engine._lock:
            self._engine._core.truncate_sequence(self._live_handle(), length)
            del self._tokens[length:]
            self._engine._pages_changed()

    def close(self) -> None:
        """Frees the KV pages; further appends raise SequenceClosedError. Closing twice is fine, and
        so is closing after the engine (which freed every page)."""
        with self._engine._lock:
            if self._handle is not None and not self._engine.closed:
                self._engine._core.release_sequence(self._handle)
                self._engine._pages_changed()
            self._handle = None

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def tokens(self) -> list[int]:
        """A copy of the token ids the sequence holds."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"Sequence({len(self._tokens)} tokens{', closed' if self.closed else ''})"

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


async def _cancellable(run: Callable[[threading.Event], _Result]) -> _Result:
    """run(cancel) on a worker thread. When the awaiting task is cancelled, sets `cancel` and waits
    for the worker to stop (at the generation's next token, its pages freed) before re-raising."""
    cancel = threading.Event()
    worker = asyncio.get_running_loop().run_in_executor(None, run, cancel)
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(worker)
        raise


async def _async_deltas(make_stream: Callable[[threading.Event], Iterator[Delta]]) -> AsyncIterator[Delta]:
    """Runs a delta stream on a worker thread and hands its deltas to the event loop.

    Leaving the async iteration early (break, aclose, task cancellation) sets the
    stream's cancel event and waits for the worker, which stops at the next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def produce() -> None:
        try:
            with contextlib.closing(make_stream(cancel)) as deltas:
                for delta in deltas:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                    if cancel.is_set():
                        break
        except BaseException as e:  # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(None, produce)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        # Wait until the worker has stopped (it holds the sequence's pages until then), even through
        # repeated cancellations (anyio cancels again while a task finishes); then cancelled it stays.
        cancelled = False
        while not worker.done():
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
