"""What the device tests share (tests/test_ops.py, tests/test_cuda_engine.py): which backend stands
for the device, the dtypes and their tolerances, and random inputs. The `ops` fixture, the pair of
backends an op runs on, is in conftest.py.

The device is the CUDA backend on a GPU. Without a GPU, two stand-ins run the same tests:
MIXTRAL_EXT_TEST_DEVICE=emulator with MIXTRAL_EXT_CUDA_LIBRARY naming the CUDA emulator's build
(tests/run_cuda_emulator.sh) runs the CUDA backend's own code, kernels and cuBLAS calls included, on
the CPU; MIXTRAL_EXT_TEST_DEVICE=cpu puts the CPU backend under test (tests/run_sanitizers.sh), which
checks the tests themselves.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import assert_close

import mixtral_ext

EMULATED = os.environ.get("MIXTRAL_EXT_TEST_DEVICE") == "emulator"
DEVICE = "cuda" if EMULATED else os.environ.get("MIXTRAL_EXT_TEST_DEVICE", "cuda")
DTYPES = ["float32", "bfloat16", "float16"]
# max |device - cpu| <= REL * max |cpu|: one rounding of the output dtype, or float32 sums in another order.
REL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
# The `device` parameter of a test of one op: the CPU twin against a reference, then the device
# against the CPU twin (marked cuda).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def gpu_available() -> bool:
    return DEVICE == "cpu" or mixtral_ext.cuda_info()["device_count"] > 0


def need_gpu() -> None:
    """Skips the test without a usable device; with MIXTRAL_EXT_REQUIRE_GPU=1 (the device check)
    fails it instead, so that a backend that does not load cannot pass as 400 skips."""
    if not gpu_available():
        message = f"no CUDA device: {mixtral_ext.cuda_info()['summary']}"
        if os.environ.get("MIXTRAL_EXT_REQUIRE_GPU") == "1":
            pytest.fail(message)
        pytest.skip(message)


def rng(seed: int):
    return np.random.default_rng(seed)


def normal(r, *shape, scale=1.0):
    return (r.normal(0.0, scale, size=shape)).astype(np.float32)


def close(actual, expected, dtype, rel_scale=1.0):
    assert_close(np.asarray(actual), np.asarray(expected), REL[dtype] * rel_scale)
