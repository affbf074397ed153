#!/usr/bin/env bash
# GPU check of the tensor-parallel collectives (NCCL between two GPUs,
# bootstrapped through the scheduler's gRPC Rendezvous service).
#
#   worker/tp_gpu_check.sh bundle BUILD_DIR   (build machine) copy the NCCL test,
#       stripped, plus the shared libraries the GPU machines lack (gRPC, abseil,
#       Gloo, spdlog, fmt, re2, c-ares, ...) into .gpu_bundle/tp/ (ignored by git;
#       pass ".gpu_bundle" as `carry`).
#   worker/tp_gpu_check.sh run                 (GPU machine with >= 2 GPUs) run it,
#       logs under $OUT (or ./tp_gpu_check_out), summary last.
#
# What it shows: two processes (one per GPU) rendezvous through the control
# plane, all-reduce / broadcast / barrier give the right values, the bus
# bandwidth of a 256 MiB all-reduce, and that a peer that leaves makes the
# survivor's next all-reduce fail within the communicator's timeout (10 s)
# instead of hanging. NCCL_NVLS_ENABLE=0 (no NVLink multicast on shared hosts).
set -uo pipefail

BUNDLE=.gpu_bundle/tp
BINARIES=(worker_collectives_nccl_test)
# Present on the GPU machines (shared/BUILD-NOTES.md) or part of the driver / CUDA.
SYSTEM_LIBS='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+|libgcc_s|libgomp|libopenblas|libcuda|libcudart|libcublas|libnccl|libssl|libcrypto|libz\.|libprotobuf\.)'

bundle() {
  local build=$1
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
  for b in "${BINARIES[@]}"; do
    local path
    path=$(find "$build" -type f -name "$b" -perm -u+x | head -1)
    [[ -n $path ]] || { echo "missing $b under $build (configure with CUDA and build it)" >&2; exit 1; }
    cp "$path" "$BUNDLE/" && strip "$BUNDLE/$b"
    ldd "$path" | awk '/=> \// {print $1, $3}' | while read -r name lib; do
      [[ $name =~ $SYSTEM_LIBS ]] && continue
      cp -Ln "$lib" "$BUNDLE/" 2>/dev/null || true
    done
  done
  strip --strip-unneeded "$BUNDLE"/*.so* 2>/dev/null || true
  cp worker/tp_gpu_check.sh "$BUNDLE/"
  du -sh "$BUNDLE"
}

run() {
  local out=${OUT:-tp_gpu_check_out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH="$PWD/$BUNDLE:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  export NCCL_NVLS_ENABLE=0
  nvidia-smi -L > "$out/nvidia_smi.txt" 2>&1
  cat "$out/nvidia_smi.txt"
  local gpus
  gpus=$(grep -c '^GPU ' "$out/nvidia_smi.txt")
  [[ $gpus -ge 2 ]] || echo "warning: $gpus GPU(s); the tests will skip (they need 2)"
  if ldd "$BUNDLE/worker_collectives_nccl_test" | grep -q 'not found'; then
    ldd "$BUNDLE/worker_collectives_nccl_test" | grep 'not found'
    echo "missing libraries: rebuild the bundle" >&2
    exit 1
  fi
  echo "== NCCL collectives test"
  timeout 600 "$BUNDLE/worker_collectives_nccl_test" > "$out/nccl_test.log" 2>&1
  local rc=$?
  grep -E 'rank [01]:|^\[ +(OK|FAILED|SKIPPED) +\]|^\[  (PASSED|FAILED|SKIPPED) ' "$out/nccl_test.log"
  echo "rc: nccl_test=$rc"
  return $rc
}

case "${1:-}" in
  bundle) bundle "${2:?build dir}" ;;
  run) run ;;
  *) echo "usage: $0 bundle BUILD_DIR | run" >&2; exit 2 ;;
esac
