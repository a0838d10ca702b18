"""Build of mixtral_ext: setuptools drives CMake (see CMakeLists.txt).

Environment:
  MIXTRAL_EXT_CUDA=AUTO|ON|OFF      build the CUDA backend (default AUTO)
  MIXTRAL_EXT_CUDA_ARCHS="90a"      CUDA architectures (default "80;90a")
  MIXTRAL_EXT_SANITIZE=ON           ASan + UBSan build of the core
  MAX_JOBS=N                        parallel compile jobs
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


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
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMIXTRAL_EXT_CUDA={cuda}",
            f"-DMIXTRAL_EXT_SANITIZE={os.environ.get('MIXTRAL_EXT_SANITIZE', 'OFF')}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G",
            "Ninja",
        ]
        if "MIXTRAL_EXT_CUDA_ARCHS" in os.environ:
            args.append(f"-DMIXTRAL_EXT_CUDA_ARCHS={os.environ['MIXTRAL_EXT_CUDA_ARCHS']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("mixtral_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
