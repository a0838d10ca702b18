"""The exceptions of mixtral_ext: one hierarchy under MixtralError.

The C++ core raises the matching class through its exception translator
(csrc/bindings/module.cpp looks these names up), so Python and C++ errors
are caught the same way.
"""


class MixtralError(Exception):
    """Base of every error mixtral_ext raises on purpose."""


class ModelLoadError(MixtralError):
    """A model directory could not be loaded: missing or corrupt file, bad config, wrong tensor."""


class SettingError(MixtralError, ValueError):
    """An impossible engine or sampling setting; the message names the setting and its allowed range."""


class ShapeError(MixtralError, ValueError):
    """A tensor, dtype or shape does not fit what an operation or weight slot needs."""


class TokenError(MixtralError, ValueError):
    """A token id outside [0, vocab_size), or token ids of the wrong type."""


class ChatFormatError(MixtralError, ValueError):
    """Chat messages or tool definitions that the model's chat format cannot encode."""


class ContextOverflowError(MixtralError, ValueError):
    """A sequence would grow past the engine's max_context."""


class KvCacheFullError(MixtralError, RuntimeError):
    """The KV cache has no free pages left; close or truncate sequences, or raise kv_cache_tokens."""


class DeviceError(MixtralError, RuntimeError):
    """The CUDA runtime or cuBLAS reported a failure."""


class DeviceOutOfMemoryError(DeviceError, MemoryError):
    """Memory for weights, KV cache or workspace could not be allocated."""


class SequenceClosedError(MixtralError, RuntimeError):
    """A sequence was used after close()."""


class EngineClosedError(MixtralError, RuntimeError):
    """An engine was used after close() (or after its with block)."""


class WorkerError(MixtralError, RuntimeError):
    """A rank of a sharded engine (tensor_parallel > 1) died, failed or stopped answering; the engine
    cannot go on, and raises this until it is closed."""
