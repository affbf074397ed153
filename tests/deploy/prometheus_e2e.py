#!/usr/bin/python3
"""End-to-end check of Strata's metrics, dashboard and rules against a real Prometheus.

Starts `strata serve --device cpu` on stories15M and Debian's `prometheus` server on loopback
(1 s scrape and rule evaluation), drives a bounded amount of traffic through the public gRPC API
(streaming and unary Generate, shared prompt prefixes, a cancelled stream, an invalid request),
then evaluates through Prometheus' HTTP API:

* every target expression of deploy/grafana/strata-dashboard.json, with the template variables
  resolved the way Grafana resolves them (label_values on strata_model_info) — each must succeed
  and return data;
* every rule of deploy/prometheus/strata-rules.yml: Prometheus must report it healthy; recording
  rules must have produced series; an alert expression must evaluate, and with its numeric
  thresholds opened (`> 5` -> `> -Inf`) must return data, i.e. it watches series that exist and
  its joins match;
* `promtool check config` on the generated config and `promtool check rules`;
* /metrics serves exactly the names documented in deploy/METRICS.md.

Loopback only, bounded (about 60 s; hard limit --timeout), and everything it started is killed on
exit (also on SIGINT/SIGTERM). Exit status 0 = pass. Prints 'N passed, N failed' at the end.

    /usr/bin/python3 tests/deploy/prometheus_e2e.py [--strata build/strata] [--model DIR]
        [--dump-range FILE]   # also save each panel's range query (for tools/render_dashboard.sh)

Needs: Debian packages prometheus (prometheus + promtool), protobuf-compiler (protoc),
python3-protobuf, python3-grpcio, python3-yaml.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/strata-dashboard.json"
RULES = ROOT / "deploy/prometheus/strata-rules.yml"
PROTO = ROOT / "proto/strata_v1_generation.proto"
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval gives for a 1 s scrape (>= 4 scrapes)
JOB = "strata"

CHILDREN = []  # Popen objects started here, killed in cleanup()
STOP_TRAFFIC = threading.Event()  # set in cleanup(): client threads end with the test


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, logfile):
    log("start: " + " ".join(str(c) for c in cmd))
    p = subprocess.Popen([str(c) for c in cmd], stdout=logfile, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    CHILDREN.append(p)
    return p


def cleanup():
    STOP_TRAFFIC.set()
    for p in reversed(CHILDREN):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: only what it started
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    for p in reversed(CHILDREN):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    CHILDREN.clear()


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
            log(f"FAIL {what}" + (f": {detail}" if detail else ""))
        return ok


# ---------------------------------------------------------------- Prometheus HTTP API

class Prom:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path, **params):
        url = self.base + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a PromQL error, body is JSON
            return json.load(e)

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)

    def query_range(self, expr, start, end, step):
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def ready(self):
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False


# ---------------------------------------------------------------- gRPC client (public API)

def grpc_client(tmp, port):
    """Generated strata.v1 messages + a channel; services are called by method path."""
    import grpc
    out = tmp / "py"
    out.mkdir()
    subprocess.run(["protoc", f"-I{PROTO.parent}",
                    f"--python_out={out}", PROTO.name], check=True, cwd=PROTO.parent)
    sys.path.insert(0, str(out))
    import strata_v1_generation_pb2 as pb  # noqa: E402 (generated just above)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return grpc, pb, channel


def health_status(grpc, channel, service=""):
    """grpc.health.v1.Health/Check, messages encoded by hand (one string / one enum field)."""
    name = service.encode()
    req = (b"\x0a" + bytes([len(name)]) + name) if name else b""
    call = channel.unary_unary("/grpc.health.v1.Health/Check",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        resp = call(req, timeout=2)
    except grpc.RpcError as e:
        return f"rpc error {e.code().name}"
    # HealthCheckResponse{status = 1}: SERVING = 1, NOT_SERVING = 2; absent field = UNKNOWN.
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}.get(resp, f"other {resp!r}")


PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside",
    "Once upon a time, there was a little girl named Lily. She had a red ball",
    "Once upon a time, there was a big dog named Max. Max liked to run in the park",
    "One day, a boy named Tom went to the beach with his mom and dad",
    "The sun was shining and the birds were singing. Sue wanted to",
]


class Traffic:
    """Bounded load: a few client threads, each request bounded by max_tokens and a deadline."""

    def __init__(self, grpc, pb, channel, threads=4, deadline_s=45.0):
        self.grpc, self.pb, self.channel = grpc, pb, channel
        self.stop = STOP_TRAFFIC
        self.deadline = time.time() + deadline_s
        self.counts = {}
        self.lock = threading.Lock()
        self.unary = channel.unary_unary("/strata.v1.Generation/GenerateUnary",
                                         request_serializer=pb.GenerateRequest.SerializeToString,
                                         response_deserializer=pb.GenerateResponse.FromString)
        self.stream = channel.unary_stream("/strata.v1.Generation/Generate",
                                           request_serializer=pb.GenerateRequest.SerializeToString,
                                           response_deserializer=pb.GenerateResponse.FromString)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._loop, i) for i in range(threads)]

    def _count(self, key):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def _request(self, rng, **sampling):
        req = self.pb.GenerateRequest(text=rng.choice(PROMPTS).encode(), request_id="e2e")
        req.sampling.max_tokens = sampling.get("max_tokens", rng.randint(8, 32))
        req.sampling.temperature = sampling.get("temperature", 0.8)
        req.sampling.seed = rng.randint(0, 1 << 30)
        return req

    def _once(self):
        """The outcomes that a healthy server produces rarely, each once, before the load."""
        rng = random.Random(-1)
        req = self._request(rng)
        req.sampling.top_p = 1.5  # malformed: rejected with INVALID_ARGUMENT
        try:
            self.unary(req, timeout=10)
            self._count("unexpected_ok")
        except self.grpc.RpcError as e:
            self._count(e.code().name.lower())
        call = self.stream(self._request(rng, max_tokens=64), timeout=30)
        try:  # a client that gives up mid-stream (outcome "cancelled")
            next(call)
            call.cancel()
            self._count("cancelled")
        except self.grpc.RpcError as e:
            self._count("error_" + e.code().name.lower())

    def _loop(self, i):
        rng = random.Random(i)
        if i == 0:
            self._once()
        n = 0
        while not self.stop.is_set() and time.time() < self.deadline and n < 2000:
            n += 1
            try:
                if n % 2:
                    for _ in self.stream(self._request(rng), timeout=30):
                        pass
                    self._count("ok_stream")
                else:
                    self.unary(self._request(rng), timeout=30)
                    self._count("ok_unary")
            except self.grpc.RpcError as e:
                self._count("error_" + e.code().name.lower())
                time.sleep(0.05)

    def finish(self):
        self.stop.set()
        for f in self.futures:
            f.result(timeout=60)
        self.pool.shutdown()
        return self.counts


# ---------------------------------------------------------------- expressions

def dashboard_targets(dash):
    def walk(panels):
        for p in panels:
            yield from walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    yield p["title"], t["refId"], t["expr"]
    return list(walk(dash["panels"]))


def promql_regex_escape(value):
    # Grafana escapes regex metacharacters in a variable's values; inside a PromQL double-quoted
    # string each backslash is doubled.
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value)


def substitute(expr, variables):
    for name, values in variables.items():
        expr = expr.replace(f"${name}", "|".join(promql_regex_escape(v) for v in values)
                            if values != [".*"] else ".*")
    return expr.replace("$__rate_interval", RATE_INTERVAL)


THRESHOLD = re.compile(r"(==|!=|>=|<=|>|<)\s*(-?\d[\d.]*(?:e[+-]?\d+)?)(?![\w.])")


def open_thresholds(expr):
    """`x > 0.95` -> `x > -Inf`: keeps every (non-NaN) sample the comparison would look at."""
    return THRESHOLD.sub("> -Inf", expr)


def has_data(resp):
    return resp.get("status") == "success" and len(resp["data"]["result"]) > 0


def has_numbers(resp):
    """Data with at least one sample that is a number (a panel would draw it), not NaN."""
    return has_data(resp) and any(r["value"][1] not in ("NaN", "+Inf", "-Inf")
                                  for r in resp["data"]["result"])


def load_rules():
    import yaml
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    return [(g["name"], r) for g in doc["groups"] for r in g["rules"]]


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strata", default=os.environ.get("STRATA_BIN",
                                                       str(ROOT / "build/scheduler/strata")))
    data = os.environ.get("STRATA_DATA_DIR") or str(ROOT.parent / "shared/data")
    ap.add_argument("--model", default=f"{data}/models/stories15M")
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    ap.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    ap.add_argument("--traffic-seconds", type=float, default=25.0)
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--timeout", type=float, default=110.0, help="hard limit for the whole test")
    ap.add_argument("--dump-range", help="write each panel's range query result (JSON) here")
    ap.add_argument("--keep-dir", help="keep logs and Prometheus data in this directory")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra flag for strata serve (repeatable)")
    args = ap.parse_args()

    t0 = time.time()
    res = Results()

    def stop(what, code):
        res.check(False, what)
        sys.exit(code)

    signal.signal(signal.SIGTERM, lambda *_: stop("interrupted (SIGTERM)", 143))
    signal.signal(signal.SIGALRM, lambda *_: stop(f"hard time limit ({args.timeout:.0f} s)", 124))
    signal.alarm(int(args.timeout))
    for tool in (args.strata, args.prometheus, args.promtool):
        if not os.access(tool, os.X_OK):
            log(f"missing executable {tool} (build strata; apt-get install prometheus)")
            print("0 passed, 1 failed")
            return 1
    if not os.path.isdir(args.model):
        log(f"missing model directory {args.model} (set STRATA_DATA_DIR)")
        print("0 passed, 1 failed")
        return 1

    tmp = pathlib.Path(args.keep_dir or tempfile.mkdtemp(prefix="strata-prom-e2e-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, tmp, res, t0)
    finally:
        cleanup()
        if not args.keep_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"done in {time.time() - t0:.1f} s")
        print(f"{res.passed} passed, {len(res.failed)} failed")


def run(args, tmp, res, t0):
    # --- static checks
    r = subprocess.run([args.promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    res.check(r.returncode == 0, "promtool check rules", r.stdout + r.stderr)

    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    config = tmp / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: {JOB}
    scrape_interval: 1s
    static_configs:
      - targets: ['127.0.0.1:{metrics_port}']
""")
    r = subprocess.run([args.promtool, "check", "config", str(config)], capture_output=True, text=True)
    res.check(r.returncode == 0, "promtool check config", r.stdout + r.stderr)

    # --- strata serve
    serve_log = open(tmp / "strata.log", "w")
    serve = start([args.strata, "serve", "--device", "cpu", "--model", args.model,
                   "--host", "127.0.0.1", "--port", grpc_port, "--metrics-port", metrics_port,
                   *args.serve_arg], serve_log)
    grpc, pb, channel = grpc_client(tmp, grpc_port)
    status = ""
    while time.time() - t0 < 40:
        if serve.poll() is not None:
            break
        status = health_status(grpc, channel)
        if status == "SERVING":
            break
        time.sleep(0.2)
    if not res.check(status == "SERVING", "strata serve becomes SERVING on grpc.health.v1",
                     f"last status {status!r}, exit {serve.poll()}; log:\n"
                     + (tmp / "strata.log").read_text()[-3000:]):
        return 1
    res.check(health_status(grpc, channel, "strata.v1.Generation") == "SERVING",
              "health of service strata.v1.Generation")
    log(f"strata serve is SERVING after {time.time() - t0:.1f} s")

    # --- prometheus
    prom_log = open(tmp / "prometheus.log", "w")
    start([args.prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h",
           "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent"],
          prom_log)
    prom = Prom(prom_port)
    while time.time() - t0 < 55 and not prom.ready():
        time.sleep(0.2)
    if not res.check(prom.ready(), "prometheus ready", (tmp / "prometheus.log").read_text()[-2000:]):
        return 1

    # --- traffic, while Prometheus scrapes
    traffic = Traffic(grpc, pb, channel, threads=args.clients,
                      deadline_s=args.traffic_seconds + 30)
    traffic_start = time.time()
    time.sleep(args.traffic_seconds)

    # Rules evaluate every second here; wait until requests have finished and been recorded.
    deadline = time.time() + 20
    while time.time() < deadline and not has_data(prom.query("strata:requests_finished:rate1m")):
        time.sleep(1)
    for what, q in (("generation tokens/s", "sum(rate(strata_generation_tokens_total[15s]))"),
                    ("mean step seconds", "sum(rate(strata_step_duration_seconds_sum[15s])) / "
                                          "sum(rate(strata_step_duration_seconds_count[15s]))"),
                    ("finished requests", "sum(strata_requests_total)")):
        r = prom.query(q)
        log(f"{what}: " + (r["data"]["result"][0]["value"][1] if has_data(r) else "no data"))

    # --- the scrape target
    up = prom.query(f'up{{job="{JOB}"}}')
    res.check(has_data(up) and up["data"]["result"][0]["value"][1] == "1", "scrape target up", up)

    # --- dashboard template variables, resolved as Grafana does
    dash = json.loads(DASHBOARD.read_text())
    variables = {}
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
        if not res.check(m is not None, f"variable ${v['name']} is label_values(...)", v["query"]):
            continue
        selector = substitute(m.group(1), variables)
        values = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": selector})
        ok = values.get("status") == "success" and values["data"]
        res.check(ok, f"variable ${v['name']} has values", values)
        variables[v["name"]] = values["data"] if ok else [".*"]
    log(f"template variables: {variables}")

    # --- every dashboard panel target, with the resolved variables and with All
    targets = dashboard_targets(dash)
    now = time.time()
    dumped = {"variables": variables, "start": traffic_start - 5, "end": now, "panels": []}
    for title, ref, expr in targets:
        for label, vars_ in (("selected", variables),
                             ("All", {k: [".*"] for k in variables})):
            q = substitute(expr, vars_)
            resp = prom.query(q)
            res.check(has_numbers(resp), f"panel '{title}' {ref} ({label})",
                      f"{q}\n  -> {json.dumps(resp)[:400]}")
        if args.dump_range:
            q = substitute(expr, variables)
            rr = prom.query_range(q, traffic_start - 5, now, 1)
            dumped["panels"].append({"title": title, "ref": ref, "expr": q, "result": rr})

    # --- every rule
    rules = load_rules()
    api_rules = {r["name"]: r for g in prom.get("/api/v1/rules")["data"]["groups"]
                 for r in g["rules"]}
    for group, rule in rules:
        name = rule.get("record") or rule.get("alert")
        got = api_rules.get(name)
        res.check(got is not None and got.get("health") == "ok",
                  f"rule {name} loaded and healthy", got)
        resp = prom.query(rule["expr"])
        res.check(resp.get("status") == "success", f"rule {name} expression evaluates", resp)
        if "record" in rule:
            res.check(has_data(resp), f"recording rule {name} expression has data", resp)
            res.check(has_data(prom.query(name)), f"recorded series {name} exists")
        else:
            opened = open_thresholds(rule["expr"])
            resp = prom.query(opened)
            res.check(has_data(resp), f"alert {name} watches live series (thresholds opened)",
                      f"{opened}\n  -> {json.dumps(resp)[:400]}")

    # --- the values make sense: tokens were generated and requests finished by outcome
    counts = traffic.finish()
    # After traffic (labelled series appear at first use): the served names are exactly the
    # documented interface (deploy/METRICS.md).
    r = subprocess.run([sys.executable, str(ROOT / "tests/deploy/metrics_doc.py"),
                        f"http://127.0.0.1:{metrics_port}/metrics"], capture_output=True, text=True)
    print(r.stdout, end="")
    res.check(r.returncode == 0, "/metrics serves exactly the metrics of deploy/METRICS.md",
              r.stderr)

    log(f"client outcomes: {counts}")
    res.check(counts.get("ok_stream", 0) + counts.get("ok_unary", 0) > 0, "requests succeeded",
              counts)
    res.check(counts.get("invalid_argument", 0) > 0, "malformed request answered INVALID_ARGUMENT",
              counts)
    gen = prom.query(f'strata_generation_tokens_total{{job="{JOB}"}}')
    res.check(has_data(gen) and float(gen["data"]["result"][0]["value"][1]) > 0,
              "strata_generation_tokens_total > 0", gen)
    outcomes = prom.query(f'sum by (outcome) (strata_requests_total{{job="{JOB}"}})')
    log("strata_requests_total by outcome: " + ", ".join(
        f"{r['metric'].get('outcome')}={r['value'][1]}" for r in outcomes["data"]["result"]))
    res.check(any(r["metric"].get("outcome") in ("stop", "length")
                  for r in outcomes["data"]["result"]), "finished requests counted", outcomes)

    if args.dump_range:
        pathlib.Path(args.dump_range).write_text(json.dumps(dumped))
        log(f"wrote {args.dump_range}")
    if serve.poll() is not None:
        res.check(False, "strata serve still running", f"exit {serve.returncode}")
    return 0 if not res.failed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
