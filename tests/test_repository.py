"""The repository as a reader meets it: every file that a comment, a docstring or a page cites
(a path such as csrc/core/backend.h, core/fp8.h, tests/test_ops.py, cuda/{kernels.cuh} or
docs/gpu.md) is in the repository. A program's output file or a placeholder is named in
NOT_FILES."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository paths, csrc-relative source paths (core/backend.h), and Markdown pages; a {a,b} group
# stands for each of its members, a * for a glob.
CITATION = re.compile(
    r"(?<![\w/.-])((?:csrc|python|tests|benchmarks|docs|cmake|\.ci)/[\w./{},*-]*[\w}*]"
    r"|(?:core|cuda|cpu|engine|bindings)/[\w-]+\.(?:h|cuh|cpp|cu|\{[\w,]+\})"
    r"|[\w-]+\.md)(?![\w/])")
TEXT_FILES = re.compile(r"\.(h|cuh|cpp|cu|py|pyi|md|cmake|sh|toml|html)$|CMakeLists\.txt$|^\.ci/run$")
NOT_FILES = {"peers.md",  # bench_peers.py writes it under --out
             "tests/fuzz/corpus/TARGET"}  # a fuzz target's corpus, TARGET its name


def expand(path: str) -> list[str]:
    group = re.search(r"\{([\w,]+)\}", path)
    if not group:
        return [path]
    return list(itertools.chain.from_iterable(
        expand(path[:group.start()] + member + path[group.end():]) for member in group.group(1).split(",")))


def exists(path: str, citing_file: Path) -> bool:
    for base in (ROOT, ROOT / "csrc", citing_file.parent):
        if "*" in path and any(base.glob(path)):
            return True
        if "*" not in path and (base / path).exists():
            return True
    return False


def test_every_cited_file_exists():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: " + listed.stderr.strip())
    missing = []
    for name in listed.stdout.split():
        if not TEXT_FILES.search(name) or "/corpus/" in name or not (ROOT / name).is_file():
            continue
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            for citation in CITATION.finditer(line):
                for path in expand(citation.group(1)):
                    path = path.rstrip(".")
                    if path not in NOT_FILES and not exists(path, ROOT / name):
                        missing.append(f"{name}:{number}: {path}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)
