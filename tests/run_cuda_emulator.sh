#!/usr/bin/env bash
# The GPU tests (the cuda-marked tests of tests/test_ops.py and tests/test_cuda_engine.py) on the CUDA
# emulator, for machines without a GPU: builds the CUDA backend's own sources (csrc/cuda) with the
# host compiler against tests/cuda_emulator, then runs the tests with that library as the device, a
# grid's blocks on three host threads at once.
# With SANITIZE=1 the emulator build has ASan and UBSan (an out-of-bounds access by a kernel, a bad
# cuBLAS argument's effect, UB in device code fail the run), its blocks one at a time. CI runs
# both. Needs cmake, ninja, nvcc (for each kernel's registers and static shared memory) and the
# package installed (the README's test command). Usage:
#   [SANITIZE=1] bash tests/run_cuda_emulator.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize="${SANITIZE:-0}"
build=build/cuda_emulator
[[ "$sanitize" == 1 ]] && build=build/cuda_emulator_sanitized
cmake -S tests/cuda_emulator -B "$build" -G Ninja -DCUDA_EMULATOR_SANITIZE="$sanitize" > /dev/null
cmake --build "$build" > /dev/null
export MIXTRAL_EXT_CUDA_LIBRARY="$PWD/$build/libmixtral_ext_cuda_emulator.so"
export MIXTRAL_EXT_TEST_DEVICE=emulator
# nvcc's registers and static shared memory of each kernel (the emulator checks launches against them).
export MIXTRAL_EXT_KERNEL_RESOURCES="$PWD/$build/kernel_resources.tsv"
if [[ "$sanitize" == 1 ]]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  # As in run_sanitizers.sh: Python is not sanitized, so the runtimes are preloaded.
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
  export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:log_path=$scratch/report"
  export UBSAN_OPTIONS="print_stacktrace=1:log_path=$scratch/report"
fi
status=0
python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_cuda_engine.py -m cuda "$@" || status=$?
if [[ "$sanitize" == 1 ]] && compgen -G "$scratch/report*" > /dev/null; then
  cat "$scratch"/report*
  echo "sanitizer reports above" >&2
  exit 1
fi
exit "$status"
