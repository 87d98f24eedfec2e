"""Parley's configuration: one pydantic-settings class, read from ``PARLEY_*`` variables.

Every process (a single service, the all-in-one runner, a management command) builds one
``Settings`` at startup; an invalid value stops it there with pydantic's message.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MONGO_ADDR = "127.0.0.1:27018"
EMBEDDED_MONGO_URL = f"mongodb://{EMBEDDED_MONGO_ADDR}/"


class Settings(BaseSettings):
    """All of Parley's settings; the README's "Settings" table documents each one."""

    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="ignore", frozen=True)

    http_addr: str = "127.0.0.1:8080"
    mongo_url: str = EMBEDDED_MONGO_URL
    mongo_db: str = "parley"
    # None: the in-process bus (all-in-one only). A URL: RabbitMQ.
    amqp_url: str | None = None
    amqp_exchange: str = "parley.events"
    amqp_prefetch: int = Field(default=64, ge=1)
    publish_timeout: float = Field(default=5.0, gt=0)
    # Where services reach the auth service's internal verification API (distributed mode).
    auth_url: str = "http://127.0.0.1:8081"
    # Shared secret on the internal API; empty disables the check (keep it behind the network).
    internal_secret: str = ""
    auth_cache_ttl: float = Field(default=10.0, ge=0)
    # The header that carries the client address for the per-app IP allow-list (spec §1.2).
    client_ip_header: str = "X-Real-IP"
    # appid -> allowed client IPs, as JSON: PARLEY_IP_PERMISSIONS='{"7": ["10.0.0.1"]}'.
    ip_permissions: dict[int, list[str]] = Field(default_factory=dict)
    outbox_relay_interval: float = Field(default=5.0, gt=0)
    outbox_grace: float = Field(default=10.0, ge=0)
    log_json: bool = False
    log_level: str = "info"
    request_id_header: str = "X-Request-ID"

    @field_validator("http_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_addr(value)
        return value


def split_addr(addr: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; raises ValueError on anything else."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)
