"""The Kubernetes manifests (deploy/k8s): every object validates offline against the Kubernetes
1.33 schemas (kubernetes-validate ships them), every kustomization names files that exist and
every patch a base object, every container's command parses with the CLI it runs (a renamed
flag fails here), and the NetworkPolicies admit what the README says. No cluster is reachable
here: applying them is the README's `kubectl apply -k`."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from clipmesh.cli import build_parser

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSION = "1.33"


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _base_objects() -> list[dict]:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in base["resources"] for doc in _docs(K8S / name)]


@pytest.mark.parametrize("doc", _base_objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_object_validates_against_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kustomizations_name_what_exists_and_patches_name_base_objects():
    base = {(d["kind"], d["metadata"]["name"]) for d in _base_objects()}
    listed = set()
    for kustomization in _kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        for name in spec.get("resources", []):
            assert (kustomization.parent / name).exists(), (kustomization, name)
            listed.add((kustomization.parent / name).resolve())
        for patch in spec.get("patches", []):
            path = kustomization.parent / patch["path"]
            listed.add(path.resolve())
            for doc in _docs(path):
                assert (doc["kind"], doc["metadata"]["name"]) in base, (path, doc["metadata"]["name"])
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == {p for p in listed if p.is_file()}  # nothing shipped that no kustomization uses


def _containers():
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if "args" in container:
                    yield f"{path.relative_to(K8S)}:{container['name']}", container


@pytest.mark.parametrize("where,container", list(_containers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_parses_with_the_cli(where, container):
    args = [re.sub(r"\$\((\w+)\)", "x", a) for a in container["args"]]  # env references, as the kubelet expands them
    assert args[0] == "clipmesh", where
    parsed = build_parser().parse_args(args[1:])  # an unknown or renamed flag exits here
    assert parsed.command in ("coordinator", "worker")
    if parsed.command == "worker":
        defined = {e["name"] for e in container.get("env", [])} | {"POD_IP", "POD_NAME", "CLIPMESH_MODEL"}
        assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= defined, where
        assert "--advertise-host" in container["args"] and "$(POD_IP)" in container["args"]


def test_the_network_policies_open_only_the_coordinators_ports_and_keep_the_data_plane_inside():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _base_objects()}
    coordinator = objects["StatefulSet", "coordinator"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in coordinator["ports"]}
    ingress = objects["NetworkPolicy", "coordinator-ingress"]["spec"]["ingress"]
    assert [{p["port"] for p in rule["ports"]} for rule in ingress] == [ports] and "from" not in ingress[0]
    workers = objects["NetworkPolicy", "worker-data-plane"]["spec"]["ingress"]
    assert workers[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "clipmesh-worker"}}}]
    assert "ports" not in workers[0]  # any port between workers: the store and gloo/NCCL pick theirs
    assert workers[1] == {"ports": [{"port": 9400, "protocol": "TCP"}]} and "from" not in workers[1]


def test_the_secrets_the_manifests_read_are_the_ones_the_readme_makes():
    readme = (K8S.parent.parent / "README.md").read_text()
    keys = {ref["secretKeyRef"]["key"] for _, c in _containers() for e in c.get("env", [])
            if (ref := e.get("valueFrom", {})) and "secretKeyRef" in ref}
    assert keys and all(f"--from-literal={key}=" in readme for key in keys)
    assert "clipmesh-tls" in readme
