"""Timing helpers shared by the benchmarks: mean seconds per call of a torch
callable (after one warm-up call, synchronising the GPU), and the two reference
rates every table compares against, measured with torch on the same device in
the same run: copy bandwidth (GB/s, read + write counted) and the bf16 matmul
rate (TFLOP/s). `small` shrinks the buffers for smoke runs on the CPU."""

from __future__ import annotations

import time

import torch


def seconds_per_call(device: torch.device, fn, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def copy_bandwidth(device: torch.device, small: bool = False) -> float:
    a = torch.empty((1 << 24) if small else (1 << 29), dtype=torch.bfloat16, device=device)  # 1 GiB on the GPU
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / seconds_per_call(device, lambda: b.copy_(a), 20) / 1e9


def matmul_rate(device: torch.device, small: bool = False) -> float:
    size = 256 if small else 8192
    x = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    y = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    return 2 * size**3 / seconds_per_call(device, lambda: x @ y, 20) / 1e12
