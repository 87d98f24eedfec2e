"""Deployment files: the Kubernetes manifests (schema-validated offline), docker-compose.yml
(checked by the Compose specification's own loader, or ``docker compose config`` where the
plugin exists) and the edge configuration it mounts, all kept equal to their renders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from parley.deploy import render_compose_nginx, render_k8s
from parley.servers import REPO_ROOT, go_tool
from shared.routing import SERVICES

K8S_VERSION = "1.30"


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO_ROOT / "k8s").rglob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_k8s_files_are_the_render() -> None:
    rendered = render_k8s()
    k8s = REPO_ROOT / "k8s"
    on_disk = {str(p.relative_to(k8s)): p.read_text() for p in k8s.rglob("*.yaml")}
    assert on_disk == rendered, "regenerate: parley deploy-config --format k8s --out k8s"


def test_k8s_manifests_pass_schema_validation() -> None:
    docs = manifests()
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_schema_validation_can_fail() -> None:
    broken = next(d for d in manifests() if d["kind"] == "Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_every_service_is_deployed_probed_scaled_and_fenced() -> None:
    docs = manifests()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    for service in SERVICES:
        name = f"parley-{service}"
        container = by_kind["Deployment"][name]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["serve", service]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        annotations = by_kind["Deployment"][name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert container["resources"]["requests"]
        sources = {next(iter(s)) for s in container["envFrom"]}
        assert sources == {"configMapRef", "secretRef"}
        assert by_kind["Service"][name]["spec"]["selector"] == {"app.kubernetes.io/name": name}
        hpa = by_kind["HorizontalPodAutoscaler"][name]["spec"]
        assert hpa["scaleTargetRef"]["name"] == name and hpa["maxReplicas"] > hpa["minReplicas"]
    assert "parley-config" in by_kind["ConfigMap"] and "parley-secrets" in by_kind["Secret"]
    policies = by_kind["NetworkPolicy"]
    assert policies["parley-default-deny-ingress"]["spec"]["policyTypes"] == ["Ingress"]
    sources = policies["parley-from-ingress-and-peers"]["spec"]["ingress"][0]["from"]
    assert {next(iter(s)) for s in sources} == {"namespaceSelector", "podSelector"}


# What compose requires from its environment (docker-compose.yml refuses to start without it).
COMPOSE_ENV = {"PARLEY_INTERNAL_SECRET": "0123456789abcdef" * 4}


def compose_check(
    path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        argv = [docker, "compose", "-f", str(path), "config"]
    else:
        argv = [
            str(go_tool("parley-compose-check", REPO_ROOT / "tools" / "compose-check")),
            str(path),
        ]
    environ = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    environ.update(COMPOSE_ENV if env is None else env)
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=path.parent, env=environ
    )


def test_compose_file_passes_the_compose_specification() -> None:
    result = compose_check(REPO_ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert {"mongo", "rabbitmq", "edge", *SERVICES} <= set(services)
    for service in SERVICES:
        assert services[service]["command"] == ["serve", service]
        assert "/readyz" in " ".join(services[service]["healthcheck"]["test"])
    assert set(resolved["volumes"]) >= {"mongo-data", "rabbitmq-data"}


def test_compose_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "docker-compose.yml").write_text("services:\n  x:\n    image: 5\n    ports: nope\n")
    assert compose_check(tmp_path / "docker-compose.yml").returncode != 0


def test_compose_edge_configuration_is_the_render() -> None:
    assert (REPO_ROOT / "deploy" / "nginx.conf").read_text() == render_compose_nginx()
