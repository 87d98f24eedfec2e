"""The delivery service in the deployment files: its IM ports published (a LoadBalancer Service
on Kubernetes, host ports in compose), open to clients, and the messages service's address."""

from __future__ import annotations

from typing import Any

import yaml

from parley.servers import REPO_ROOT

from .test_deploy import compose_check, manifests


def test_kubernetes_publishes_the_im_ports() -> None:
    by_name: dict[tuple[str, str], dict[str, Any]] = {
        (d["kind"], d["metadata"]["name"]): d for d in manifests()
    }
    container = by_name["Deployment", "parley-delivery"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["args"] == ["serve", "delivery"]
    assert {p["containerPort"] for p in container["ports"]} == {8080, 23000, 13891}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "PARLEY_DELIVERY_TCP_ADDR": "0.0.0.0:23000",
        "PARLEY_DELIVERY_WS_ADDR": "0.0.0.0:13891",
    }
    clients = by_name["Service", "parley-delivery-clients"]["spec"]
    assert clients["type"] == "LoadBalancer"
    assert {p["port"] for p in clients["ports"]} == {23000, 13891}
    policy = by_name["NetworkPolicy", "parley-delivery-from-clients"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "parley-delivery"}}
    assert [p["port"] for p in policy["ingress"][0]["ports"]] == [23000, 13891]
    assert "from" not in policy["ingress"][0]  # any client, those ports only
    config = by_name["ConfigMap", "parley-config"]["data"]
    assert config["PARLEY_MESSAGES_URL"] == "http://parley-messages:8080"


def test_compose_runs_the_delivery_service() -> None:
    result = compose_check(REPO_ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    delivery = yaml.safe_load(result.stdout)["services"]["delivery"]
    assert delivery["command"] == ["serve", "delivery"]
    assert delivery["environment"]["PARLEY_MESSAGES_URL"] == "http://messages:8080"
    assert delivery["environment"]["PARLEY_INTERNAL_SECRET"]  # the shared settings are kept
    published = {str(p.get("published")) for p in delivery["ports"]}
    assert published == {"23000", "13891"}
