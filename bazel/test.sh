#!/usr/bin/env bash
# Builds and runs every Bazel test with no network: what CI calls
# (tools/test.sh runs it after CTest). Exits non-zero on any failure.
#
#   bazel/test.sh                    # bazel test //...
#   bazel/test.sh //runtime/...      # other targets / extra flags
#
# Offline is proved, not assumed: when `unshare -n` works (root, or user
# namespaces) the whole run happens in a fresh network namespace with only
# loopback up (the Bazel client talks to its server over 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)

if [[ -z ${STRATA_BAZEL_NETNS:-} ]] && unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  export STRATA_BAZEL_NETNS=1
  exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "$root/bazel/test.sh" "$@"
fi
if [[ -n ${STRATA_BAZEL_NETNS:-} ]]; then
  echo "bazel/test.sh: offline (network namespace with loopback only)"
else
  echo "bazel/test.sh: unshare -n unavailable; running without network isolation"
fi

# The same environment CMake's strata_cc_test() gives tests.
data_dir=${STRATA_DATA_DIR:-$(realpath -m "$root/../shared/data")}
# Optional fixtures the tests look up themselves, as under CTest: the
# SmolLM2 GGUF (tools/fetch_smollm2.sh, under $HOME/.cache/strata unless
# STRATA_MODEL_CACHE / STRATA_SMOLLM2_GGUF say otherwise) and the reference
# Python venv (STRATA_REF_VENV / STRATA_REF_PYTHON). Bazel would otherwise
# set HOME to the test's temporary directory and those tests would skip.
passthrough=(HOME STRATA_MODEL_CACHE STRATA_SMOLLM2_GGUF STRATA_REF_PYTHON STRATA_REF_VENV)
model_cache=${STRATA_MODEL_CACHE:-${HOME:-/nonexistent}/.cache/strata/models}
# Test results are cached, and the fixtures live outside the workspace where
# Bazel cannot see them change: fold their listing (names, sizes, mtimes) into
# the test environment so a changed fixture re-runs the tests.
data_stamp=$(find -L "$data_dir" "$model_cache" ${STRATA_SMOLLM2_GGUF:+"$STRATA_SMOLLM2_GGUF"} \
                  -type f -printf '%p %s %T@\n' 2>/dev/null | sort | sha256sum | cut -c1-16)

bazel_flags=(--jobs=2 --local_cpu_resources=2)
# A server left from a run in another network namespace cannot be reached
# from this one; keep the one started here from lingering.
startup_flags=()
if [[ -n ${STRATA_BAZEL_NETNS:-} ]]; then startup_flags=(--max_idle_secs=15); fi

# Layering (STYLE.md rule 1): visibility stops direct edges; this stops
# transitive ones too. Each query must come back empty.
check_layering() {
  local lower=$1 higher=$2 bad err
  err=$(mktemp)
  bad=$(bazel "${startup_flags[@]}" query --noshow_progress \
        "kind(rule, deps($lower) intersect ($higher))" 2>"$err") || {
    cat "$err" >&2
    rm -f "$err"
    echo "bazel/test.sh: bazel query failed for deps($lower)" >&2
    return 1
  }
  rm -f "$err"
  if [[ -n $bad ]]; then
    echo "bazel/test.sh: layering violation: $lower depends on:" >&2
    echo "$bad" >&2
    return 1
  fi
}
check_layering //proto/... "//runtime/... + //kernels/... + //worker/... + //scheduler/..."
check_layering //runtime/... "//kernels/... + //worker/... + //scheduler/..."
check_layering //kernels/... "//proto/... + //worker/... + //scheduler/..."
check_layering //worker/... "//scheduler/..."

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then targets=(//...); fi
exec bazel "${startup_flags[@]}" test "${bazel_flags[@]}" \
  --test_output=errors \
  --test_env=STRATA_DATA_DIR="$data_dir" \
  --test_env=STRATA_SOURCE_DIR="$root" \
  --test_env=STRATA_BINARY_DIR="$root/bazel-bin" \
  --test_env=STRATA_DATA_STAMP="$data_stamp" \
  "${passthrough[@]/#/--test_env=}" \
  "${targets[@]}"
