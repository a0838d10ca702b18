#!/usr/bin/env bash
# The one command to run on a GPU machine (no network there): builds the extension for sm_90a
# with every core, runs the GPU tests, the op benchmarks and an engine benchmark (synthetic
# 8x22B widths), prints a short table last and writes full logs under $OUT (default: a new
# temporary folder). Every step has a time limit, so a hung kernel cannot take the machine's whole lease.
#   MEMCHECK=1  also runs the GPU tests under compute-sanitizer memcheck (slow)
#   PEERS=0     skips the side-by-side benchmark against transformers and torch.compile (the longest step)
#   PROFILE=1   also profiles the kernels of a decode step with Nsight Compute (benchmarks/profile_decode.py)
# Where the machine's runtime refuses compute-sanitizer or ncu (both do on gVisor), that step says so
# and does not count as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
status=0
step() { echo "== $1 ($(date +%T))"; }

step "build (sm_90a, $(nproc) jobs)"
if ! MIXTRAL_EXT_CUDA=ON MIXTRAL_EXT_CUDA_ARCHS=90a MAX_JOBS=$(nproc) \
    pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
python -c "import mixtral_ext; print(mixtral_ext.cuda_info()['summary'])" | tee "$OUT/device.txt"

step "GPU tests"
# Run from outside the source tree so the installed package (with its CUDA library) is the one imported.
(cd "$OUT" && timeout 300 python -m pytest -q -p no:cacheprovider -m cuda "$OLDPWD/tests/test_cuda.py" \
   --rootdir "$OLDPWD" -c "$OLDPWD/pyproject.toml") > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -3 "$OUT/gpu_tests.log"

if [ "${MEMCHECK:-0}" = 1 ]; then
  step "GPU tests under compute-sanitizer memcheck"
  if (cd "$OUT" && timeout 600 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -p no:cacheprovider \
     -m cuda "$OLDPWD/tests/test_cuda.py" --rootdir "$OLDPWD" -c "$OLDPWD/pyproject.toml" -k "not out_of_memory") \
     > "$OUT/memcheck.log" 2>&1; then
    tail -3 "$OUT/memcheck.log"
  elif grep -q "Device not supported" "$OUT/memcheck.log"; then
    echo "compute-sanitizer refuses this machine's GPU (seen on the gVisor runtime): no memcheck here"
  else
    status=1
    tail -3 "$OUT/memcheck.log"
  fi
fi

step "op benchmarks"
(cd "$OUT" && timeout 240 python "$OLDPWD/benchmarks/bench_ops.py" --out "$OUT") > "$OUT/bench_ops.log" 2>&1 || status=1
grep -E "^\|| copy |^fastest expert" "$OUT/bench_ops.log" || tail -20 "$OUT/bench_ops.log"
step "engine: synthetic 8x22B widths, 4 layers, 2048-token prompt: plain, CUDA graphs, FP8 experts"
for variant in plain graphs fp8; do
  case $variant in
    plain) flags="" ;;
    graphs) flags="--cuda-graphs" ;;
    fp8) flags="--expert-dtype float8_e4m3" ;;
  esac
  (cd "$OUT" && timeout 180 python -m mixtral_ext bench --device cuda --shape 8x22b --layers 4 --prompt-tokens 2048 \
     --new-tokens 64 $flags --json "$OUT/bench_engine_$variant.json") > "$OUT/bench_engine_$variant.log" 2>&1 || status=1
  tail -1 "$OUT/bench_engine_$variant.log"
done
if [ "${PROFILE:-0}" = 1 ]; then
  step "Nsight Compute: the kernels of a decode step (8x22B widths, 1 layer, 2048-token context)"
  if (cd "$OUT" && timeout 300 python "$OLDPWD/benchmarks/profile_decode.py" --out "$OUT") > "$OUT/profile_decode.log" 2>&1; then
    grep -E "^\||decode kernels" "$OUT/profile_decode.log"
  elif grep -q "LibraryNotLoaded" "$OUT"/profile_decode*; then
    echo "ncu cannot read this machine's GPU counters (seen on the gVisor runtime): no profile here"
  else
    status=1
    tail -20 "$OUT/profile_decode.log"
  fi
fi
if [ "${PEERS:-1}" = 1 ]; then
  step "peers: this engine, HF eager and grouped_mm, gpt-fast-style torch.compile (8x22B widths, 2 layers)"
  (cd "$OUT" && timeout 420 python "$OLDPWD/benchmarks/bench_peers.py" --layers 2 --context 2048 --out "$OUT") \
    > "$OUT/bench_peers.log" 2>&1 || status=1
  grep -E "^\||floor|logits" "$OUT/bench_peers.log" || tail -20 "$OUT/bench_peers.log"
fi
echo "logs: $OUT; GPU tests: $(tail -1 "$OUT/gpu_tests.log")"
exit $status
