#!/usr/bin/env bash
# Packs FlashInfer (and the few pure-python packages its import / JIT path
# needs) into .peer/flashinfer.tar.xz for bench/peer_flashinfer.py, for a GPU
# machine that has no network: Python 3.12, torch 2.11 (CUDA 13 build), numpy,
# nvcc 13.0 at /usr/local/cuda, sm_90. Idempotent: downloaded wheels are kept
# in $FI_PACK_WORK and the tarball is rebuilt from them with fixed names, owners
# and mtimes.
#
#   tools/flashinfer_pack.sh                      # -> .peer/flashinfer.tar.xz
#   tools/flashinfer_pack.sh --verify-jit PYTHON  # also import flashinfer from the
#       unpacked tarball with PYTHON (one that has torch 2.11) and JIT-compile the
#       three batch paged decode modules with the local nvcc for sm_90a (no GPU needed)
#
# On the GPU machine (carry .peer/flashinfer.tar.xz, ~14 MiB):
#   mkdir -p /tmp/fi && tar xJf .peer/flashinfer.tar.xz -C /tmp/fi
#   python3 bench/peer_flashinfer.py --fi-root /tmp/fi --json /tmp/peer_flashinfer.json
# --fi-root puts /tmp/fi/site first on sys.path, /tmp/fi/fallback last (so the
# machine's own requests/packaging/tqdm/... win) and /tmp/fi/bin on PATH (ninja).
# By hand instead:
#   PATH=/tmp/fi/bin:$PATH PYTHONPATH=/tmp/fi/site:/tmp/fi/fallback python3 ...
#
# Tarball layout:
#   site/      flashinfer (pruned, see below) and tvm_ffi (apache-tvm-ffi, its
#              C++ ABI layer: the JIT modules are built against its headers and
#              libtvm_ffi.so, not against torch's C++ API)
#   fallback/  einops, click, tabulate, nvidia-ml-py (pynvml), packaging, tqdm,
#              requests (+ urllib3, idna, certifi, charset_normalizer): all
#              imported by `import flashinfer`
#   bin/ninja  the ninja executable from the ninja wheel (flashinfer's JIT
#              runs `ninja` from PATH)
#
# Version: flashinfer-python 0.7.2.post1, the newest release when this was
# written. It lists CUDA 13.0 among its supported toolkits, builds its JIT
# modules through apache-tvm-ffi (so no dependence on torch's C++ ABI: torch
# 2.11 is used only from Python), and it was checked here that (a) `import
# flashinfer` works with torch 2.11.0+cu130 and only the packages above, without
# its heavier optional requirements (cuda-tile, cutlass-dsl, cudnn-frontend,
# nccl4py: those back other backends), and (b) its batch decode JIT modules
# (fp16 q, fp16 / e4m3 / e5m2 KV, head_dim 128, int32 indices) compile with
# nvcc 13.0.88 for sm_90a from the pruned tree (--verify-jit).
#
# Pruned from the ~330 MB unpacked wheel (a 62 MB download; the wheel has no
# prebuilt cubins, its bulk is kernel sources):
#   flashinfer/data/cutlass/*      all but include/ and tools/util/include (the
#                                  two dirs jit/env.py adds): examples, python,
#                                  tests, docs. The CUDA-core decode module does
#                                  not include CUTLASS at all, but the headers
#                                  cost ~1 MB compressed and keep the tensor-core
#                                  (prefill-kernel) decode path buildable
#   flashinfer/data/csrc/*/        sources of other kernel families (MoE, GEMM,
#                                  MLA, trtllm, sampling, ...); the top-level
#                                  csrc files (batch_decode*.cu, the jinja
#                                  templates, tvm_ffi_utils.h, ...) are kept
#   flashinfer/data/cccl/*         all but the three include trees that
#                                  flashinfer/jit/env.py puts on the include path
#                                  (libcudacxx/include, cub/cub, thrust/thrust)
#   tvm_ffi/3rdparty, tvm_ffi/src: C++ sources (headers stay in tvm_ffi/include;
#                                  core.so links lib/libtvm_ffi_testing.so, kept)
# The decode module's actual header set (from ninja's deps log): data/include/
# flashinfer, data/csrc/tvm_ffi_utils.h, data/cccl/libcudacxx/include, tvm_ffi
# headers, the CUDA toolkit's headers. Kept whole: data/include, data/spdlog, and
# every .py file (the package's __init__ imports most submodules).
set -euo pipefail

FI_VERSION="0.7.2.post1"
TVM_FFI_SPEC="apache-tvm-ffi==0.1.15.post2"
NINJA_SPEC="ninja==1.13.2"
FALLBACK_SPECS=(einops==0.8.2 click==8.5.1 tabulate==0.10.0 nvidia-ml-py==13.615.71
  packaging==26.4 tqdm==4.70.1 requests==2.34.2 urllib3==2.8.0 idna==3.20
  certifi==2026.10.19.post1 charset-normalizer==3.5.3)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${ROOT}/.peer"
OUT="${OUT_DIR}/flashinfer.tar.xz"
WORK="${FI_PACK_WORK:-/tmp/flashinfer_pack}"
WHEELS="${WORK}/wheels"
STAGE="${WORK}/stage"
MAX_MIB=45

VERIFY_PY=""
if [[ "${1:-}" == "--verify-jit" ]]; then
  VERIFY_PY="${2:?--verify-jit needs a python executable that has torch}"
fi

PY="${PYTHON:-python3}"
log() { echo "flashinfer_pack: $*" >&2; }

# 1. Wheels for CPython 3.12 / manylinux x86_64 (the GPU machine), whatever the
#    local Python is. A wheel already in $WHEELS is reused.
mkdir -p "$WHEELS"
fetch() {
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$@"
}
log "downloading wheels into $WHEELS (cached ones are reused)"
fetch "flashinfer-python==${FI_VERSION}" "$TVM_FFI_SPEC" "$NINJA_SPEC" "${FALLBACK_SPECS[@]}"

# 2. Unpack into a fresh staging tree.
rm -rf "$STAGE"
mkdir -p "$STAGE/site" "$STAGE/fallback" "$STAGE/bin"
unpack() {  # unpack DEST WHEEL-GLOB
  local dest="$1" whl
  whl="$(compgen -G "${WHEELS}/$2" | sort | tail -n 1 || true)"
  [[ -n "$whl" ]] || { log "no wheel matches $2 in $WHEELS"; exit 1; }
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$dest"
}
unpack "$STAGE/site" "flashinfer_python-${FI_VERSION}-*.whl"
unpack "$STAGE/site" "apache_tvm_ffi-*-cp312-*.whl"
for spec in "${FALLBACK_SPECS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  unpack "$STAGE/fallback" "${name//-/_}-${ver}-*.whl"
done
tmp_ninja="${WORK}/ninja_wheel"
rm -rf "$tmp_ninja" && mkdir -p "$tmp_ninja"
unpack "$tmp_ninja" "ninja-${NINJA_SPEC##*==}-*.whl"
ninja_bin="$(find "$tmp_ninja" -type f -name ninja -path '*/scripts/*' | head -n 1)"
[[ -n "$ninja_bin" ]] || ninja_bin="$(find "$tmp_ninja" -type f -name ninja -path '*/bin/*' | head -n 1)"
[[ -n "$ninja_bin" ]] || { log "no ninja executable in the ninja wheel"; exit 1; }
install -m 0755 "$ninja_bin" "$STAGE/bin/ninja"
rm -rf "$tmp_ninja"

# 3. Prune (see the header comment for why each part can go).
FI="$STAGE/site/flashinfer"
D="$FI/data"
[[ -d "$D/csrc" && -d "$D/include/flashinfer" ]] || { log "unexpected wheel layout under $D"; exit 1; }
keep_cutlass="$WORK/cutlass_keep"
rm -rf "$keep_cutlass" && mkdir -p "$keep_cutlass/tools/util"
mv "$D/cutlass/include" "$keep_cutlass/"
mv "$D/cutlass/tools/util/include" "$keep_cutlass/tools/util/"
[[ -f "$D/cutlass/LICENSE.txt" ]] && mv "$D/cutlass/LICENSE.txt" "$keep_cutlass/"
rm -rf "$D/cutlass" && mv "$keep_cutlass" "$D/cutlass"
find "$D/csrc" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
keep_cccl="$WORK/cccl_keep"
rm -rf "$keep_cccl" && mkdir -p "$keep_cccl/cub" "$keep_cccl/thrust" "$keep_cccl/libcudacxx"
mv "$D/cccl/cub/cub" "$keep_cccl/cub/"
mv "$D/cccl/thrust/thrust" "$keep_cccl/thrust/"
mv "$D/cccl/libcudacxx/include" "$keep_cccl/libcudacxx/"
for f in LICENSE README.md; do [[ -f "$D/cccl/$f" ]] && mv "$D/cccl/$f" "$keep_cccl/"; done
rm -rf "$D/cccl" && mv "$keep_cccl" "$D/cccl"
TVM="$STAGE/site/tvm_ffi"
rm -rf "$TVM/3rdparty" "$TVM/src"
find "$STAGE" -name '__pycache__' -type d -prune -exec rm -rf {} +

# 4. Check the staged tree has what the decode path needs.
need=(
  site/flashinfer/__init__.py site/flashinfer/decode.py site/flashinfer/jit/core.py
  site/flashinfer/jit/attention/modules.py
  site/flashinfer/data/csrc/batch_decode.cu site/flashinfer/data/csrc/batch_decode_jit_binding.cu
  site/flashinfer/data/csrc/batch_decode_kernel_inst.jinja
  site/flashinfer/data/csrc/batch_decode_customize_config.jinja
  site/flashinfer/data/csrc/tvm_ffi_utils.h
  site/flashinfer/data/include/flashinfer/attention/decode.cuh
  site/flashinfer/data/include/flashinfer/attention/variants.cuh
  site/flashinfer/data/cccl/libcudacxx/include/cuda/std/cstdint
  site/tvm_ffi/__init__.py site/tvm_ffi/lib/libtvm_ffi.so site/tvm_ffi/include/tvm/ffi/function.h
  site/tvm_ffi/include/dlpack/dlpack.h
  fallback/einops/__init__.py fallback/requests/__init__.py fallback/pynvml.py
)
for f in "${need[@]}"; do
  [[ -e "$STAGE/$f" ]] || { log "missing after pruning: $f"; exit 1; }
done
"$STAGE/bin/ninja" --version >/dev/null || { log "bin/ninja does not run"; exit 1; }

# 5. Tarball: sorted names, fixed owner and mtime, single-threaded xz -9.
mkdir -p "$OUT_DIR"
tar -C "$STAGE" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  -cf - site fallback bin | xz -9 -T1 > "${OUT}.tmp"
mv "${OUT}.tmp" "$OUT"
bytes=$(stat -c %s "$OUT")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
log "wrote $OUT: $bytes bytes ($mib MiB), unpacked $(du -sh "$STAGE" | cut -f1)"
if (( bytes > MAX_MIB * 1048576 )); then
  log "tarball exceeds ${MAX_MIB} MiB"
  exit 1
fi

# 6. Unpack the tarball itself and check it.
check="$WORK/check"
rm -rf "$check" && mkdir -p "$check"
tar xJf "$OUT" -C "$check"
for f in "${need[@]}"; do
  [[ -e "$check/$f" ]] || { log "missing in tarball: $f"; exit 1; }
done
"$check/bin/ninja" --version >/dev/null
log "tarball unpacks; decode sources, headers, tvm_ffi and bin/ninja present"

# 7. Optional: import flashinfer from the unpacked tarball and JIT-compile the
#    decode modules (nvcc only; no GPU). Needs a Python 3.12 with torch.
if [[ -n "$VERIFY_PY" ]]; then
  log "JIT-compiling the batch decode modules with $VERIFY_PY (sm_90a)"
  rm -rf "$WORK/jit_ws"
  PATH="$check/bin:$PATH" PYTHONPATH="$check/site:$check/fallback" \
  FLASHINFER_CUDA_ARCH_LIST=9.0 FLASHINFER_WORKSPACE_BASE="$WORK/jit_ws" \
  "$VERIFY_PY" - <<'EOF'
import time
import torch
import flashinfer
from flashinfer.jit.attention.modules import gen_batch_decode_module
print("flashinfer", flashinfer.__version__, "from", flashinfer.__file__, "torch", torch.__version__)
for kv in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
    spec = gen_batch_decode_module(torch.float16, kv, torch.float16, torch.int32,
                                   128, 128, 0, False, False)
    t = time.time()
    spec.build()
    print(f"built {spec.name} in {time.time() - t:.1f} s")
EOF
fi
echo "$OUT"
