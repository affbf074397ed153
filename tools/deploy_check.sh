#!/usr/bin/env bash
# Offline validation of deploy/: lint, Prometheus rules/config (+ rule unit tests), the Grafana
# dashboard, and every Kubernetes overlay rendered and validated against pinned API schemas.
# No cluster, no network except PyPI for the first venv install (pinned versions).
#
#   tools/deploy_check.sh            # everything; exit 0 = pass, last line 'N passed, N failed'
#
# Needs Debian packages: yamllint, prometheus (promtool), shellcheck, python3-yaml, python3-venv;
# kubectl (its built-in kustomize) is used when present to cross-check the offline renderer.
# Environment: STRATA_BUILD_DIR (default build): renders go to $STRATA_BUILD_DIR/deploy-check/,
# and the built strata there (scheduler/strata) has its `serve` flags checked against the
# manifests. STRATA_DEPLOY_VENV (default ~/.cache/strata-deploy/venv-<hash>): the venv.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
BUILD_DIR="${STRATA_BUILD_DIR:-build}"
OUT="$BUILD_DIR/deploy-check"
K8S_VERSIONS=(1.30.0 1.32.0)  # oldest supported (native gRPC probes GA since 1.27) and newest
OVERLAYS=(cpu gpu-1 tp-2 tp-4)
PY=/usr/bin/python3

passed=0
failed=0
failures=()
step() {  # step NAME COMMAND...: runs it, records the result
  local name=$1
  shift
  echo "== $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAILED: $name"
  fi
}

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    echo "deploy_check: missing ${missing[*]}; apt-get install yamllint prometheus shellcheck python3-yaml python3-venv" >&2
    exit 2
  fi
}
need yamllint promtool shellcheck "$PY"

mkdir -p "$OUT"

# ---- venv with pinned kubernetes-validate (schemas of every Kubernetes minor version)
REQ=tests/deploy/requirements.txt
VENV="${STRATA_DEPLOY_VENV:-$HOME/.cache/strata-deploy/venv-$(sha256sum "$REQ" | cut -c1-12)}"
make_venv() {
  if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
    return 0
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
}
step "venv $VENV (pinned $REQ)" make_venv

# ---- lint
mapfile -t yaml_files < <(find deploy tests/deploy -name '*.yaml' -o -name '*.yml' | sort)
step "yamllint deploy/ tests/deploy/ (${#yaml_files[@]} files)" \
  yamllint --strict -c deploy/.yamllint.yml "${yaml_files[@]}"
step "shellcheck" shellcheck -x tools/deploy_check.sh tests/deploy/prometheus_e2e.sh \
  tools/render_dashboard.sh

# ---- Prometheus
step "promtool check rules" promtool check rules deploy/prometheus/strata-rules.yml
step "promtool check config (example scrape config)" promtool check config deploy/prometheus/prometheus.yml
step "promtool test rules (alert unit tests)" promtool test rules tests/deploy/strata-rules.test.yml

# ---- METRICS.md documents exactly the metrics scheduler/metrics.cc declares
step "METRICS.md matches scheduler/metrics.cc" "$PY" tests/deploy/metrics_doc.py

# ---- Grafana: the committed JSON is what the generator writes, and its queries parse
step "dashboard JSON up to date" "$PY" deploy/grafana/build_dashboard.py --check
check_dashboard_queries() {
  # Every panel expression, variables substituted, must be valid PromQL: promtool parses it as a
  # recording rule.
  "$PY" - "$OUT/dashboard-exprs.rules.yml" <<'EOF'
import json, sys, yaml
d = json.load(open("deploy/grafana/strata-dashboard.json"))
exprs = []
def walk(ps):
    for p in ps:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            e = t["expr"].replace("$__rate_interval", "1m").replace("$model", ".*").replace("$kv_dtype", ".*")
            exprs.append(e)
walk(d["panels"])
rules = [{"record": f"dashboard:expr:{i}", "expr": e} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
print(f"{len(exprs)} panel expressions")
EOF
  promtool check rules "$OUT/dashboard-exprs.rules.yml"
}
step "dashboard panel expressions parse" check_dashboard_queries

# ---- Kubernetes: render every overlay, cross-check with kubectl's kustomize, validate
render() {
  local o=$1
  "$PY" tests/deploy/kustomize_render.py "deploy/k8s/overlays/$o" >"$OUT/$o.yaml" || return 1
  if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    kubectl kustomize "deploy/k8s/overlays/$o" >"$OUT/$o.kubectl.yaml" || return 1
    "$PY" - "$OUT/$o.yaml" "$OUT/$o.kubectl.yaml" <<'EOF' || return 1
import sys, yaml
a, b = ([d for d in yaml.safe_load_all(open(p)) if d] for p in sys.argv[1:3])
if a != b:
    sys.exit(f"offline renderer and kubectl kustomize differ: diff {sys.argv[1]} {sys.argv[2]}")
print(f"  same objects as kubectl kustomize ({len(a)})")
EOF
  else
    echo "  kubectl not found: rendered with tests/deploy/kustomize_render.py only"
  fi
}
for o in "${OVERLAYS[@]}"; do
  step "render overlay $o" render "$o"
done
rendered=()
for o in "${OVERLAYS[@]}"; do rendered+=("$OUT/$o.yaml"); done
flag_args=()
for b in "$BUILD_DIR/scheduler/strata" "$BUILD_DIR/strata"; do
  if [[ -x "$b" ]]; then flag_args+=(--strata "$b"); break; fi
done
version_args=()
for v in "${K8S_VERSIONS[@]}"; do version_args+=(--k8s-version "$v"); done
step "validate rendered overlays (k8s ${K8S_VERSIONS[*]} schemas, references, flags)" \
  "$VENV/bin/python" tests/deploy/check_manifests.py "${version_args[@]}" "${flag_args[@]}" "${rendered[@]}"

# ---- Dockerfile: what it copies exists
check_dockerfile() {
  local ok=0 src
  while read -r src; do
    [[ -e "$src" ]] || { echo "  deploy/Dockerfile copies missing $src"; ok=1; }
  done < <(awk '/^COPY/ && !/--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' deploy/Dockerfile)
  return $ok
}
step "Dockerfile sources exist" check_dockerfile

echo
echo "rendered overlays: $(cd "$OUT" && pwd)"
if ((failed)); then printf 'failed: %s\n' "${failures[@]}"; fi
echo "$passed passed, $failed failed"
((failed == 0))
