"""Fuzzing, bounded for the suite: every kept input in tests/fuzz/corpus
(seeds and the inputs of past findings) replays through its target without an
exception other than MixtralError, and each target runs for a few seconds
under atheris' coverage-guided fuzzer. A longer run is a documented command:
python tests/fuzz/run_fuzz.py TARGET -max_total_time=600."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fuzz"))
import targets  # noqa: E402

SECONDS_PER_TARGET = 4


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_kept_corpus_replays_clean(name):
    folder = os.path.join(HERE, "fuzz", "corpus", name)
    inputs = sorted(os.listdir(folder))
    assert inputs, f"no kept inputs for {name}"
    for file_name in inputs:
        with open(os.path.join(folder, file_name), "rb") as f:
            targets.TARGETS[name](f.read())


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_bounded_fuzz_run(name, tmp_path):
    pytest.importorskip("atheris")
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "fuzz", "run_fuzz.py"), name, f"-max_total_time={SECONDS_PER_TARGET}",
         "--new-corpus", str(tmp_path / "new"), "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=120 + 10 * SECONDS_PER_TARGET,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr
