#!/usr/bin/env bash
# Builds the C++ core with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# MIXTRAL_EXT_SANITIZE, CPU only) into a scratch folder and runs the CPU test suite on it.
# Any sanitizer report fails the run (UB aborts: -fno-sanitize-recover); reports are printed.
# Needs the build tools and test packages of the README's test command. Usage:
#   bash tests/run_sanitizers.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
MIXTRAL_EXT_SANITIZE=ON MIXTRAL_EXT_CUDA=OFF \
  pip install --no-build-isolation --no-deps --quiet --target "$scratch/site" .
# Python itself is not built with the sanitizers: preload the ASan runtime, and libstdc++ with it
# so that ASan's C++ exception interceptor finds the real __cxa_throw.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# CPython's own allocations are not leaks to report; leaks of the core are checked by test_stress.py.
# allocator_may_return_null: an impossible allocation must fail as the tests expect (DeviceOutOfMemoryError).
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:log_path=$scratch/report"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$scratch/report"
# The GPU tests run too, with the CPU standing in for the device (their Ops bindings and engine paths).
export MIXTRAL_EXT_CUDA=OFF MIXTRAL_EXT_TEST_DEVICE=cpu PYTHONPATH="$scratch/site"
status=0
python -m pytest -q -p no:cacheprovider tests --deselect tests/test_fuzz.py::test_bounded_fuzz_run "$@" || status=$?
if compgen -G "$scratch/report*" > /dev/null; then
  cat "$scratch"/report*
  echo "sanitizer reports above" >&2
  exit 1
fi
exit "$status"
