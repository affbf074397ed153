#!/usr/bin/env bash
# Sets up, builds, starts `strata serve` on the default model (stories15M from
# ../shared/data unless --model or STRATA_MODEL says otherwise), answers one
# request through the gRPC client (`strata generate --server`), and stops the
# server cleanly (SIGTERM, then waits for it to exit).
#
#   tools/run_default.sh [--model DIR] [strata generate flags...]
#   tools/run_default.sh --prompt "Once upon a time" --max-tokens 40
#
# The server listens on 127.0.0.1 on a free port; its log is printed if it
# fails. Set STRATA_BUILD_DIR to build elsewhere than build/.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${STRATA_MODEL:-../shared/data/models/stories15M}"
client_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --model=*) model="${1#--model=}"; shift ;;
    *) client_args+=("$1"); shift ;;
  esac
done

tools/setup.sh
tools/build.sh --target strata
strata="${STRATA_BUILD_DIR:-build}/scheduler/strata"

log_dir="$(mktemp -d)"
"$strata" serve --model "$model" --host 127.0.0.1 --port 0 \
  --kv-cache-memory 0.5 --swap-space 0.25 >"$log_dir/serve.out" 2>"$log_dir/serve.err" &
server_pid=$!
stop_server() {
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || { echo "run_default: strata serve exited with $?" >&2; return 1; }
  fi
}
trap 'stop_server || true; rm -rf "$log_dir"' EXIT

# `strata serve` prints "strata serve: ready on HOST:PORT" once the model is loaded.
address=""
for _ in $(seq 1 600); do
  address="$(sed -n 's/^strata serve: ready on //p' "$log_dir/serve.out")"
  [[ -n "$address" ]] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run_default: strata serve failed to start:" >&2
    cat "$log_dir/serve.err" >&2
    exit 1
  fi
  sleep 0.2
done
if [[ -z "$address" ]]; then
  echo "run_default: strata serve not ready after 120 s" >&2
  cat "$log_dir/serve.err" >&2
  exit 1
fi
echo "run_default: strata serve ready on $address (model $model)" >&2

"$strata" generate --server "$address" "${client_args[@]}"
stop_server
trap 'rm -rf "$log_dir"' EXIT
echo "run_default: server stopped" >&2
