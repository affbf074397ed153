#!/usr/bin/env bash
# The Prometheus end-to-end test as one command (see tests/deploy/prometheus_e2e.py):
# `strata serve --device cpu` + Debian's prometheus on loopback, traffic, every dashboard and
# rule expression evaluated. Needs a built strata (STRATA_BIN, default
# $STRATA_BUILD_DIR/scheduler/strata) and the packages prometheus, python3-grpcio,
# python3-grpc-tools, python3-yaml.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR="${STRATA_BUILD_DIR:-build}"
if [[ -z "${STRATA_BIN:-}" ]]; then
  for b in "$BUILD_DIR/scheduler/strata" "$BUILD_DIR/strata"; do
    if [[ -x "$b" ]]; then STRATA_BIN=$b; break; fi
  done
fi
exec /usr/bin/python3 tests/deploy/prometheus_e2e.py --strata "${STRATA_BIN:-$BUILD_DIR/scheduler/strata}" "$@"
