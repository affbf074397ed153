#!/usr/bin/env bash
# The GPU engine's checks on a GPU machine, in one call.
#
#   worker/gpu_check.sh bundle [BUILD_DIR]   (build machine) builds the GPU
#       targets and packs .gpu_bundle_engine/: stripped binaries (tar.gz, the
#       fatbins compress ~1.6x), the non-system shared libraries they need
#       (abseil), the stories15M-fp16 checkpoint and the golden fixtures, and
#       the commit. Carry that folder to the device machine.
#   worker/gpu_check.sh run [ops] [golden] [bench]   (device machine, repo
#       root) runs the kernel tests, the golden test and the decode benchmark
#       (all three when none is named), logging to $OUT. BENCH_ARGS passes
#       extra flags to gpu_decode_bench.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_bundle_engine
BINS="kernels_cuda_ops_test gpu_golden_test gpu_decode_bench"

bundle() {
  local build=${1:-build-engine}
  set -e
  cmake --build "$build" -j2 --target $BINS
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/lib" "$BUNDLE/bin" "$BUNDLE/data/models" "$BUNDLE/data/golden"
  for b in $BINS; do strip -o "$BUNDLE/bin/$b" "$build/worker/$b"; done
  tar czf "$BUNDLE/bins.tar.gz" -C "$BUNDLE/bin" $BINS && rm -rf "$BUNDLE/bin"
  # Libraries the GPU machines lack (BUILD-NOTES.md): abseil. CUDA, OpenBLAS,
  # libgomp and the C/C++ runtimes come from the machine.
  for b in $BINS; do ldd "$build/worker/$b"; done | awk '/libabsl/ {print $3}' | sort -u |
    xargs -r -I{} cp -L {} "$BUNDLE/lib/"
  local data=${STRATA_DATA_DIR:-../shared/data}
  mkdir -p "$BUNDLE/data/models/stories15M-fp16"
  cp "$data"/models/stories15M-fp16/{config.json,model.safetensors,generation_config.json} \
     "$BUNDLE/data/models/stories15M-fp16/"
  cp "$data"/golden/stories15M_greedy.json "$data"/golden/stories15M_logits_*.f32 "$BUNDLE/data/golden/"
  git log -1 --format='%H %cd %s' > "$BUNDLE/COMMIT"
  git status --short -- worker/cuda* kernels/cuda_ops tests/gpu_golden_test.cc bench/gpu_decode_bench.cc \
    >> "$BUNDLE/COMMIT"
  du -sh "$BUNDLE"
}

run() {
  local out=${OUT:-/tmp/gpu_check_out} work=/tmp/gpu_engine
  mkdir -p "$out" "$work"
  tar xzf "$BUNDLE/bins.tar.gz" -C "$work" || { echo "no bundle"; exit 1; }
  export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib:${LD_LIBRARY_PATH:-}"
  export STRATA_DATA_DIR="$PWD/$BUNDLE/data"
  local stages=("$@")
  [[ ${#stages[@]} -eq 0 ]] && stages=(ops golden bench)
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(cat "$BUNDLE/COMMIT")"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv
  } | tee "$out/env.txt"
  local rc=0
  for s in "${stages[@]}"; do
    case $s in
      ops)
        timeout 100 "$work/kernels_cuda_ops_test" > "$out/cuda_ops_test.log" 2>&1 || rc=1
        grep -E '^\[  (PASSED|FAILED|SKIPPED)|FAILED|Failure' "$out/cuda_ops_test.log" | head -40 ;;
      golden)
        timeout 200 "$work/gpu_golden_test" > "$out/gpu_golden_test.log" 2>&1 || rc=1
        grep -E '^\[(golden|logits|kv |graphs|gqa|memory)|^\[  (PASSED|FAILED)|Failure|FAILED' \
          "$out/gpu_golden_test.log" | head -120 ;;
      bench)
        timeout 280 "$work/gpu_decode_bench" --markdown "$out/bench.md" ${BENCH_ARGS:-} \
          > "$out/bench.log" 2>&1 || rc=1
        cat "$out/bench.log" ;;
      *) echo "unknown stage $s"; rc=1 ;;
    esac
  done
  echo "gpu_check: rc=$rc"
  return $rc
}

case ${1:-} in
  bundle) shift; bundle "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 bundle [BUILD_DIR] | run [ops] [golden] [bench]"; exit 2 ;;
esac
