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
# Longer than the test's default, more clients than the tiny KV pool holds (about 10 blocks of
# 16 tokens, swap space about as large), so the panels also show preemption and swap.
tests/deploy/prometheus_e2e.sh --dump-range "$dump" --traffic-seconds 45 --clients 8 \
  --serve-arg=--max-num-seqs=8 --serve-arg=--kv-cache-memory=0.002 --serve-arg=--swap-space=0.002 \
  --serve-arg=--preemption-mode=swap
mkdir -p "$(dirname "$out")"
/usr/bin/python3 deploy/grafana/plot_dashboard.py "$dump" "$out"
