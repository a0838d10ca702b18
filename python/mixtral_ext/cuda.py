"""Finding and probing the CUDA backend library (libmixtral_ext_cuda.so),
which is loaded only when asked for, so the package works without a GPU.
cuBLAS comes from the toolkit or from the nvidia-cublas wheel; the wheel's
libraries are preloaded so the backend library finds them. NCCL, for sharded
GPU engines, from the nvidia-nccl wheel or the system (nccl_library)."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

from . import _C
from .errors import DeviceError

# MIXTRAL_EXT_CUDA_LIBRARY names another build of the backend library to load instead (the tests
# point it at the CUDA emulator's build, tests/cuda_emulator).
_LIBRARY = os.environ.get("MIXTRAL_EXT_CUDA_LIBRARY") or os.path.join(os.path.dirname(__file__),
                                                                       "libmixtral_ext_cuda.so")


def _wheel_libraries(package: str, pattern: str) -> list[str]:
    """The files matching `pattern` in the lib directory of an nvidia-* wheel's package."""
    try:
        spec = importlib.util.find_spec(package)
    except ImportError:
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "lib", pattern)))


def _preload_cublas_wheel() -> None:
    for package in ("nvidia.cu13", "nvidia.cublas"):
        for name in ("libcublasLt.so.*", "libcublas.so.*"):
            for path in _wheel_libraries(package, name):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass


def nccl_library() -> str:
    """NCCL's library for the communicator of a sharded GPU engine: $MIXTRAL_EXT_NCCL_LIBRARY (the
    tests name the CUDA emulator's stand-in), else the nvidia-nccl wheel's (pip install
    'mixtral_ext[parallel]'; torch brings it too), else the system's libnccl.so.2."""
    named = os.environ.get("MIXTRAL_EXT_NCCL_LIBRARY")
    if named:
        return named
    found = _wheel_libraries("nvidia.nccl", "libnccl.so.*") or _wheel_libraries("nvidia.cu13", "libnccl.so.*")
    return found[0] if found else "libnccl.so.2"


def cuda_info() -> dict:
    """Whether this build has the CUDA backend and what it finds:
    {"built": bool, "device_count": int (-1 when unusable), "summary": str}."""
    if not os.path.exists(_LIBRARY):
        return {"built": False, "device_count": -1, "summary": "built without the CUDA backend"}
    _preload_cublas_wheel()
    count, summary = _C.probe_cuda(_LIBRARY)
    return {"built": True, "device_count": count, "summary": summary}


def backend_library() -> str:
    """The CUDA backend library's path, with cuBLAS ready to load; DeviceError in a CPU-only build."""
    if not os.path.exists(_LIBRARY):
        raise DeviceError("device 'cuda': this build has no CUDA backend (built without nvcc or cuBLAS)")
    _preload_cublas_wheel()
    return _LIBRARY
