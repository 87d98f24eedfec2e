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
        if "routing_key" not in cls.__dict__:
            return  # a base class shared by several events
        version = cls.model_fields["version"].default
        if not isinstance(version, int):
            raise TypeError(f"{cls.__name__} must set a Literal version default")
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
    now the user's stored name. Sent when a grant creates the token or changes the name (a
    re-grant that changes nothing sends nothing); the token itself is never put on the bus."""

    routing_key: ClassVar[str] = "token.granted"
    version: Literal[1] = 1
    uid: int
    user_name: str
    customer: bool = False  # a customer-service visitor (S17/X2), not an app user


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


# ---- groups -------------------------------------------------------------------------------


class GroupChange(Event):
    """Every ``group.*`` event names the group as it is after the change (its name and type)
    and a revision that grows with each change, so a consumer can ignore anything older."""

    gid: int
    name: str
    super: bool
    revision: int

    @property
    def timestamp(self) -> int:
        return int(self.occurred_at.timestamp())


class GroupEvent(GroupChange):
    """A group event that also lists the member uids after the change (for
    ``group.disbanded``: the members just before)."""

    members: list[int]


class GroupCreated(GroupEvent):
    routing_key: ClassVar[str] = "group.created"
    version: Literal[1] = 1
    master: int
    members_given: list[int | dict[str, Any]]  # the request's list: uids and member objects


class GroupRenamed(GroupEvent):
    routing_key: ClassVar[str] = "group.renamed"
    version: Literal[1] = 1


class GroupNoticeChanged(GroupEvent):
    routing_key: ClassVar[str] = "group.notice.changed"
    version: Literal[1] = 1
    notice: str


class GroupDisbanded(GroupEvent):
    routing_key: ClassVar[str] = "group.disbanded"
    version: Literal[1] = 1


class GroupUpgraded(GroupEvent):
    routing_key: ClassVar[str] = "group.upgraded"
    version: Literal[1] = 1


class GroupMemberAdded(GroupEvent):
    routing_key: ClassVar[str] = "group.member.added"
    version: Literal[1] = 1
    member_id: int
    member_name: str | None = None
    avatar: str | None = None
    inviter: dict[str, Any] | None = None
    joined: bool  # false: already a member (nothing stored changed; members are told again)


class GroupMemberRemoved(GroupEvent):
    routing_key: ClassVar[str] = "group.member.removed"
    version: Literal[1] = 1
    member_id: int
    member_name: str | None = None
    avatar: str | None = None
    was_member: bool


class AddedMember(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    member_id: int
    member_name: str | None = None
    avatar: str | None = None
    joined: bool  # false: already a member (nothing stored changed; members are told again)


class RemovedMember(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    member_id: int
    member_name: str | None = None
    avatar: str | None = None
    was_member: bool


class GroupMembersAdded(GroupChange):
    """Version 2: one event per call, carrying the listed members only (version 1 carried the
    whole member list once per listed member: O(n x members) bytes for one call)."""

    routing_key: ClassVar[str] = "group.member.added"
    version: Literal[2] = 2
    added: list[AddedMember]
    inviter: dict[str, Any] | None = None


class GroupMembersRemoved(GroupChange):
    """Version 2: one event per call, carrying the listed members only."""

    routing_key: ClassVar[str] = "group.member.removed"
    version: Literal[2] = 2
    removed: list[RemovedMember]


class GroupMemberMuted(GroupEvent):
    routing_key: ClassVar[str] = "group.member.muted"
    version: Literal[1] = 1
    member_id: int
    mute: bool


class GroupMemberNicknameChanged(GroupEvent):
    routing_key: ClassVar[str] = "group.member.nickname.changed"
    version: Literal[1] = 1
    member_id: int
    nickname: str


class GroupMemberDoNotDisturbChanged(GroupEvent):
    routing_key: ClassVar[str] = "group.member.dnd.changed"
    version: Literal[1] = 1
    member_id: int
    do_not_disturb: bool


# ---- messages -----------------------------------------------------------------------------


class InboxKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    uid: int
    key: int


class MessageEvent(Event):
    """A message Parley accepted. ``msg_id`` is stable across redeliveries; ``timestamp`` is
    Unix seconds; stored messages carry the sync keys they were stored under."""

    msg_id: str
    content: str
    timestamp: int


class PeerMessage(MessageEvent):
    routing_key: ClassVar[str] = "message.peer"
    version: Literal[1] = 1
    sender: int
    receiver: int
    keys: list[InboxKey]  # the receiver's and the sender's inbox entries


class GroupMessage(MessageEvent):
    routing_key: ClassVar[str] = "message.group"
    version: Literal[1] = 1
    sender: int
    gid: int
    super: bool
    members: list[int]
    keys: list[InboxKey]  # normal group: one entry per member inbox
    group_key: int | None = None  # super group: the entry in the group queue


class SystemMessage(MessageEvent):
    routing_key: ClassVar[str] = "message.system"
    version: Literal[1] = 1
    keys: list[InboxKey]  # one per receiver


class NotificationMessage(MessageEvent):
    """Online-only: never stored; delivery servers pass it to live connections."""

    routing_key: ClassVar[str] = "message.notification"
    version: Literal[1] = 1
    receiver: int


class GroupNotificationMessage(MessageEvent):
    routing_key: ClassVar[str] = "message.group_notification"
    version: Literal[1] = 1
    gid: int
    super: bool
    recipients: list[int]
    keys: list[InboxKey]  # normal group (and any disband): one entry per recipient inbox
    group_key: int | None = None  # super group: the entry in the group queue
    cause: str | None = None  # the event_id of the group change it announces, if any


class CustomerMessage(MessageEvent):
    """A customer-service message (cmd 64) between a host app's visitor and an agent of the
    customer-service app; stored in both parties' inboxes, each in its own app."""

    routing_key: ClassVar[str] = "message.customer"
    version: Literal[1] = 1
    sender_appid: int
    sender: int
    receiver_appid: int
    receiver: int
    sender_key: int
    receiver_key: int


class RoomMessage(MessageEvent):
    """Not stored; delivery servers pass it to the room's current occupants."""

    routing_key: ClassVar[str] = "message.room"
    version: Literal[1] = 1
    sender: int
    room: int


# ---- customer service ---------------------------------------------------------------------


class StoreCreated(Event):
    """An app's customer-service store was created (``parley store create``)."""

    routing_key: ClassVar[str] = "customer.store.created"
    version: Literal[1] = 1
    store_id: int
    name: str


class AgentAdded(Event):
    """An agent (seller) joined a store (``parley store add-agent``); ``appid`` is the app of
    the store."""

    routing_key: ClassVar[str] = "customer.agent.added"
    version: Literal[1] = 1
    store_id: int
    seller_id: int
    name: str


class CustomerRegistered(Event):
    routing_key: ClassVar[str] = "customer.registered"
    version: Literal[1] = 1
    customer_id: str | None  # None: an anonymous visitor
    client_id: int
    store_id: int


class AgentPresence(Event):
    """An agent's status, published by whoever knows it: ``POST
    /internal/agents/{seller_id}/presence`` (``appid``: the app of the agent's store), or a
    delivery server seeing the agent's connections (``appid``: the customer-service app;
    ``replica``: the server's id, random per process; ``ttl``: seconds the report holds unless
    the server reports again). A server's report is about its own connections only: the agent
    is online while some live server reports it online."""

    routing_key: ClassVar[str] = "agent.presence"
    version: Literal[1] = 1
    seller_id: int
    status: Literal["online", "offline"]
    replica: str | None = Field(default=None, min_length=1, max_length=64)
    ttl: float | None = Field(default=None, gt=0)


class SupporterAssigned(Event):
    routing_key: ClassVar[str] = "customer.supporter.assigned"
    version: Literal[1] = 1
    uid: int
    store_id: int
    seller_id: int


# ---- delivery -----------------------------------------------------------------------------


class RealtimeMessage(MessageEvent):
    """An RT frame (wire protocol §7.2) a client sent to a delivery server: never stored;
    every delivery replica passes it to the receiver's live connections."""

    routing_key: ClassVar[str] = "delivery.rt"
    version: Literal[1] = 1
    sender: int
    receiver: int
