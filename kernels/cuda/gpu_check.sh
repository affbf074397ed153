#!/usr/bin/env bash
# GPU check of the KV-cache CUDA kernels: tests, sanitizer spot checks, benchmark.
#
#   kernels/cuda/gpu_check.sh bundle BUILD_DIR   (build machine) copy the test and
#       benchmark binaries, stripped, plus the non-system shared libraries they
#       need (abseil), into .gpu_bundle/ (ignored by git; pass it as `carry`).
#   kernels/cuda/gpu_check.sh run                 (GPU machine) run everything from
#       .gpu_bundle/, logs under $OUT (or ./gpu_check_out), summary last.
set -uo pipefail

BUNDLE=.gpu_bundle
BINARIES=(kernels_kv_cache_cuda_test decode_attention_bench)

bundle() {
  local build=$1
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
  for b in "${BINARIES[@]}"; do
    local path
    path=$(find "$build" -type f -name "$b" -perm -u+x | head -1)
    [[ -n $path ]] || { echo "missing $b under $build" >&2; exit 1; }
    cp "$path" "$BUNDLE/" && strip "$BUNDLE/$b"
    # Non-system libraries: abseil (absent on the GPU machines). CUDA, OpenBLAS,
    # libgomp and the C/C++ runtimes are there.
    ldd "$path" | awk '/=> \// {print $3}' | grep -E 'libabsl_' | while read -r lib; do
      cp -Ln "$lib" "$BUNDLE/" 2>/dev/null || true
    done
  done
  cp kernels/cuda/gpu_check.sh "$BUNDLE/"
  du -sh "$BUNDLE"
}

run() {
  local out=${OUT:-gpu_check_out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$BUNDLE:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv > "$out/nvidia_smi.txt" 2>&1
  nvidia-smi >> "$out/nvidia_smi.txt" 2>&1
  cat "$out/nvidia_smi.txt" | head -2

  echo "== tests"
  "$BUNDLE/kernels_kv_cache_cuda_test" --gtest_brief=1 > "$out/test.log" 2>&1
  local test_rc=$?
  grep -E '^\[  (PASSED|FAILED|SKIPPED) |FAILED TEST|^\[==========\]' "$out/test.log" | tail -8

  echo "== compute-sanitizer spot checks"
  local filt='Matrix/CudaWriteTest.*/int4_dynamic_hd48_bs16:Matrix/CudaKvTest.DecodeMatchesCpu/int4_dynamic_hd48_bs16_g4:Matrix/CudaKvTest.*/e4m3_dynamic_hd128_bs32_g8:Matrix/CudaKvTest.*/int8_static_hd64_bs16_g1:AllFormats/CudaBlockTest.*/int4_dynamic'
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$BUNDLE/kernels_kv_cache_cuda_test" --gtest_filter="$filt" --gtest_brief=1 \
    > "$out/memcheck.log" 2>&1
  local mc_rc=$?
  tail -3 "$out/memcheck.log"
  timeout 180 compute-sanitizer --tool racecheck --error-exitcode 3 \
    "$BUNDLE/kernels_kv_cache_cuda_test" \
    --gtest_filter='Matrix/CudaKvTest.DecodeMatchesCpu/int8_dynamic_hd64_bs16_g4:Matrix/CudaKvTest.DecodeMatchesCpu/fp16_none_hd64_bs16_g4' --gtest_brief=1 \
    > "$out/racecheck.log" 2>&1
  local rc_rc=$?
  tail -3 "$out/racecheck.log"

  echo "== benchmark"
  "$BUNDLE/decode_attention_bench" --sweep > "$out/bench.log" 2>&1
  local bench_rc=$?
  grep -E 'device:|bandwidth|sweep' "$out/bench.log"
  sed -n '/^| context/,$p' "$out/bench.log"
  echo "== ncu (ctx 4096, one call per format; --clock-control none)"
  timeout 150 ncu --clock-control none -k regex:Decode --csv \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,l1tex__t_sector_hit_rate.pct,dram__bytes_read.sum \
    "$BUNDLE/decode_attention_bench" --ctx 4096 --iters 1 --warmup 0 > "$out/ncu.csv" 2>&1
  echo "ncu rc=$?"
  # Instruction mix of the int8 / int4 tensor-core decode kernels (hd 128, GQA 4).
  for k in '_ZN6strata4cuda6detail15DecodeMmaKernelILNS_7KvDtypeE5ELNS_11KvScaleModeE2ELi128ELi4EEEvNS1_12DecodeParamsE' \
           '_ZN6strata4cuda6detail15DecodeMmaKernelILNS_7KvDtypeE6ELNS_11KvScaleModeE2ELi128ELi4EEEvNS1_12DecodeParamsE'; do
    echo "== $k"
    cuobjdump -sass -fun "$k" "$BUNDLE/decode_attention_bench" 2>/dev/null |
      awk '/\/\*[0-9a-f]+\*\// { for (i = 1; i <= NF; ++i) { if ($i ~ /^\/\*/ || $i ~ /^@/ || $i == "{") continue; sub(/\..*/, "", $i); print $i; break } }' |
      sort | uniq -c | sort -rn | head -40
  done > "$out/sass.txt" 2>&1
  echo "rc: tests=$test_rc memcheck=$mc_rc racecheck=$rc_rc bench=$bench_rc"
}

case "${1:-}" in
  bundle) bundle "${2:?build dir}" ;;
  run) run ;;
  *) echo "usage: $0 bundle BUILD_DIR | run" >&2; exit 2 ;;
esac
