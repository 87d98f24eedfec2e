"""Parley's configuration: one pydantic-settings class, read from ``PARLEY_*`` variables.

Every process (a single service, the all-in-one runner, a management command) builds one
``Settings`` at startup; an invalid value stops it there with pydantic's message.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MONGO_ADDR = "127.0.0.1:27018"
EMBEDDED_MONGO_URL = f"mongodb://{EMBEDDED_MONGO_ADDR}/"
# The shortest PARLEY_INTERNAL_SECRET `parley serve` accepts (in bytes).
INTERNAL_SECRET_MIN_BYTES = 32


class Settings(BaseSettings):
    """All of Parley's settings; the README's "Settings" table documents each one."""

    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="ignore", frozen=True)

    http_addr: str = "127.0.0.1:8080"
    mongo_url: str = EMBEDDED_MONGO_URL
    mongo_db: str = "parley"
    # Where the embedded FerretDB of `parley run` and `parley cluster` keeps its data: SQLite
    # files under DIR/mongo, or a private PostgreSQL cluster under DIR/postgres.
    local_store: Literal["sqlite", "postgresql"] = "sqlite"
    # None: the in-process bus (all-in-one only). A URL: RabbitMQ.
    amqp_url: str | None = None
    amqp_exchange: str = "parley.events"
    amqp_prefetch: int = Field(default=64, ge=1)
    publish_timeout: float = Field(default=5.0, gt=0)
    # Where services reach the auth service's internal verification API (distributed mode).
    auth_url: str = "http://127.0.0.1:8081"
    # Where services reach the groups and customer services' internal APIs (distributed mode).
    groups_url: str = "http://127.0.0.1:8082"
    customer_url: str = "http://127.0.0.1:8084"
    # Shared secret of the internal API (/internal/*): at least INTERNAL_SECRET_MIN_BYTES.
    # Without one the internal API refuses every call, unless insecure_internal says otherwise
    # (`parley serve --insecure-internal`: no check at all, for a network nothing else reaches).
    internal_secret: str = ""
    insecure_internal: bool = False
    # /internal/verify: refused credential checks allowed per caller address (a token bucket
    # of this many, refilled at this rate per second); beyond it, 429.
    verify_refusal_burst: int = Field(default=100, ge=1)
    verify_refusal_rate: float = Field(default=10.0, gt=0)
    auth_cache_ttl: float = Field(default=10.0, ge=0)
    # The header that carries the client address for the per-app IP allow-list (spec §1.2).
    client_ip_header: str = "X-Real-IP"
    # Peers (addresses or networks, as JSON) whose client-IP header is believed; from any other
    # peer, or with none configured, the allow-list checks the connection's own address.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    # appid -> allowed client IPs, as JSON: PARLEY_IP_PERMISSIONS='{"7": ["10.0.0.1"]}'.
    ip_permissions: dict[int, list[str]] = Field(default_factory=dict)
    # Apps refused by the message-injection endpoints (spec §1.5), as JSON: '[7, 9]'.
    disabled_app_ids: frozenset[int] = frozenset()
    # POST /groups honours a caller-supplied group_id (spec S3).
    external_group_id: bool = False
    # Only the master may change a group's notice through the client API (spec S23).
    notice_by_master_only: bool = True
    # The master may not leave a group that has other members; they must disband it (S26).
    master_must_disband: bool = True
    # POST /auth/customer requires app-key Basic credentials (spec S17).
    customer_auth_requires_appkey: bool = False
    # The customer-service (agents') app: cmd-64 history filtering (spec S20).
    kefu_appid: int = 0
    # Customer client ids start above this, so they never look like an app's own uids.
    customer_client_id_base: int = Field(default=10**12, ge=0)
    # Limits on what one caller can make Parley store (400 beyond them; nothing written).
    max_name_length: int = Field(default=256, ge=1)  # group names, user and member names
    max_avatar_length: int = Field(default=1024, ge=1)  # avatar URLs of members and visitors
    max_notice_length: int = Field(default=256, ge=1)
    max_nickname_length: int = Field(default=256, ge=1)
    max_content_bytes: int = Field(default=64 * 1024, ge=1)  # a message's content, UTF-8
    max_group_members: int = Field(default=10_000, ge=1)
    max_super_group_members: int = Field(default=100_000, ge=1)
    max_members_per_request: int = Field(default=1_000, ge=1)
    # Groups one client (appid, uid) may create per minute, counted in each process.
    client_groups_per_minute: int = Field(default=10, ge=1)
    # Whether POST /client/groups may create super groups (else 400).
    client_super_groups: bool = False
    outbox_relay_interval: float = Field(default=5.0, gt=0)
    outbox_grace: float = Field(default=10.0, ge=0)
    log_json: bool = False
    log_level: str = "info"
    request_id_header: str = "X-Request-ID"
    # Longest a request may take before it is answered 503 (its work is cancelled).
    request_timeout: float = Field(default=10.0, gt=0)
    # One structured line per request (method, route, status, duration, request id, appid).
    access_log: bool = True
    # Deadline of each MongoDB operation (PyMongo's timeoutMS) and of server selection.
    mongo_timeout: float = Field(default=5.0, gt=0)

    # ---- the delivery service (GoBelieve's client protocol, wire protocol §1.1) ----
    # Where clients connect: raw frames over TCP, and WebSocket on path /ws; "" turns one off.
    delivery_tcp_addr: str = "127.0.0.1:23000"
    delivery_ws_addr: str = "127.0.0.1:13891"
    # The same over TLS (TCP and WebSocket), with this certificate chain and key (PEM files).
    delivery_tls_addr: str = ""
    delivery_wss_addr: str = ""
    delivery_cert_file: str = ""
    delivery_key_file: str = ""
    # A connection that sends no frame for this long is closed (wire protocol §5.4).
    delivery_idle_timeout: float = Field(default=360.0, gt=0)
    # A delivery server re-announces its connected agents this often (seconds); the customer
    # service takes a server that has not reported for three of these as gone.
    delivery_presence_interval: float = Field(default=30.0, gt=0)
    # Where a delivery server reaches the messages service's internal API (distributed mode).
    messages_url: str = "http://127.0.0.1:8083"

    @field_validator("http_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_addr(value)
        return value

    @field_validator(
        "delivery_tcp_addr", "delivery_ws_addr", "delivery_tls_addr", "delivery_wss_addr"
    )
    @classmethod
    def _optional_host_port(cls, value: str) -> str:
        if value:
            split_addr(value)
        return value


def split_addr(addr: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; raises ValueError on anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)
