"""The benchmarks' own arithmetic, without a GPU: benchmarks/profile_decode.py reading Nsight
Compute's CSV (a units row, thousands separators, ncu's messages before it) and its per-step
summary (steps counted by the sampler's launches); benchmarks/bench_ops.py at small shapes on the
CPU (its table, JSON and expert-path sweep); benchmarks/bench_cpu.py's three tables and benchmarks/bench_server.py's two paths, briefly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import profile_decode  # noqa: E402

NCU_CSV = '''==PROF== Connected to process 4242
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"
"","","","","byte","byte","nsecond"
"0","4242","python3","add_rmsnorm_kernel","24,576","12,288","3,000"
"1","4242","python3","gemv","1,000,000","0","5,000"
"2","4242","python3","sample_kernel","131,072","64","9,000"
"3","4242","python3","add_rmsnorm_kernel","24,576","12,288","5,000"
"4","4242","python3","gemv","1,000,000","0","7,000"
"5","4242","python3","sample_kernel","131,072","64","11,000"
'''


def test_ncu_csv_rows_skip_messages_and_units():
    rows = profile_decode.read_ncu_csv(NCU_CSV)
    assert [r["kernel"] for r in rows] == ["add_rmsnorm_kernel", "gemv", "sample_kernel"] * 2
    assert rows[1][profile_decode.DRAM_READ] == 1e6 and rows[5][profile_decode.TIME] == 11000
    assert profile_decode.read_ncu_csv("==ERROR== no kernels were profiled\n") == []


def test_summary_is_per_decode_step_and_sorted_by_time():
    summary = profile_decode.summarize(profile_decode.read_ncu_csv(NCU_CSV), layers=2, copy_gbs=100.0)
    assert summary["steps"] == 2
    assert summary["kernel_us_per_step"] == pytest.approx(20.0)
    assert summary["kernel_us_per_layer"] == pytest.approx(10.0)
    first = summary["kernels"][0]
    assert first["kernel"] == "sample_kernel" and first["us_per_step"] == pytest.approx(10.0)
    assert first["share"] == pytest.approx(0.5)
    gemv = next(k for k in summary["kernels"] if k["kernel"] == "gemv")
    assert gemv["launches_per_step"] == 1 and gemv["mbytes_per_step"] == pytest.approx(1.0)
    assert gemv["gbs"] == pytest.approx(2e6 / 12e3) and gemv["of_copy"] == pytest.approx(2e6 / 12e3 / 100.0)
    assert "| sum of kernel times |" in profile_decode.table(summary)


def test_bench_ops_runs_at_small_shapes_on_the_cpu(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_ops.py")
    run = subprocess.run([sys.executable, script, "--device", "cpu", "--small", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| op | shape | ms |" in run.stdout and "fastest expert w13 path by rows" in run.stdout
    with open(tmp_path / "bench_ops.json") as f:
        report = json.load(f)
    assert {row["op"] for row in report["ops"]} >= {"matmul qkv", "experts w13 auto", "experts w13 fp8",
                                                   "attention decode", "sample"}
    assert sum(row["op"] == "sample" for row in report["ops"]) == 5  # greedy, temperature, top_k, top_p, min_p
    assert [entry["rows"] for entry in report["expert_path_sweep"]] == [2, 4, 8, 16, 32, 64]
    assert all(entry["fastest"] == "auto" and entry["ms"]["auto"] > 0 for entry in report["expert_path_sweep"])


def test_bench_cpu_prints_its_three_tables():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_cpu.py")
    run = subprocess.run([sys.executable, script, "--layers", "1", "--prompt", "8", "--decode", "2",
                          "--thread-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| mixtral_ext |" in run.stdout and "| HF transformers eager |" in run.stdout
    assert "| temperature=1.0, top_p=0.9 |" in run.stdout
    assert "| measured (default) |" in run.stdout and "beside one busy process" in run.stdout


def test_bench_server_prints_both_paths():
    pytest.importorskip("fastapi")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_server.py")
    run = subprocess.run([sys.executable, script, "--runs", "1", "--tokens", "8"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| Engine.stream (in process) |" in run.stdout and "| HTTP server (SSE, httpx) |" in run.stdout
    assert "the server adds" in run.stdout
