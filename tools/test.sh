#!/usr/bin/env bash
# Sets up, builds and runs every test: CMake/CTest, then Bazel (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
start=$(date +%s)
tools/build.sh
echo "test: CMake build done in $(( $(date +%s) - start )) s"
ctest --test-dir "${STRATA_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" --timeout 900
if [[ -x bazel/test.sh ]]; then
  bazel/test.sh
fi
echo "test: all done in $(( $(date +%s) - start )) s"
