"""Deployment manifests rendered from one description of the services: the Kubernetes
manifests in ``k8s/`` and the nginx configuration docker-compose mounts at the edge
(``deploy/nginx.conf``). Tests keep the committed files equal to these renders and validate
them (Kubernetes schemas offline, the Compose specification's loader, ``nginx -t``)."""

from __future__ import annotations

from typing import Any

import yaml

from shared.gateway import render_ingress, render_nginx
from shared.routing import SERVICES

NAMESPACE = "parley"
IMAGE = "parley:latest"
PORT = 8080
LABEL = "app.kubernetes.io/name"
PART_OF = {"app.kubernetes.io/part-of": "parley"}

# Requests sized for the measurements in BENCHMARKS.md; limits leave room for bursts.
RESOURCES = {
    "requests": {"cpu": "250m", "memory": "192Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
REPLICAS = {"auth": 2, "groups": 2, "messages": 2, "customer": 2, "delivery": 2}
MAX_REPLICAS = {"auth": 10, "groups": 10, "messages": 20, "customer": 6}


def _meta(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": {**PART_OF, **labels}}


def _config_map() -> dict[str, Any]:
    urls = {
        "PARLEY_AUTH_URL": f"http://parley-auth:{PORT}",
        "PARLEY_GROUPS_URL": f"http://parley-groups:{PORT}",
        "PARLEY_CUSTOMER_URL": f"http://parley-customer:{PORT}",
        "PARLEY_MESSAGES_URL": f"http://parley-messages:{PORT}",
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("parley-config"),
        "data": {
            "PARLEY_HTTP_ADDR": f"0.0.0.0:{PORT}",
            "PARLEY_MONGO_DB": "parley",
            "PARLEY_AMQP_EXCHANGE": "parley.events",
            "PARLEY_LOG_JSON": "true",
            "PARLEY_LOG_LEVEL": "info",
            "PARLEY_CLIENT_IP_HEADER": "X-Real-IP",
            # The Ingress controller's pods (the NetworkPolicies admit only it and Parley).
            "PARLEY_TRUSTED_PROXIES": '["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]',
            **urls,
        },
    }


# The Secret's example, kept out of the directory the README's steps apply: applying it over
# a real Secret would replace real credentials with these placeholders.
SECRET_EXAMPLE = "example/secret.yaml"


def _secret() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta("parley-secrets"),
        "type": "Opaque",
        # An example: copy it, fill it in, apply the copy (or create the Secret with kubectl or
        # your secret store; see README, "Kubernetes"). `parley serve` refuses to start with
        # this PARLEY_INTERNAL_SECRET (it needs at least 32 bytes).
        "stringData": {
            "PARLEY_MONGO_URL": "mongodb://parley:CHANGE-ME@mongodb:27017/?authSource=admin",
            "PARLEY_AMQP_URL": "amqp://parley:CHANGE-ME@rabbitmq:5672/",
            "PARLEY_INTERNAL_SECRET": "CHANGE-ME",
        },
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _deployment(service: str) -> dict[str, Any]:
    name = f"parley-{service}"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, **{LABEL: name}),
        "spec": {
            "replicas": REPLICAS[service],
            "selector": {"matchLabels": {LABEL: name}},
            "template": {
                "metadata": {
                    "labels": {**PART_OF, LABEL: name},
                    # /metrics is served on the API port, never routed by the Ingress.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    # Long enough for a SIGTERM to drain requests and hand back queued events.
                    "terminationGracePeriodSeconds": 30,
                    "containers": [
                        {
                            "name": service,
                            "image": IMAGE,
                            "args": ["serve", service],
                            "ports": [{"name": "http", "containerPort": PORT}],
                            "envFrom": [
                                {"configMapRef": {"name": "parley-config"}},
                                {"secretRef": {"name": "parley-secrets"}},
                            ],
                            # Ready: MongoDB and RabbitMQ answer (/readyz); alive: the process
                            # answers (/healthz), so a broker outage does not restart pods.
                            "readinessProbe": _probe("/readyz", 5, 3),
                            "livenessProbe": _probe("/healthz", 10, 6),
                            "resources": RESOURCES,
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                            },
                        }
                    ],
                },
            },
        },
    }


def _service(service: str) -> dict[str, Any]:
    name = f"parley-{service}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, **{LABEL: name}),
        "spec": {
            "selector": {LABEL: name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }


def _hpa(service: str) -> dict[str, Any]:
    name = f"parley-{service}"
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": REPLICAS[service],
            "maxReplicas": MAX_REPLICAS[service],
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }


# The ingress controller's pods (ingress-nginx's own labels, in its namespace).
INGRESS_CONTROLLER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
}


def _network_policies() -> list[dict[str, Any]]:
    """Parley's pods accept traffic only from the ingress controller's pods and from each
    other; their egress is left open (MongoDB and RabbitMQ may live anywhere). The service
    port also carries the internal API: the controller never forwards ``/internal`` (see
    ``_closed_ingress``), so only Parley's own pods reach it."""
    pods = {"matchLabels": PART_OF}
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("parley-default-deny-ingress"),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("parley-from-ingress-and-peers"),
            "spec": {
                "podSelector": pods,
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [INGRESS_CONTROLLER, {"podSelector": pods}],
                        "ports": [{"protocol": "TCP", "port": PORT}],
                    }
                ],
            },
        },
        {
            # Prometheus (in the `monitoring` namespace) scrapes /metrics on each pod.
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("parley-from-monitoring"),
            "spec": {
                "podSelector": pods,
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                                }
                            }
                        ],
                        "ports": [{"protocol": "TCP", "port": PORT}],
                    }
                ],
            },
        },
    ]


# Path prefixes of a service port that are for Parley's pods only.
CLOSED_PREFIXES = ("/internal",)


def _closed_ingress() -> dict[str, Any]:
    """An Ingress that claims the internal prefixes and refuses them to every address
    (ingress-nginx's deny list), so the main Ingress's default backend never forwards them."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            **_meta("parley-closed"),
            "annotations": {"nginx.ingress.kubernetes.io/denylist-source-range": "0.0.0.0/0,::/0"},
        },
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": prefix,
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": "parley-auth", "port": {"number": PORT}}
                                },
                            }
                            for prefix in CLOSED_PREFIXES
                        ]
                    }
                }
            ],
        },
    }


# ---- the delivery service: IM clients' TCP and WebSocket listeners -------------------------

IM_PORTS = {"im-tcp": 23000, "im-ws": 13891}


def _delivery() -> list[dict[str, Any]]:
    """The delivery service's Deployment (its API port for probes and metrics, plus the IM
    clients' ports), its Service for Parley's pods, a LoadBalancer Service that publishes the
    IM ports (a TCP protocol: no Ingress carries it), and a NetworkPolicy that admits clients
    from anywhere to those ports only."""
    deployment = _deployment("delivery")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["ports"] += [{"name": n, "containerPort": p} for n, p in IM_PORTS.items()]
    container["env"] = [
        {"name": "PARLEY_DELIVERY_TCP_ADDR", "value": f"0.0.0.0:{IM_PORTS['im-tcp']}"},
        {"name": "PARLEY_DELIVERY_WS_ADDR", "value": f"0.0.0.0:{IM_PORTS['im-ws']}"},
    ]
    # Clients hold connections for hours: give them time to reconnect elsewhere on a rollout.
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
    name = "parley-delivery"
    clients = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta("parley-delivery-clients", **{LABEL: name}),
        "spec": {
            "type": "LoadBalancer",
            "selector": {LABEL: name},
            "ports": [
                {"name": n, "port": p, "targetPort": n, "protocol": "TCP"}
                for n, p in IM_PORTS.items()
            ],
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("parley-delivery-from-clients"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL: name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": p} for p in IM_PORTS.values()]}],
        },
    }
    return [deployment, _service("delivery"), clients, policy]


def render_k8s() -> dict[str, str]:
    """File name -> contents of every manifest in ``k8s/``."""
    header = "# Generated by `parley deploy-config --format k8s`; edit parley/deploy.py instead.\n"

    def dump(*documents: dict[str, Any]) -> str:
        return header + yaml.safe_dump_all(documents, sort_keys=False)

    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": PART_OF},
    }
    return {
        "namespace.yaml": dump(namespace),
        "config.yaml": dump(_config_map()),
        SECRET_EXAMPLE: dump(_secret()),
        "services.yaml": dump(*(d for s in SERVICES for d in (_deployment(s), _service(s)))),
        "autoscaling.yaml": dump(*(_hpa(s) for s in SERVICES)),
        "network-policies.yaml": dump(*_network_policies()),
        "ingress.yaml": render_ingress(namespace=NAMESPACE, port=PORT),
        "ingress-closed.yaml": dump(_closed_ingress()),
        "delivery.yaml": dump(*_delivery()),
    }


# Docker's embedded DNS server, on every user-defined network.
DOCKER_DNS = "127.0.0.11"


def render_compose_nginx() -> str:
    """The edge configuration docker-compose mounts: every service by its compose name, looked
    up again through Docker's DNS as it expires, so scaled replicas get traffic."""
    return render_nginx(
        {s: [f"{s}:{PORT}"] for s in SERVICES}, listen=f"0.0.0.0:{PORT}", resolver=DOCKER_DNS
    )


def render_service_balancer(upstreams: dict[str, list[str]], listens: dict[str, str]) -> str:
    """An nginx configuration that gives each service one address in front of its replicas
    (what a Kubernetes Service or Compose's DNS does), for service-to-service calls when
    replicas run as plain processes on one machine, as in the tests. Every path is passed,
    internal APIs included; it must never be exposed as the edge."""
    lines = [
        "# Service addresses for replicas run as processes (internal traffic only).",
        "worker_processes 1;",
        "pid nginx.pid;",
        "error_log stderr warn;",
        "events { worker_connections 1024; }",
        "http {",
        "  access_log off;",
        "  client_body_temp_path client_body_temp;",
        "  proxy_temp_path proxy_temp;",
        "  fastcgi_temp_path fastcgi_temp;",
        "  uwsgi_temp_path uwsgi_temp;",
        "  scgi_temp_path scgi_temp;",
    ]
    for service, addrs in upstreams.items():
        lines.append(f"  upstream internal_{service} {{")
        lines += [f"    server {addr} max_fails=1 fail_timeout=2s;" for addr in addrs]
        lines += ["    keepalive 16;", "  }"]
        lines += [
            "  server {",
            f"    listen {listens[service]};",
            "    proxy_http_version 1.1;",
            '    proxy_set_header Connection "";',
            "    proxy_next_upstream error timeout;",
            f"    location / {{ proxy_pass http://internal_{service}; }}",
            "  }",
        ]
    return "\n".join([*lines, "}", ""])
