#!/usr/bin/env bash
# End-to-end test of strata-serving-bench (registered with CTest by bench/serving_bench.cmake):
# starts `strata serve --device cpu` on stories15M with a metrics port, runs a fixed workload
# (16 prompts, 32 in / 48 out, concurrency 4) and a short clipped ShareGPT-like Poisson run,
# checks the result JSON, renders both with tools/bench_report.py, and checks that bad flags
# are refused with exit code 2 and a message naming the flag.
#
# Usage: serving_bench_test.sh STRATA_BIN BENCH_BIN
# Environment: STRATA_DATA_DIR (default ../shared/data), STRATA_SOURCE_DIR (default: this
# script's repository).
set -euo pipefail

STRATA=${1:?usage: serving_bench_test.sh STRATA_BIN BENCH_BIN}
BENCH=${2:?usage: serving_bench_test.sh STRATA_BIN BENCH_BIN}
SRC=${STRATA_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
DATA=${STRATA_DATA_DIR:-$SRC/../shared/data}
PY=/usr/bin/python3
MODEL=$DATA/models/stories15M

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

[[ -d $MODEL ]] || fail "no model at $MODEL (set STRATA_DATA_DIR)"
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- bad flags: exit code 2 and a message naming the flag, before any connection ------------
expect_usage_error() {
  local want=$1
  shift
  local rc=0
  "$BENCH" "$@" >"$TMP/out" 2>"$TMP/err" || rc=$?
  [[ $rc -eq 2 ]] || fail "'$*' exited $rc, want 2: $(cat "$TMP/err")"
  grep -q -- "$want" "$TMP/err" || fail "'$*': stderr lacks '$want': $(cat "$TMP/err")"
}
expect_usage_error "--server is required" --workload fixed
expect_usage_error "--workload must be" --server 127.0.0.1:1 --workload nope
expect_usage_error "needs --input-len and --output-len" --server 127.0.0.1:1 --workload fixed
expect_usage_error "only apply to --workload fixed" --server 127.0.0.1:1 --input-len 5
expect_usage_error "--request-rate must be" --server 127.0.0.1:1 --request-rate 0
expect_usage_error "--request-rate must be" --server 127.0.0.1:1 --request-rate fast
expect_usage_error "--num-prompts must be" --server 127.0.0.1:1 --num-prompts 0
expect_usage_error "--concurrency must be" --server 127.0.0.1:1 --concurrency -1
expect_usage_error "must start with http://" --server 127.0.0.1:1 --metrics-url localhost:9400
expect_usage_error "not expected" --server 127.0.0.1:1 --bogus-flag
# An unreachable server is a setup error (1), not a hang.
rc=0
"$BENCH" --server 127.0.0.1:1 --wait-ready 1 >/dev/null 2>"$TMP/err" || rc=$?
[[ $rc -eq 1 ]] || fail "unreachable server: exit $rc, want 1"
grep -q UNAVAILABLE "$TMP/err" || fail "unreachable server: $(cat "$TMP/err")"

# --- a CPU server on stories15M ---------------------------------------------------------------
METRICS_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$STRATA" serve --model "$MODEL" --device cpu --host 127.0.0.1 --port 0 \
  --metrics-port "$METRICS_PORT" --kv-cache-memory 0.125 --swap-space 0.0625 \
  >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
ADDR=
for _ in $(seq 600); do
  ADDR=$(sed -n 's/^strata serve: ready on //p' "$TMP/server.log")
  [[ -n $ADDR ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited: $(cat "$TMP/server.log")"
  sleep 0.1
done
[[ -n $ADDR ]] || fail "server not ready after 60 s: $(cat "$TMP/server.log")"
echo "server ready on $ADDR, metrics on port $METRICS_PORT"

# --- fixed workload at concurrency 4 -----------------------------------------------------------
# 48 output tokens make the run last ~1 s on the CPU, many metric polls long: with 8 (a
# 0.2 s run) a loaded 2-core machine once polled only before and after the requests ran.
"$BENCH" --server "$ADDR" --workload fixed --input-len 32 --output-len 48 --num-prompts 16 \
  --concurrency 4 --seed 7 --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
  --metrics-interval 0.05 --label cpu-fixed --output "$TMP/fixed.json" | tee "$TMP/fixed.txt" ||
  fail "fixed run exited $?"
grep -q "Successful requests: *16" "$TMP/fixed.txt" || fail "summary: $(cat "$TMP/fixed.txt")"

"$PY" - "$TMP/fixed.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
res, b, mon, info = r["results"], r["benchmark"], r["server"]["monitor"], r["server"]["model_info"]
def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")
check(res["completed"] == 16 and res["failed"] == 0, f"completed/failed {res['completed']}/{res['failed']}")
check(res["failures"] == {}, f"failures {res['failures']}")
check(len(res["requests"]) == 16, "16 per-request records")
check(all(q["output_tokens"] == 48 and q["input_len"] == 32 and q["status"] == "OK"
          for q in res["requests"]), "every request: 32 in, 48 out, OK")
check(res["output_length_mismatches"] == 0, "usage.completion_tokens matches the stream")
check(res["total_output_tokens"] == 768 and res["total_input_tokens"] == 512, "token totals")
for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
    s = res[key]
    check(all(isinstance(s[p], (int, float)) and s[p] >= 0 for p in ("mean", "p50", "p90", "p99")),
          f"{key} percentiles {s}")
    check(s["p50"] <= s["p90"] <= s["p99"] <= s["max"], f"{key} ordered {s}")
check(res["ttft_ms"]["count"] == 16 and res["tpot_ms"]["count"] == 16, "TTFT/TPOT per request")
check(res["e2e_ms"]["p50"] >= res["ttft_ms"]["p50"], "e2e >= ttft")
check(res["request_throughput"] > 0 and res["output_throughput"] > 0
      and res["total_token_throughput"] > res["output_throughput"], "throughputs")
check(b["workload"] == "fixed" and b["concurrency"] == 4 and b["request_rate"] == "inf", "benchmark block")
check(b["clipped_requests"] == 0, "no clipping at 80 tokens")
check(info["kv_cache_dtype"] and info["tp_size"] == 1 and info["gpu_blocks"]["total"] > 0, f"model_info {info}")
check(0 < mon["peak_kv_usage_gpu"] <= 1, f"peak KV usage {mon['peak_kv_usage_gpu']}")
check(1 <= mon["peak_num_running"] <= 4, f"peak running {mon['peak_num_running']} with concurrency 4")
check(mon["preemptions"] == 0, f"preemptions {mon['preemptions']}")
check(mon["scrape_errors"] == 0 and mon["scrapes"] >= 1, f"scrapes {mon['scrapes']}/{mon['scrape_errors']}")
deltas = mon["counter_deltas"]
check(deltas.get("strata_generation_tokens_total") == 768, f"server counted 768 generated tokens: {deltas}")
check(deltas.get('strata_requests_total{outcome="length"}') == 16, f"16 finished by length: {deltas}")
check(r["command"][0].endswith("strata-serving-bench") and r["date"].endswith("Z"), "command and date")
print("fixed run: OK")
EOF

# --- ShareGPT-like lengths clipped to the model's context, Poisson arrivals ---------------------
"$BENCH" --server "$ADDR" --workload sharegpt --num-prompts 6 --request-rate 40 --seed 1 \
  --output "$TMP/sharegpt.json" >/dev/null || fail "sharegpt run exited $?"
"$PY" - "$TMP/sharegpt.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
res, b = r["results"], r["benchmark"]
ctx = b["max_context"]
if res["completed"] != 6 or res["failed"] != 0:
    sys.exit(f"FAIL: sharegpt completed/failed {res['completed']}/{res['failed']}")
for q in res["requests"]:
    if q["input_len"] + q["max_tokens"] > ctx or q["output_tokens"] != q["max_tokens"]:
        sys.exit(f"FAIL: request {q} does not fit the context {ctx} or its length is not exact")
sends = [q["send_s"] for q in res["requests"]]
if sends != sorted(sends) or sends[-1] <= 0:
    sys.exit(f"FAIL: Poisson arrivals should be spread out in order: {sends}")
if r["server"]["monitor"]["preemptions"] is not None:
    sys.exit("FAIL: preemptions must be null without --metrics-url")
print(f"sharegpt run: OK ({b['clipped_requests']} of 6 clipped to {ctx})")
EOF

# --- the report ---------------------------------------------------------------------------------
"$PY" "$SRC/tools/bench_report.py" "$TMP/fixed.json" "$TMP/sharegpt.json" \
  --markdown "$TMP/report.md" --plot "$TMP/report.png" | tee "$TMP/report.out"
grep -q "| cpu-fixed |" "$TMP/report.md" || fail "report lacks the cpu-fixed row: $(cat "$TMP/report.md")"
[[ $(grep -c '^| ' "$TMP/report.md") -eq 4 ]] || fail "report: header + separator + 2 rows: $(cat "$TMP/report.md")"
if "$PY" -c 'import matplotlib' 2>/dev/null; then
  [[ -s $TMP/report.png ]] || fail "matplotlib present but no plot"
else
  grep -q "matplotlib" "$TMP/report.out" || fail "no message about the skipped plot"
fi
# A malformed input is refused with a message, not a traceback.
echo '{"not": "a result"}' >"$TMP/bad.json"
rc=0
"$PY" "$SRC/tools/bench_report.py" "$TMP/bad.json" >/dev/null 2>"$TMP/err" || rc=$?
[[ $rc -eq 2 ]] && grep -q "bad.json" "$TMP/err" || fail "bench_report on a bad file: rc $rc: $(cat "$TMP/err")"

echo "serving_bench_test: OK"
