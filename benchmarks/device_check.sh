#!/usr/bin/env bash
# The one command to run on a GPU machine (no network there): builds the extension for sm_90a
# with every core, runs the GPU tests, the op benchmarks and an engine benchmark (synthetic
# 8x22B widths), prints a short table last and writes full logs under $OUT (default: a new
# temporary folder). All steps, the build included, share one deadline (BUDGET seconds, default
# 540, inside one 600-second call): a step gets what is left, less a reserve for the closing
# table, and one past it is stopped with SIGINT, so that Python prints where it was (faulthandler
# dumps every thread's stack after FAULT_TIMEOUT seconds in one test). Output is unbuffered and
# each table row prints as it is measured. It fails outright when no GPU is usable, and the GPU
# tests fail instead of skipping. Nothing on this path imports mistral-common, pydantic or fastapi.
#   MEMCHECK=1  also runs the GPU tests under compute-sanitizer memcheck (slow)
#   PEERS=0     skips the side-by-side benchmark against transformers and torch.compile (the longest step)
#   PROFILE=1   also profiles the kernels of a decode step with Nsight Compute (benchmarks/profile_decode.py)
#   DRY=1       the same steps at tiny shapes on the CUDA emulator (tests/cuda_emulator), on a machine
#               without a GPU: CI runs it, so that the script works the day a GPU runs it
# Where the machine's runtime refuses compute-sanitizer or ncu (both do on gVisor), that step says so
# and does not count as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
# The interpreter's own tools (pip, cmake, ninja) first.
PATH="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
dry=${DRY:-0}
deadline=$((SECONDS + ${BUDGET:-540}))
reserve=15
status=0
step() { echo "== $1 ($(date +%T), $((deadline - SECONDS)) s left)"; }
# run_for SECONDS LOG COMMAND...: the command from $OUT, stopped by SIGINT at the smaller of SECONDS
# and what the deadline leaves; its log under $OUT. Returns its status (124: out of time).
run_for() {
  local want=$1 log=$2 left
  shift 2
  left=$((deadline - SECONDS - reserve))
  if ((left < 10)); then
    echo "no time left: skipped" | tee "$OUT/$log"
    return 124
  fi
  (cd "$OUT" && timeout -s INT -k 10 $((want < left ? want : left)) "$@") > "$OUT/$log" 2>&1
}
pytest_gpu=("$python" -X faulthandler -m pytest -q -rfEs -p no:cacheprovider -o faulthandler_timeout="${FAULT_TIMEOUT:-60}"
            --maxfail=20 --rootdir "$root" -c "$root/pyproject.toml"
            "$root/tests/test_ops.py" "$root/tests/test_cuda_engine.py" -m cuda)

if [ "$dry" = 1 ]; then
  step "build (CPU core) and the CUDA emulator, for the dry run"
  if ! run_for 400 build.log bash -c "cd '$root' && '$python' -m pip install --no-build-isolation --no-deps . && \
      cmake -S tests/cuda_emulator -B build/cuda_emulator -G Ninja && cmake --build build/cuda_emulator"; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  export MIXTRAL_EXT_CUDA_LIBRARY="$root/build/cuda_emulator/libmixtral_ext_cuda_emulator.so"
  export MIXTRAL_EXT_TEST_DEVICE=emulator MIXTRAL_EXT_KERNEL_RESOURCES="$root/build/cuda_emulator/kernel_resources.tsv"
  shape=(--shape demo --layers 1 --prompt-tokens 24 --new-tokens 4)
  peers=(--shape demo --layers 1 --context 16 --steps 2 --device cpu --no-compile)
  ops=(--small --torch-device cpu)
  parallel=(--small)
  gpu_tests=(-k "test_embedding or test_engine_logits or test_quantized_expert_gemvs_keep")
else
  step "build (sm_90a, $(nproc) jobs)"
  if ! MIXTRAL_EXT_CUDA=ON MIXTRAL_EXT_CUDA_ARCHS=90a MAX_JOBS=$(nproc) \
      run_for 400 build.log "$python" -m pip install --no-build-isolation --no-deps "$root"; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  shape=(--shape 8x22b --layers 4 --prompt-tokens 2048 --new-tokens 64)
  peers=(--layers 2 --context 2048)
  ops=()
  parallel=()
  gpu_tests=()
fi
(cd "$OUT" && "$python" -c "import mixtral_ext; print(mixtral_ext.cuda_info()['summary'])") | tee "$OUT/device.txt"
if ! (cd "$OUT" && "$python" -c "import mixtral_ext, sys; sys.exit(mixtral_ext.cuda_info()['device_count'] < 1)"); then
  echo "no usable CUDA device: nothing to check (see the line above)"
  exit 1
fi
export MIXTRAL_EXT_REQUIRE_GPU=1

step "GPU tests"
run_for 240 gpu_tests.log "${pytest_gpu[@]}" "${gpu_tests[@]}" || status=1
tail -3 "$OUT/gpu_tests.log"

if [ "${MEMCHECK:-0}" = 1 ]; then
  step "GPU tests under compute-sanitizer memcheck"
  if run_for 300 memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest_gpu[@]}" \
      -k "not out_of_memory" "${gpu_tests[@]}"; then
    tail -3 "$OUT/memcheck.log"
  elif grep -q "Device not supported" "$OUT/memcheck.log"; then
    echo "compute-sanitizer refuses this machine's GPU (seen on the gVisor runtime): no memcheck here"
  else
    status=1
    tail -3 "$OUT/memcheck.log"
  fi
fi

step "op benchmarks"
run_for 120 bench_ops.log "$python" -X faulthandler "$root/benchmarks/bench_ops.py" --out "$OUT" "${ops[@]}" || status=1
grep -E "^\|| copy |^fastest expert" "$OUT/bench_ops.log" || tail -20 "$OUT/bench_ops.log"

step "engine: synthetic model (${shape[*]}): plain, CUDA graphs, FP8 and int4 experts"
for variant in plain graphs fp8 int4; do
  case $variant in
    plain) flags=() ;;
    graphs) flags=(--cuda-graphs) ;;
    fp8) flags=(--expert-dtype float8_e4m3) ;;
    int4) flags=(--expert-dtype int4 --cuda-graphs) ;;
  esac
  run_for 90 "bench_engine_$variant.log" "$python" -X faulthandler -m mixtral_ext bench --device cuda "${shape[@]}" \
    "${flags[@]}" --json "$OUT/bench_engine_$variant.json" || status=1
  tail -1 "$OUT/bench_engine_$variant.log"
done

step "tensor parallel at N = 1: NCCL's all-reduce, and the engine through a one-rank NCCL group"
run_for 90 bench_parallel.log "$python" -X faulthandler "$root/benchmarks/bench_parallel.py" "${parallel[@]}" || status=1
grep -E "^\|" "$OUT/bench_parallel.log" || tail -20 "$OUT/bench_parallel.log"

if [ "${PROFILE:-0}" = 1 ]; then
  step "Nsight Compute: the kernels of a decode step (8x22B widths, 1 layer, 2048-token context)"
  if run_for 240 profile_decode.log "$python" "$root/benchmarks/profile_decode.py" --out "$OUT"; then
    grep -E "^\||decode kernels" "$OUT/profile_decode.log"
  elif grep -q "LibraryNotLoaded" "$OUT"/profile_decode*; then
    echo "ncu cannot read this machine's GPU counters (seen on the gVisor runtime): no profile here"
  else
    status=1
    tail -20 "$OUT/profile_decode.log"
  fi
fi

if [ "${PEERS:-1}" = 1 ]; then
  step "peers: this engine, HF eager and grouped_mm, gpt-fast-style torch.compile (${peers[*]})"
  run_for 400 bench_peers.log "$python" -X faulthandler "$root/benchmarks/bench_peers.py" "${peers[@]}" --out "$OUT" \
    || status=1
  grep -E "^\||floor|logits" "$OUT/bench_peers.log" || tail -20 "$OUT/bench_peers.log"
fi
echo "logs: $OUT; GPU tests: $(tail -1 "$OUT/gpu_tests.log"); $((deadline - SECONDS)) s of the budget left"
exit $status
