#!/usr/bin/python3
"""Renders a kustomization of deploy/k8s/ without kustomize (Debian has no kustomize package).

Implements exactly the kustomize features deploy/k8s uses, and refuses any other field:
  resources  files (one or more YAML documents) and directories holding a kustomization.yaml
  patches    `- path: FILE`, a strategic-merge patch; its apiVersion/kind/metadata.name is the
             target. Maps merge recursively (null deletes a key); lists of containers, volumes,
             env, ports and volumeMounts merge by their key (name, containerPort, mountPath): the
             patch's items in the patch's order, then the other items in their order, as
             kustomize does; other lists are replaced.
  labels     `- pairs: {...}` added to metadata.labels only (no selectors, no templates)
  images     `- name, newName, newTag`, on the containers of pod templates
Transformers run in kustomize's order: patches, then labels, then images. Output documents
follow kustomize's default (legacy) kind order.

tools/deploy_check.sh renders every overlay with this and, where `kubectl kustomize` exists,
checks that both give the same objects, so this stays exact for the features above.

    /usr/bin/python3 tests/deploy/kustomize_render.py deploy/k8s/overlays/tp-2 > out.yaml
"""
import copy
import pathlib
import sys

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "labels", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "ports": "containerPort", "volumeMounts": "mountPath",
              "imagePullSecrets": "name"}
# kustomize's legacy output order (api/resource/ordering); kinds not listed come after, by name.
KIND_ORDER = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
              "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
              "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service", "LimitRange",
              "PriorityClass", "PersistentVolume", "PersistentVolumeClaim", "Deployment",
              "StatefulSet", "CronJob", "PodDisruptionBudget"]
KIND_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class RenderError(Exception):
    pass


def key_of(obj):
    group = obj["apiVersion"].rsplit("/", 1)[0] if "/" in obj["apiVersion"] else ""
    return (group, obj["kind"], obj["metadata"]["name"])


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def merge(base, patch, field=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$"):
                raise RenderError(f"patch directive {k} is not supported")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        mk = MERGE_KEYS[field]
        original = {item[mk]: item for item in base}
        patched = [merge(original[item[mk]], item, None) if item[mk] in original
                   else copy.deepcopy(item) for item in patch]
        in_patch = {item[mk] for item in patch}
        return patched + [copy.deepcopy(item) for item in base if item[mk] not in in_patch]
    return copy.deepcopy(patch)


def pod_specs(obj):
    if obj["kind"] in POD_TEMPLATE_KINDS:
        yield obj["spec"]["template"]["spec"]
    elif obj["kind"] == "CronJob":
        yield obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield obj["spec"]


def image_name(image):
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    return name


def build(directory):
    directory = pathlib.Path(directory)
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        raise RenderError(f"{directory}: no kustomization.yaml")
    (k,) = load_docs(kfile)
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: unsupported fields {sorted(unknown)}")

    objs = []
    for r in k.get("resources", []):
        p = directory / r
        objs += build(p) if p.is_dir() else load_docs(p)
    by_key = {}
    for o in objs:
        if key_of(o) in by_key:
            raise RenderError(f"{kfile}: duplicate resource {key_of(o)}")
        by_key[key_of(o)] = o

    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kfile}: only `patches: - path: FILE` is supported, got {patch}")
        for doc in load_docs(directory / patch["path"]):
            target = key_of(doc)
            if target not in by_key:
                raise RenderError(f"{kfile}: patch {patch['path']} matches no resource {target}")
            by_key[target] = merge(by_key[target], doc)
    objs = [by_key[key_of(o)] for o in objs]

    for entry in k.get("labels", []):
        if set(entry) != {"pairs"}:
            raise RenderError(f"{kfile}: labels support only `pairs` (metadata labels)")
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(entry["pairs"])

    for img in k.get("images", []):
        if not set(img) <= {"name", "newName", "newTag"}:
            raise RenderError(f"{kfile}: images support name/newName/newTag, got {img}")
        for o in objs:
            for spec in pod_specs(o):
                for c in spec.get("initContainers", []) + spec.get("containers", []):
                    if image_name(c["image"]) != img["name"]:
                        continue
                    name = img.get("newName", img["name"])
                    tag = img.get("newTag")
                    if tag is None and ":" in c["image"].rsplit("/", 1)[-1]:
                        tag = c["image"].rsplit(":", 1)[1]
                    c["image"] = f"{name}:{tag}" if tag else name
    return objs


def order(objs):
    def rank(o):
        kind = o["kind"]
        if kind in KIND_ORDER:
            return (0, KIND_ORDER.index(kind), "", "")
        if kind in KIND_LAST:
            return (2, KIND_LAST.index(kind), "", "")
        return (1, 0, kind, "")
    return sorted(objs, key=lambda o: (rank(o), o["metadata"]["name"]))


def render(directory):
    return order(build(directory))


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objs = render(argv[1])
    except (RenderError, OSError, KeyError, yaml.YAMLError) as e:
        print(f"kustomize_render: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=True, default_flow_style=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
