"""Parley distributed on one machine: each service as its own ``parley serve`` process
(optionally several replicas), one address per service in front of its replicas (what a
Kubernetes Service does), and nginx at the edge rendered from the routing table. The tests
and ``parley cluster`` (for trying the distributed mode and benchmarking it) use it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from parley.deploy import render_service_balancer
from parley.servers import Process, free_port, start_nginx, start_service, stop_all
from shared.gateway import render_nginx
from shared.routing import SERVICES
from shared.settings import Settings, split_addr


@dataclass
class Cluster:
    edge_url: str
    # The services' shared internal secret (PARLEY_INTERNAL_SECRET): the settings' own, or a
    # random one made for this cluster.
    internal_secret: str
    processes: list[Process] = field(default_factory=list)
    # The delivery replicas: each process's extra["tcp"] and extra["ws"] are its client
    # listeners (HOST:PORT).
    delivery: list[Process] = field(default_factory=list)

    def stop(self) -> None:
        stop_all(self.processes)


def start_cluster(
    settings: Settings,
    logs: Path,
    replicas: dict[str, int] | None = None,
    edge_addr: str | None = None,
    log_level: str = "warning",
    delivery: int = 0,
) -> Cluster:
    """Start every service (``replicas`` of each, default one) against the MongoDB and
    RabbitMQ of ``settings``; returns once everything answers."""
    if not settings.amqp_url:
        raise ValueError("a distributed Parley needs RabbitMQ (settings.amqp_url)")
    replicas = replicas or {}
    ports = {s: [free_port() for _ in range(replicas.get(s, 1))] for s in SERVICES}
    internal = {s: free_port() for s in SERVICES}
    edge_host, edge_port = split_addr(edge_addr) if edge_addr else ("127.0.0.1", free_port())
    internal_secret = settings.internal_secret or secrets.token_urlsafe(32)
    env = {
        "PARLEY_MONGO_URL": settings.mongo_url,
        "PARLEY_MONGO_DB": settings.mongo_db,
        "PARLEY_AMQP_URL": settings.amqp_url,
        "PARLEY_AMQP_EXCHANGE": settings.amqp_exchange,
        "PARLEY_AUTH_URL": f"http://127.0.0.1:{internal['auth']}",
        "PARLEY_GROUPS_URL": f"http://127.0.0.1:{internal['groups']}",
        "PARLEY_CUSTOMER_URL": f"http://127.0.0.1:{internal['customer']}",
        "PARLEY_INTERNAL_SECRET": internal_secret,
        "PARLEY_OUTBOX_RELAY_INTERVAL": str(settings.outbox_relay_interval),
        "PARLEY_OUTBOX_GRACE": str(settings.outbox_grace),
        "PARLEY_PUBLISH_TIMEOUT": str(settings.publish_timeout),
        "PARLEY_REQUEST_TIMEOUT": str(settings.request_timeout),
        "PARLEY_MONGO_TIMEOUT": str(settings.mongo_timeout),
        "PARLEY_KEFU_APPID": str(settings.kefu_appid),
        "PARLEY_DELIVERY_PRESENCE_INTERVAL": str(settings.delivery_presence_interval),
        # The edge nginx is on loopback: believe its X-Real-IP (the IP allow-list).
        "PARLEY_TRUSTED_PROXIES": '["127.0.0.1/32", "::1/128"]',
        "PARLEY_LOG_LEVEL": log_level,
    }
    upstreams = {s: [f"127.0.0.1:{p}" for p in ports[s]] for s in SERVICES}
    cluster = Cluster(f"http://{edge_host}:{edge_port}", internal_secret)
    try:
        cluster.processes.append(
            start_nginx(
                render_service_balancer(
                    upstreams, {s: f"127.0.0.1:{p}" for s, p in internal.items()}
                ),
                logs / "nginx-internal",
                internal["messages"],
            )
        )
        for service in SERVICES:
            for n, port in enumerate(ports[service]):
                cluster.processes.append(
                    start_service(service, port, env, logs / f"{service}-{n}.log")
                )
        for n in range(delivery):  # client listeners on ports of their own; no edge routes
            tcp, ws = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            process = start_service(
                "delivery",
                free_port(),
                env
                | {
                    "PARLEY_MESSAGES_URL": f"http://127.0.0.1:{internal['messages']}",
                    "PARLEY_DELIVERY_TCP_ADDR": tcp,
                    "PARLEY_DELIVERY_WS_ADDR": ws,
                },
                logs / f"delivery-{n}.log",
            )
            process.extra.update(tcp=tcp, ws=ws)
            cluster.processes.append(process)
            cluster.delivery.append(process)
        cluster.processes.append(
            start_nginx(
                render_nginx(upstreams, listen=f"{edge_host}:{edge_port}"),
                logs / "nginx",
                edge_port,
            )
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster
