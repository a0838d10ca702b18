"""mixtral_ext: single-stream, low-latency Mixtral inference with a C++/CUDA core.

    engine = mixtral_ext.Engine.from_pretrained("path/to/Mixtral-8x22B")
    with engine.new_sequence() as seq:
        logits = seq.append([1, 851, 349])
    print(engine.generate("The capital of France is", max_tokens=16).text)
    reply = engine.chat([{"role": "user", "content": "Hello!"}], tools=None)
    mixtral_ext.plan_memory("8x22b", expert_dtype="float8_e4m3", max_context=16384).total_bytes  # before loading
"""

from .config import MixtralConfig
from .cuda import cuda_info
from .engine import Engine, Sequence
from .generation import Delta, GenerationResult, Usage
from .chat import AssistantMessage, ChatResult, ToolCall
from .memory import MemoryPlan, longest_context, parse_memory, plan_memory
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
    WorkerError,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Sequence",
    "MixtralConfig",
    "SHAPES",
    "cuda_info",
    "MemoryPlan",
    "plan_memory",
    "longest_context",
    "parse_memory",
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
    "WorkerError",
]
