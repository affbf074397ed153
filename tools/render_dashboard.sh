#!/usr/bin/env bash
# Renders docs/dashboard.png: runs the Prometheus end-to-end test against a real
# `strata serve --device cpu` (tests/deploy/prometheus_e2e.sh), keeps every dashboard panel's
# range query, and draws the panels with deploy/grafana/plot_dashboard.py (matplotlib).
#
#   tools/render_dashboard.sh [OUT.png]      # default docs/dashboard.png
#
# Needs a built strata and the packages of the e2e test plus python3-matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/dashboard.png}"
dump="$(mktemp --suffix=.json)"
trap 'rm -f "$dump"' EXIT
# A little longer than the test's default so the panels show a few minutes' shape.
tests/deploy/prometheus_e2e.sh --dump-range "$dump" --traffic-seconds 40 \
  --serve-arg=--max-num-seqs=6 --serve-arg=--kv-cache-memory=0.004 --serve-arg=--swap-space=0.002
mkdir -p "$(dirname "$out")"
/usr/bin/python3 deploy/grafana/plot_dashboard.py "$dump" "$out"
