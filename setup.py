"""Build of mixtral_ext: setuptools drives CMake (see CMakeLists.txt).

Environment:
  MIXTRAL_EXT_CUDA=AUTO|ON|OFF      build the CUDA backend (default AUTO)
  MIXTRAL_EXT_CUDA_ARCHS="90a"      CUDA architectures (default: 80, 90a, and 100a where nvcc builds it)
  MIXTRAL_EXT_SANITIZE=ON           ASan + UBSan build of the core
  MAX_JOBS=N                        parallel compile jobs

CMake and Ninja are those of the Python environment that runs the build (pip's isolated build
environment, or the venv with --no-build-isolation). A CMake cache written by another environment
(one whose tools pip has since deleted) is dropped before configuring; unchanged objects are kept.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def build_tool(module_name: str, bin_dir_attribute: str) -> str:
    """The program of the PyPI package `module_name` in this environment (cmake, ninja), else the one on PATH."""
    program = module_name
    try:
        path = Path(getattr(__import__(module_name), bin_dir_attribute)) / program
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(program)
    if found is None:
        raise RuntimeError(f"building mixtral_ext needs {program}: pip install {module_name}")
    return found


def read_cmake_cache(cache: Path) -> dict[str, str]:
    """NAME -> value of a CMakeCache.txt (types dropped)."""
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line and ":" in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            entries[key.split(":", 1)[0]] = value
    return entries


def drop_foreign_cmake_cache(build_dir: Path, expected: dict[str, str]) -> None:
    """Deletes build_dir's CMake cache when it names tools or paths other than `expected`
    (or ones that no longer exist); CMake then configures afresh and Ninja rebuilds only
    what the new commands change."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    entries = read_cmake_cache(cache)
    stale = [key for key, value in expected.items() if entries.get(key) != value]
    stale += [key for key in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM", "CMAKE_CXX_COMPILER", "CMAKE_CUDA_COMPILER")
              if entries.get(key) and not Path(entries[key]).exists()]
    if stale:
        print(f"mixtral_ext: dropping the CMake cache of another environment ({', '.join(sorted(set(stale)))})")
        cache.unlink()


class CMakeBuild(build_ext):
    CUDA_LIBRARY = "libmixtral_ext_cuda.so"  # built beside _C when the CUDA backend is on

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy each extension into the source tree: the CUDA library too.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, built_file = self._get_inplace_equivalent(build_py, ext)
            built_cuda = Path(built_file).with_name(self.CUDA_LIBRARY)
            if built_cuda.exists():
                self.copy_file(str(built_cuda), str(Path(inplace_file).with_name(self.CUDA_LIBRARY)))

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("MIXTRAL_EXT_CUDA", "AUTO").upper()
        if cuda not in ("AUTO", "ON", "OFF"):
            raise ValueError(f"MIXTRAL_EXT_CUDA must be AUTO, ON or OFF, got {cuda!r}")
        cmake = build_tool("cmake", "CMAKE_BIN_DIR")
        ninja = build_tool("ninja", "BIN_DIR")
        pinned = {
            "CMAKE_COMMAND": cmake,
            "CMAKE_MAKE_PROGRAM": ninja,
            "Python_EXECUTABLE": sys.executable,
            "pybind11_DIR": pybind11.get_cmake_dir(),
        }
        drop_foreign_cmake_cache(build_dir, pinned)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pinned['pybind11_DIR']}",
            f"-DMIXTRAL_EXT_CUDA={cuda}",
            f"-DMIXTRAL_EXT_SANITIZE={os.environ.get('MIXTRAL_EXT_SANITIZE', 'OFF')}",
            # Always passed, so that an earlier build's choice does not stay in the cache.
            f"-DMIXTRAL_EXT_CUDA_ARCHS={os.environ.get('MIXTRAL_EXT_CUDA_ARCHS', '')}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G",
            "Ninja",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("mixtral_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
