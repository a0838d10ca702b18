"""mixtral_ext: single-stream, low-latency Mixtral inference with a C++/CUDA core.

    engine = mixtral_ext.Engine.from_pretrained("path/to/Mixtral-8x22B")
    with engine.new_sequence() as seq:
        logits = seq.append([1, 851, 349])
"""

from .config import MixtralConfig
from .cuda import cuda_info
from .engine import Engine, Sequence
from .errors import (
    ContextOverflowError,
    DeviceError,
    DeviceOutOfMemoryError,
    KvCacheFullError,
    MixtralError,
    ModelLoadError,
    SequenceClosedError,
    ShapeError,
    TokenError,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Sequence",
    "MixtralConfig",
    "cuda_info",
    "MixtralError",
    "ModelLoadError",
    "ShapeError",
    "TokenError",
    "ContextOverflowError",
    "KvCacheFullError",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "SequenceClosedError",
]
