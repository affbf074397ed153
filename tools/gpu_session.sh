#!/usr/bin/env bash
# One GPU session: build here, run everything GPU-side there, in one call.
#
#   tools/gpu_session.sh bundle [BUILD_DIR]   (build machine) builds the GPU
#       targets (configure BUILD_DIR with -DSTRATA_NATIVE=OFF so the binaries run
#       on any x86-64), packs .gpu_session/: stripped binaries (tar.gz), the
#       shared libraries the GPU machines lack (gRPC, abseil, protobuf's
#       friends, prometheus-cpp, spdlog, fmt, Gloo, ...; CUDA, NCCL, OpenBLAS
#       and the C/C++ runtimes come from the machine), stories15M-fp16 with its
#       tokenizer, the golden fixtures, and the commit. Carry ".gpu_session".
#   tools/gpu_session.sh run STAGE...   (GPU machine, repo root) runs the
#       stages, logs and result tables under $OUT:
#         kernels  KV-cache kernel tests vs the CPU reference + decode-attention sweep
#         engine   fused-op tests, the engine's golden test, decode step benchmark
#         serve    `strata serve --device cuda` end to end (tests/serving_gpu_test.cc;
#                  STRATA_GPU_TP picks the tp sizes, default "1 2 3" up to the GPUs)
#         tp       NCCL collectives tests, then the tensor-parallel decode step
#                  time (bench/tp_decode_bench.cc)
#         sbench   the serving benchmark against `strata serve` (SBENCH_* in sbench())
#         peer     bench/peer_hf.py, the transformers generation loop (PEER_ARGS)
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_session
BINS_WORKER="kernels_cuda_ops_test gpu_golden_test gpu_decode_bench tp_decode_bench strata-worker worker_collectives_nccl_test"
BINS_KERNELS="kernels_kv_cache_cuda_test decode_attention_bench"
BINS_SCHED="strata serving_gpu_test"
BINS_BENCH="strata-serving-bench"
SYSTEM_LIBS='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+|libgcc_s|libgomp|libopenblas|libblas|liblapack|libgfortran|libquadmath|libcuda|libcudart|libcublas|libnccl|libssl|libcrypto|libz\.|libprotobuf\.)'

find_bin() {  # build dir, name
  find "$1" -type f -name "$2" -perm -u+x -not -path '*/CMakeFiles/*' | head -1
}

bundle() {
  local build=${1:-build}
  set -e
  local all="$BINS_WORKER $BINS_KERNELS $BINS_SCHED"
  local have_bench=0
  if ninja -C "$build" -t targets all 2>/dev/null | grep -q "^$BINS_BENCH:"; then all="$all $BINS_BENCH"; have_bench=1; fi
  cmake --build "$build" -j2 --target $all
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/lib" "$BUNDLE/bin" "$BUNDLE/data/models" "$BUNDLE/data/golden"
  local b path o
  for b in $all; do
    path=$(find_bin "$build" "$b")
    [[ -n $path ]] || { echo "missing $b under $build" >&2; exit 1; }
    for o in ${BUNDLE_OVERRIDE:-}; do [[ ${o%%=*} == "$b" ]] && path=${o#*=}; done
    strip -o "$BUNDLE/bin/$b" "$path"
    ldd "$path" | awk '/=> \// {print $1, $3}' | while read -r name lib; do
      [[ $name =~ $SYSTEM_LIBS ]] && continue
      cp -Ln "$lib" "$BUNDLE/lib/" 2>/dev/null || true
    done
  done
  strip --strip-unneeded "$BUNDLE"/lib/*.so* 2>/dev/null || true
  # Everything compressed: a GPU call carries at most 64 MiB.
  tar czf "$BUNDLE/bins.tar.gz" -C "$BUNDLE/bin" $all && rm -rf "$BUNDLE/bin"
  tar czf "$BUNDLE/lib.tar.gz" -C "$BUNDLE" lib && rm -rf "$BUNDLE/lib"
  local data=${STRATA_DATA_DIR:-../shared/data}
  mkdir -p "$BUNDLE/data/models/stories15M-fp16"
  cp "$data"/models/stories15M-fp16/* "$BUNDLE/data/models/stories15M-fp16/"
  cp "$data"/golden/stories15M_greedy.json "$data"/golden/stories15M_logits_*.f32 "$BUNDLE/data/golden/"
  [[ -f "$data/README.md" ]] && cp "$data/README.md" "$BUNDLE/data/"
  tar czf "$BUNDLE/data.tar.gz" -C "$BUNDLE" data && rm -rf "$BUNDLE/data"
  # The commit the binaries were built from (the build's source tree).
  local src
  src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$build/CMakeCache.txt")
  { git -C "${src:-.}" log -1 --format='%H %cd %s'; git -C "${src:-.}" status --short | grep -v '^??' || true; } \
    > "$BUNDLE/COMMIT"
  echo "bench client bundled: $have_bench"
  du -sh "$BUNDLE" "$BUNDLE"/*
  local kb
  kb=$(du -sk "$BUNDLE" | cut -f1)
  (( kb < 60 * 1024 )) || echo "WARNING: $BUNDLE is ${kb} KiB; a GPU call carries at most 64 MiB with the repository"
}

# Static KV parameters for a model shape with random (--load-format dummy)
# weights: one K and one V scale for every layer (and, for int8, zero points
# of 0), written as docs/kv_quant_params.md describes. Random weights have no
# K/V statistics worth calibrating; the values do not change the work of a
# step (the same kernels, bytes and operations), so they serve throughput
# runs only. SBENCH_STATIC_SCALE sets the scale (default 0.05).
static_params() {  # model shape, dtype, output file
  local layers
  case ${1%%:*} in
    llama-2-7b|llama-3-8b) layers=32 ;;
    llama-2-13b) layers=40 ;;
    llama-2-70b) layers=80 ;;
    stories15m) layers=6 ;;
    *) echo "static_params: no layer count known for $1" >&2; return 1 ;;
  esac
  python3 - "$2" "$layers" "${SBENCH_STATIC_SCALE:-0.05}" > "$3" <<'PY'
import json, sys
dtype, layers, scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
layer = {"k_scale": scale, "v_scale": scale}
if dtype == "int8":
    layer.update(k_zero=0.0, v_zero=0.0)
json.dump({"kv_cache_dtype": dtype, "layers": [layer] * layers}, sys.stdout)
PY
}

sbench() {  # the serving benchmark: one server per KV format, each workload
  # SBENCH_MODEL (llama-2-7b), SBENCH_TP (1), SBENCH_KV ("fp16 int8"; dtype or
  # dtype:scale_mode; dtype:static serves with static_params' file),
  # SBENCH_WORKLOADS ("sharegpt:400"; workload:num_prompts), SBENCH_ARGS
  # (extra client flags), SBENCH_SERVE_ARGS (extra serve flags).
  local out=$1 work=$2
  local model=${SBENCH_MODEL:-llama-2-7b} tp=${SBENCH_TP:-1}
  local kvs=${SBENCH_KV:-fp16 int8}
  local workloads=${SBENCH_WORKLOADS:-sharegpt:400}
  local port=${SBENCH_PORT:-50700}
  local kv
  for kv in $kvs; do
    local dtype=${kv%%:*} mode_args=() suffix=""
    if [[ $kv == *:* ]]; then mode_args=(--kv-scale-mode "${kv#*:}"); suffix="_${kv#*:}"; fi
    if [[ $kv == *:static ]]; then  # a parameters file for the random weights (see static_params)
      static_params "$model" "$dtype" "$out/kv_params_${model//:/_ctx}_${dtype}.json" || continue
      mode_args+=(--kv-quant-params-path "$out/kv_params_${model//:/_ctx}_${dtype}.json")
    fi
    local tag="${model//:/_ctx}_tp${tp}_${dtype}${suffix}${SBENCH_TAG:-}"
    # shellcheck disable=SC2086
    "$work/strata" serve --device cuda --tp "$tp" --load-format dummy --model "$model" \
      --tokenizer "$STRATA_DATA_DIR/models/stories15M-fp16" --worker-binary "$work/strata-worker" \
      --kv-cache-dtype "$dtype" "${mode_args[@]}" --host 127.0.0.1 --port "$port" \
      --metrics-port $((port + 1)) --shutdown-grace 1 ${SBENCH_SERVE_ARGS:-} \
      > "$out/serve_$tag.log" 2>&1 &
    local pid=$! ok=0
    for _ in $(seq 1 360); do
      grep -q "ready on" "$out/serve_$tag.log" && { ok=1; break; }
      kill -0 $pid 2>/dev/null || break
      sleep 0.5
    done
    if [[ $ok != 1 ]]; then
      echo "server $tag did not start"; tail -20 "$out/serve_$tag.log"; kill $pid 2>/dev/null; wait $pid
      port=$((port + 2)); continue
    fi
    grep -E "blocks|ready on" "$out/serve_$tag.log" | tail -3
    local w
    for w in $workloads; do
      local wl=${w%%:*} n=${w#*:}
      [[ $w == *:* ]] || n=200
      # shellcheck disable=SC2086
      timeout "${SBENCH_TIMEOUT:-150}" "$work/strata-serving-bench" --server "127.0.0.1:$port" \
        --metrics-url "http://127.0.0.1:$((port + 1))/metrics" --workload "$wl" --num-prompts "$n" \
        --progress-interval 0 ${SBENCH_ARGS:-} --label "${tag}_${wl}" --no-request-details \
        --output "$out/sbench_${tag}_${wl}.json" > "$out/sbench_${tag}_${wl}.log" 2>&1
      echo "== $tag $wl rc=$?"; tail -14 "$out/sbench_${tag}_${wl}.log"
    done
    # The server's metrics after the runs: step time on the scheduler vs the workers' forward time.
    python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" \
      "http://127.0.0.1:$((port + 1))/metrics" > "$out/metrics_$tag.txt" 2>/dev/null
    grep -E '^strata_(worker_)?step_duration_seconds_(sum|count)|^strata_steps_total|^strata_step_phase_seconds_total' "$out/metrics_$tag.txt"
    kill -TERM $pid; wait $pid
    port=$((port + 2))
  done
}

peer() {  # the Hugging Face transformers generation loop at the same shape
  local out=$1
  PYTHONUNBUFFERED=1 timeout "${PEER_TIMEOUT:-200}" python3 bench/peer_hf.py ${PEER_ARGS:-} \
    --output "$out/peer_hf.json" > "$out/peer_hf.log" 2>&1
  echo "peer rc=$?"; tail -15 "$out/peer_hf.log"
}

run() {
  local out=${OUT:-/tmp/gpu_session_out} work=/tmp/gpu_session
  mkdir -p "$out" "$work"
  if [[ ! -x "$work/strata" || "$BUNDLE/bins.tar.gz" -nt "$work/strata" ]]; then
    tar xzf "$BUNDLE/bins.tar.gz" -C "$work" && tar xzf "$BUNDLE/lib.tar.gz" -C "$work" &&
      tar xzf "$BUNDLE/data.tar.gz" -C "$work" || { echo "no bundle"; exit 1; }
  fi
  export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  export STRATA_DATA_DIR="$work/data"
  export STRATA_CLI="$work/strata" STRATA_WORKER="$work/strata-worker"
  export NCCL_NVLS_ENABLE=0
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(cat "$BUNDLE/COMMIT")"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv
  } | tee "$out/env.txt"
  local rc=0 s
  for s in "$@"; do
    echo "=== stage $s ($(date -u +%T))"
    case $s in
      kernels)
        timeout ${KERNELS_TIMEOUT:-240} "$work/kernels_kv_cache_cuda_test" > "$out/kv_cache_cuda_test.log" 2>&1 || rc=1
        grep -E '^\[  (PASSED|FAILED|SKIPPED)|FAILED|Failure' "$out/kv_cache_cuda_test.log" | head -30
        timeout ${KBENCH_TIMEOUT:-150} "$work/decode_attention_bench" --sweep ${KBENCH_ARGS:-} \
          > "$out/decode_attention_bench.log" 2>&1 || rc=1
        cat "$out/decode_attention_bench.log" | tail -60 ;;
      engine)
        timeout 100 "$work/kernels_cuda_ops_test" > "$out/cuda_ops_test.log" 2>&1 || rc=1
        grep -E '^\[  (PASSED|FAILED)|Failure|FAILED' "$out/cuda_ops_test.log" | head -20
        timeout 200 "$work/gpu_golden_test" > "$out/gpu_golden_test.log" 2>&1 || rc=1
        grep -E '^\[(golden|logits|kv |graphs|gqa|memory|mixed)|^\[  (PASSED|FAILED)|Failure|FAILED' \
          "$out/gpu_golden_test.log" | head -80
        [[ ${EBENCH_SKIP:-0} == 1 ]] && continue
        timeout ${EBENCH_TIMEOUT:-280} "$work/gpu_decode_bench" --markdown "$out/gpu_decode_bench.md" \
          ${EBENCH_ARGS:-} > "$out/gpu_decode_bench.log" 2>&1 || rc=1
        cat "$out/gpu_decode_bench.log" ;;
      serve)
        timeout ${SERVE_TIMEOUT:-400} "$work/serving_gpu_test" ${SERVE_FILTER:+--gtest_filter=$SERVE_FILTER} \
          > "$out/serving_gpu_test.log" 2>&1 || rc=1
        grep -E '^\[gpu-serve\]|^\[  (PASSED|FAILED|SKIPPED)|Failure|FAILED|error' "$out/serving_gpu_test.log" | head -80 ;;
      tp)
        timeout 120 "$work/worker_collectives_nccl_test" > "$out/collectives_nccl_test.log" 2>&1 || rc=1
        grep -E '^\[  (PASSED|FAILED|SKIPPED)|Failure' "$out/collectives_nccl_test.log" | head -10
        timeout ${TP_TIMEOUT:-300} "$work/tp_decode_bench" --markdown "$out/tp_decode_bench.md" ${TP_ARGS:-} \
          > "$out/tp_decode_bench.log" 2>&1 || rc=1
        cat "$out/tp_decode_bench.log" | tail -30 ;;
      sbench)
        sbench "$out" "$work" ;;
      peer)
        peer "$out" ;;
      *) echo "unknown stage $s"; rc=1 ;;
    esac
  done
  echo "gpu_session: rc=$rc"
  return $rc
}

case ${1:-} in
  bundle) shift; bundle "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 bundle [BUILD_DIR] | run STAGE..."; exit 2 ;;
esac
