"""Parley's domain events: one frozen, versioned pydantic model per routing key.

Every event carries ``event_id`` (consumers deduplicate by it), ``appid`` (tenancy),
``occurred_at`` (aware UTC) and a ``version``. A breaking change to a payload is a new class
with the next version, registered beside the old one, so consumers read both during a rollout.
The README's "Events" section documents each routing key and its fields.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event_id() -> str:
    return uuid.uuid4().hex


class MalformedEvent(Exception):
    """A delivery that is not a known, valid event; it is dead-lettered, never retried."""


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    routing_key: ClassVar[str]
    _registry: ClassVar[dict[tuple[str, int], type[Event]]] = {}

    version: int
    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    appid: int
    occurred_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        version_field = cls.model_fields["version"]
        version = version_field.default
        if not isinstance(version, int) or "routing_key" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set routing_key and a Literal version default")
        key = (cls.routing_key, version)
        if key in Event._registry:
            raise TypeError(f"event {key} is defined twice")
        Event._registry[key] = cls

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def parse_event(routing_key: str, body: bytes) -> Event:
    """Decode a delivery into its event class, by routing key and version."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedEvent("not a JSON object")
    version = raw.get("version")
    cls = Event._registry.get((routing_key, version)) if isinstance(version, int) else None
    if cls is None:
        raise MalformedEvent(f"unknown event {routing_key!r} version {version!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise MalformedEvent(str(exc)) from exc


def event_types() -> dict[tuple[str, int], type[Event]]:
    return dict(Event._registry)


# ---- auth ---------------------------------------------------------------------------------


class TokenGranted(Event):
    """``POST /auth/grant`` answered: (appid, uid) holds a permanent token; ``user_name`` is
    now the user's stored name. Sent on every grant, first or repeated; the token itself is
    never put on the bus."""

    routing_key: ClassVar[str] = "token.granted"
    version: Literal[1] = 1
    uid: int
    user_name: str


class DoNotDisturb(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peer_uid: int
    on: bool


class UserSettingsChanged(Event):
    """``POST``/``PATCH /users/{uid}`` (and grant's name change is in ``token.granted``).
    Only the settings present in the request are set; the others are null."""

    routing_key: ClassVar[str] = "user.settings.changed"
    version: Literal[1] = 1
    uid: int
    name: str | None = None
    forbidden: bool | None = None
    do_not_disturb: DoNotDisturb | None = None
    mute: bool | None = None


class AppCreated(Event):
    """An app was created (``parley app create`` or the demo app of ``parley run``)."""

    routing_key: ClassVar[str] = "app.created"
    version: Literal[1] = 1
    name: str
