"""The wheel as a user installs it (README's "Build a wheel" command makes it; CI names it in
MIXTRAL_EXT_WHEEL, else these tests skip): a manylinux wheel holding _C, the CUDA backend for sm_80,
sm_90a and sm_100a, and the type stubs, but no cuBLAS. Installed with its [cuda] extra into a fresh venv
and run where no nvcc or CUDA toolkit is visible, it imports, runs the demo on the CPU, loads its CUDA
backend with cuBLAS resolved from the nvidia-cublas wheel, and carries no absolute RUNPATH."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("MIXTRAL_EXT_WHEEL")
pytestmark = pytest.mark.skipif(not WHEEL, reason="MIXTRAL_EXT_WHEEL names no wheel (CI builds one)")
CUDA_ARCHS = {"sm_80", "sm_90a", "sm_100a"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's python, a clean environment without the CUDA toolkit, the installed package folder)."""
    root = tmp_path_factory.mktemp("wheel")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The cuBLAS wheel the package was built and tested against (README's test command pins it).
    constraints = root / "constraints.txt"
    constraints.write_text(f"nvidia-cublas=={importlib.metadata.version('nvidia-cublas')}\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", str(constraints), f"{WHEEL}[cuda]"],
                   check=True, timeout=900)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CUDA", "NVCC", "MIXTRAL_EXT", "LD_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    assert shutil.which("nvcc", path=env["PATH"]) is None, "nvcc is visible in the clean environment"
    package = subprocess.run([python, "-c", "import mixtral_ext, os; print(os.path.dirname(mixtral_ext.__file__))"],
                             env=env, cwd=root, check=True, capture_output=True, text=True).stdout.strip()
    return python, env, Path(package)


def test_wheel_is_manylinux_with_the_cuda_backend_and_without_cublas():
    name = Path(WHEEL).name
    assert re.search(r"-manylinux_2_\d+_x86_64\.whl$", name), name
    files = zipfile.ZipFile(WHEEL).namelist()
    for expected in ("mixtral_ext/libmixtral_ext_cuda.so", "mixtral_ext/_C.pyi", "mixtral_ext/py.typed",
                     "mixtral_ext/chat_page.html"):
        assert expected in files
    assert any(re.fullmatch(r"mixtral_ext/_C\.cpython-.*\.so", f) for f in files)
    assert not [f for f in files if "cublas" in f.lower()], "cuBLAS must come from the nvidia-cublas wheel"


def test_demo_runs_on_the_cpu(installed):
    python, env, package = installed
    result = subprocess.run([python, "-m", "mixtral_ext", "demo", "--max-tokens", "6", "--seed", "1"], env=env,
                            cwd=package.parent.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Mixtral is a sparse mixture of experts model that")


def test_cuda_backend_loads_with_cublas_from_the_wheel(installed):
    python, env, package = installed
    info = json.loads(subprocess.run([python, "-c", "import json, mixtral_ext; print(json.dumps(mixtral_ext.cuda_info()))"],
                                     env=env, check=True, capture_output=True, text=True).stdout)
    assert info["built"], info
    # Loaded and probed: without a GPU the runtime says so; a missing library would say "cannot load".
    assert "cannot load" not in info["summary"], info
    ldd = subprocess.run(["ldd", str(package / "libmixtral_ext_cuda.so")], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "not found" not in ldd, ldd
    resolved = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    site_packages = package.parent
    for library in ("libcublas.so.13", "libcublasLt.so.13"):
        assert Path(resolved[library]).resolve().is_relative_to(site_packages / "nvidia"), ldd
    assert "/cuda" not in ldd, "a library resolved from a CUDA toolkit"


def test_no_runpath_names_the_build_machine(installed):
    _, env, package = installed
    for library in sorted(package.parent.glob("mixtral_ext*/*.so*")):
        dynamic = subprocess.run(["readelf", "-d", str(library)], env=env, check=True, capture_output=True,
                                 text=True).stdout
        for paths in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic):
            for entry in paths.split(":"):
                assert entry.startswith("$ORIGIN"), f"{library.name}: RUNPATH entry {entry}"


def test_cuda_backend_holds_each_architecture(installed):
    import nvidia  # the nvidia-cuda-cuobjdump wheel of the test extra

    cuobjdump = next((Path(p) / "cu13" / "bin" / "cuobjdump" for p in nvidia.__path__
                      if (Path(p) / "cu13" / "bin" / "cuobjdump").exists()), None)
    assert cuobjdump, "no cuobjdump: the test extra installs nvidia-cuda-cuobjdump"
    _, _, package = installed
    listing = subprocess.run([cuobjdump, "--list-elf", str(package / "libmixtral_ext_cuda.so")], check=True,
                             capture_output=True, text=True).stdout
    assert set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)) == CUDA_ARCHS, listing
