#!/usr/bin/env python3
"""Validates rendered Kubernetes overlays (the output of kustomize, one file per overlay).

    python check_manifests.py --k8s-version 1.30.0 [--strata build/scheduler/strata] RENDERED.yaml...

Run with the deploy-check venv's python (tools/deploy_check.sh): it needs kubernetes-validate
(pinned, tests/deploy/requirements.txt), which brings jsonschema and PyYAML.

1. Schema: every built-in object against the pinned Kubernetes OpenAPI schema, strict (unknown
   fields are errors). PodMonitor (a prometheus-operator CRD, absent from those schemas) against
   tests/deploy/schemas/podmonitor-monitoring.coreos.com-v1.json, a partial schema of the fields
   used, written here; any other kind is an error.
2. References that schemas cannot see: volumeMounts name declared volumes; probe, Service and
   PodMonitor ports exist on the pods; selectors match the pod template; every $(VAR) in
   command/args is a key of the referenced ConfigMap; a GPU container holds STRATA_TP GPUs
   (one per rank) and a CPU one none; a read-only root filesystem comes with a writable /tmp;
   no Secret object is rendered (secrets are referenced, never committed).
3. Flags: every --flag given to `strata` exists in `strata serve --help`, when the binary is
   given. Flags the binary does not have yet may be listed in PENDING_FLAGS with the reason; one
   that has landed must be removed from that list (the check says so).
"""
import argparse
import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"):
               HERE / "schemas/podmonitor-monitoring.coreos.com-v1.json"}
# Flags the overlays pass that `strata serve` does not have yet, with the reason. Remove an
# entry when the flag lands. (Empty: every flag used exists.)
PENDING_FLAGS = {}


class Checker:
    def __init__(self):
        self.errors = []
        self.notes = []

    def error(self, where, msg):
        self.errors.append(f"{where}: {msg}")


def pod_template(obj):
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]
    return None


def check_schema(c, where, obj, version):
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        for e in jsonschema.Draft202012Validator(schema).iter_errors(obj):
            c.error(where, f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        c.error(where, f"no schema for {key}: {e}")
    except kubernetes_validate.ValidationError as e:
        c.error(where, f"{'.'.join(map(str, e.path))}: {e.message}")


def check_refs(c, name, objs):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    if "Secret" in by_kind:
        c.error(name, "renders a Secret: secrets are created out of band, never committed")
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in by_kind.get("ConfigMap", [])}
    pod_ports, pod_labels = set(), []
    for o in objs:
        tpl = pod_template(o)
        if tpl is None:
            continue
        where = f"{name} {o['kind']}/{o['metadata']['name']}"
        labels = tpl["metadata"].get("labels", {})
        pod_labels.append(labels)
        sel = o["spec"]["selector"]["matchLabels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            c.error(where, f"selector {sel} does not match template labels {labels}")
        spec = tpl["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for claim in (v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                      if "persistentVolumeClaim" in v):
            if not any(p["metadata"]["name"] == claim for p in by_kind.get("PersistentVolumeClaim", [])):
                c.error(where, f"PVC {claim} is not part of the overlay")
        for ctr in spec.get("containers", []):
            cw = f"{where} container {ctr['name']}"
            ports = {p.get("name") for p in ctr.get("ports", [])} | \
                    {p["containerPort"] for p in ctr.get("ports", [])}
            pod_ports |= ports
            for m in ctr.get("volumeMounts", []):
                if m["name"] not in volumes:
                    c.error(cw, f"volumeMount {m['name']} has no volume")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = ctr.get(probe)
                if p and "grpc" in p and p["grpc"]["port"] not in ports:
                    c.error(cw, f"{probe} port {p['grpc']['port']} is not a container port")
            env = {}
            for ef in ctr.get("envFrom", []):
                cm = ef.get("configMapRef", {}).get("name")
                if cm is not None and cm not in configmaps:
                    c.error(cw, f"envFrom ConfigMap {cm} is not part of the overlay")
                env.update(configmaps.get(cm, {}))
            env.update({e["name"]: e.get("value") for e in ctr.get("env", [])})
            for arg in ctr.get("command", []) + ctr.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    if var not in env:
                        c.error(cw, f"{arg!r} uses $({var}), which no ConfigMap/env defines")
            gpus = ctr.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None and str(gpus) != str(env.get("STRATA_TP")):
                c.error(cw, f"nvidia.com/gpu limit {gpus} != STRATA_TP {env.get('STRATA_TP')} "
                            "(one GPU per tensor-parallel rank)")
            if env.get("STRATA_DEVICE") == "cuda" and gpus is None:
                c.error(cw, "STRATA_DEVICE is cuda but the container has no nvidia.com/gpu limit")
            if env.get("STRATA_DEVICE") == "cpu" and gpus is not None:
                c.error(cw, "STRATA_DEVICE is cpu but the container requests GPUs")
            if ctr.get("securityContext", {}).get("readOnlyRootFilesystem") and not any(
                    m["mountPath"] == "/tmp" for m in ctr.get("volumeMounts", [])):
                c.error(cw, "read-only root filesystem without a writable /tmp (worker secrets)")
        for v in spec.get("volumes", []):
            if "secret" in v:
                c.notes.append(f"{where}: Secret {v['secret']['secretName']} is referenced; "
                               "create it out of band (deploy/README.md)")
    for s in by_kind.get("Service", []):
        for p in s["spec"].get("ports", []):
            if p.get("targetPort") not in pod_ports:
                c.error(f"{name} Service/{s['metadata']['name']}",
                        f"targetPort {p.get('targetPort')} is no container port")
        if not any(all(lbl.get(k) == v for k, v in s["spec"]["selector"].items())
                   for lbl in pod_labels):
            c.error(f"{name} Service/{s['metadata']['name']}", "selector matches no pod template")
    for pm in by_kind.get("PodMonitor", []):
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in pod_ports:
                c.error(f"{name} PodMonitor/{pm['metadata']['name']}",
                        f"port {ep.get('port')} is no container port")


def help_flags(binary, *sub):
    out = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout + out.stderr))


def check_flags(c, name, objs, binaries):
    known = {}
    for prog, (path, sub) in binaries.items():
        if path:
            known[prog] = help_flags(path, *sub)
    used = []  # (program, flag, where)
    for o in objs:
        tpl = pod_template(o)
        if tpl is None:
            continue
        for ctr in tpl["spec"].get("containers", []):
            cmd = ctr.get("command", []) + ctr.get("args", [])
            where = f"{name} container {ctr['name']}"
            if cmd[:2] == ["strata", "serve"]:
                used += [("strata", a.split("=", 1)[0], where) for a in cmd if a.startswith("--")]
            else:
                c.error(where, f"unexpected command {cmd[:2]} (expected strata serve)")
    for prog, flag, where in used:
        if prog not in known:
            continue
        pending = PENDING_FLAGS.get((prog, flag))
        if flag in known[prog]:
            if pending:
                c.error(where, f"{prog} now has {flag}: remove it from PENDING_FLAGS")
        elif pending:
            c.notes.append(f"{where}: {prog} {flag} not in the binary yet (pending: {pending})")
        else:
            c.error(where, f"{prog} has no flag {flag}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k8s-version", action="append", required=True)
    ap.add_argument("--strata", help="built strata binary (checks `strata serve` flags)")
    ap.add_argument("rendered", nargs="+")
    args = ap.parse_args()
    c = Checker()
    binaries = {"strata": (args.strata, ["serve"])}
    for path in args.rendered:
        name = pathlib.Path(path).stem
        objs = [o for o in yaml.safe_load_all(open(path)) if o]
        for o in objs:
            for v in args.k8s_version:
                check_schema(c, f"{name} {o['kind']}/{o['metadata']['name']} (k8s {v})", o, v)
        check_refs(c, name, objs)
        check_flags(c, name, objs, binaries)
        print(f"  {name}: {len(objs)} objects ({', '.join(o['kind'] for o in objs)})")
    for n in sorted(set(c.notes)):
        print(f"  note: {n}")
    for e in c.errors:
        print(f"  ERROR {e}")
    if not args.strata:
        print("  note: no strata binary given: `strata serve` flags not checked")
    return 1 if c.errors else 0


if __name__ == "__main__":
    sys.exit(main())
