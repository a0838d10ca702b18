"""Type information as an editor and mypy see it: the compiled module's stubs (python/mixtral_ext/_C.pyi)
match what pybind11-stubgen makes of the built module, the installed package carries them and py.typed,
and mypy checks a user's code against the API (a wrong call is reported, a right one is not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mixtral_ext

SOURCE_STUB = Path(__file__).resolve().parents[1] / "python" / "mixtral_ext" / "_C.pyi"
REGENERATE = "python -m pybind11_stubgen mixtral_ext._C -o python"


def test_compiled_module_stubs_are_current(tmp_path):
    pytest.importorskip("pybind11_stubgen")
    subprocess.run([sys.executable, "-m", "pybind11_stubgen", "mixtral_ext._C", "-o", str(tmp_path)],
                   cwd=tmp_path, check=True, capture_output=True, text=True, timeout=120)
    generated = (tmp_path / "mixtral_ext" / "_C.pyi").read_text()
    assert generated == SOURCE_STUB.read_text(), f"python/mixtral_ext/_C.pyi is stale: run `{REGENERATE}`"


def test_installed_package_ships_its_types():
    package = Path(mixtral_ext.__file__).parent
    assert (package / "py.typed").exists()
    assert (package / "_C.pyi").read_text() == SOURCE_STUB.read_text()


USER_CODE = """
import mixtral_ext

engine: mixtral_ext.Engine = mixtral_ext.Engine.from_pretrained("model_dir", max_context=64)
result: mixtral_ext.GenerationResult = engine.generate("Hello", max_tokens=4)
text: str = result.text
for delta in engine.stream([1, 2, 3], max_tokens=2):
    piece: str = delta.text
"""


@pytest.mark.parametrize("wrong", [False, True], ids=["right", "wrong"])
def test_mypy_checks_user_code_against_the_api(tmp_path, wrong):
    pytest.importorskip("mypy")
    code = USER_CODE + ("count: int = engine.generate('Hi').text\n" if wrong else "")
    (tmp_path / "user.py").write_text(code)
    env = {key: value for key, value in os.environ.items() if key not in ("MYPYPATH", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--strict", "user.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    if wrong:
        assert result.returncode == 1 and 'user.py:9: error: Incompatible types in assignment' in result.stdout, \
            result.stdout
    else:
        assert result.returncode == 0, result.stdout
