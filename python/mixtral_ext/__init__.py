"""mixtral_ext: single-stream, low-latency Mixtral inference with a C++/CUDA core.

    engine = mixtral_ext.Engine.from_pretrained("path/to/Mixtral-8x22B")
    with engine.new_sequence() as seq:
        logits = seq.append([1, 851, 349])
    print(engine.generate("The capital of France is", max_tokens=16).text)
    reply = engine.chat([{"role": "user", "content": "Hello!"}], tools=None)
"""

from .config import MixtralConfig
from .cuda import cuda_info
from .engine import Engine, Sequence
from .generation import Delta, GenerationResult, Usage
from .chat import AssistantMessage, ChatResult, ToolCall
from .synthetic import SHAPES
from .errors import (
    ChatFormatError,
    ContextOverflowError,
    DeviceError,
    DeviceOutOfMemoryError,
    EngineClosedError,
    KvCacheFullError,
    MixtralError,
    ModelLoadError,
    SequenceClosedError,
    SettingError,
    ShapeError,
    TokenError,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Sequence",
    "MixtralConfig",
    "SHAPES",
    "cuda_info",
    "GenerationResult",
    "Delta",
    "Usage",
    "ChatResult",
    "AssistantMessage",
    "ToolCall",
    "MixtralError",
    "ModelLoadError",
    "SettingError",
    "ShapeError",
    "ChatFormatError",
    "TokenError",
    "ContextOverflowError",
    "KvCacheFullError",
    "DeviceError",
    "DeviceOutOfMemoryError",
    "SequenceClosedError",
    "EngineClosedError",
]
