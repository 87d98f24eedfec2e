"""The messages service: message injection (S11-S16), offline counts (S19), history (S20),
the dequeue no-op (X4), group notifications from ``group.*`` events, and an internal API for
delivery servers (inbox paging, sync keys, customer messages)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from shared.auth import client_auth, server_auth, server_or_client_auth
from shared.errors import InvalidParam
from shared.http import (
    data,
    empty_ok,
    parse_model,
    query_id,
    read_json,
    read_model,
)
from shared.ids import Id, IdOrZero, Text
from shared.internal import (
    CustomerDirectory,
    GroupDirectory,
    HttpCustomerDirectory,
    HttpGroupDirectory,
)
from shared.jsonio import json_response
from shared.lifecycle import Consumer, ServiceSpec, consumers_ctx, periodic_ctx, resource_ctx
from shared.logs import request_id_of
from shared.metrics import PENDING_MESSAGES, backlog_probes
from shared.openapi import Operation, Query
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    Deps,
    cors_preflight,
    service_app,
    service_steps,
)

from .delivery_api import LocalMessageStore, delivery_handlers
from .domain import MessagesDomain
from .repository import INDEXES, Entry, MessagesRepository
from .rules import CMD_CUSTOMER

log = structlog.get_logger("parley.messages")
M = TypeVar("M", bound=BaseModel)

SERVICE = "messages"
MESSAGES = web.AppKey("messages_domain", MessagesDomain)
CUSTOMERS = web.AppKey("customer_directory", CustomerDirectory)
GROUP_DIRECTORY = web.AppKey("group_directory", GroupDirectory)


def domain(request: web.Request) -> MessagesDomain:
    return request.app[MESSAGES]


class PeerRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sender: Id
    receiver: Id
    content: Text


class SystemRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    receiver: Id | None = None
    receivers: list[Id] | None = None  # the current IM core's many-receiver form (S13 MAY)
    content: Text


class NotificationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    receiver: Id
    content: Text


class RoomRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sender: IdOrZero  # may be 0 (spec S16)
    receiver: Id  # the room
    content: Text


class GroupNotificationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    group_id: Id
    content: Text


async def injection(request: web.Request, model: type[M]) -> tuple[int, M, str]:
    """Scheme A, then the disabled-app check, both before the body is read (spec S11-S16);
    then the body as ``model``: the app, the body and the request's id."""
    appid = await server_auth(request)
    domain(request).check_app_enabled(appid)
    return appid, await read_model(request, model), request_id_of(request)


# ---- S11-S16 ------------------------------------------------------------------------------


async def post_peer(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, PeerRequest)
    await domain(request).post_peer(appid, body.sender, body.receiver, body.content, rid)
    return empty_ok()


async def post_group(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, PeerRequest)
    await domain(request).post_group(appid, body.sender, body.receiver, body.content, rid)
    return empty_ok()


async def post_system(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, SystemRequest)
    await domain(request).post_system(appid, body.receiver, body.receivers or [], body.content, rid)
    return empty_ok()


async def post_notification(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, NotificationRequest)
    await domain(request).post_notification(appid, body.receiver, body.content, rid)
    return empty_ok()


async def post_group_notification(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, GroupNotificationRequest)
    await domain(request).post_group_notification(appid, body.group_id, body.content, rid)
    return empty_ok()


async def post_room(request: web.Request) -> web.Response:
    appid, body, rid = await injection(request, RoomRequest)
    await domain(request).post_room(appid, body.sender, body.receiver, body.content, rid)
    return empty_ok()


# ---- S19, S20, X4 -------------------------------------------------------------------------


async def offline_count(request: web.Request) -> web.Response:
    appid, owner = await server_or_client_auth(request)
    uid = query_id(request, "uid")
    customer_id = request.query.get("customer_id", "")
    if owner is not None:
        uid, customer_id = owner.uid, ""  # a client reads only its own count
    count = await domain(request).offline_count(appid, uid, customer_id)
    return data({"count": count, "new": 1 if count > 0 else 0})


def render_entry(entry: Entry) -> dict[str, Any]:
    item = {
        "id": entry.key,
        "command": entry.cmd,
        "sender": entry.sender,
        "receiver": entry.receiver,
        "timestamp": entry.timestamp,
        "content": entry.content,
    }
    if entry.cmd == CMD_CUSTOMER:
        item["sender_appid"] = entry.sender_appid
        item["receiver_appid"] = entry.receiver_appid
    return item


async def history(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    store = query_id(request, "store")
    entries = await domain(request).history(owner.appid, owner.uid, store)
    return data([render_entry(e) for e in entries])


async def dequeue(request: web.Request) -> web.Response:
    await client_auth(request)
    return data({"success": True})  # a no-op kept for old web clients (spec X4)


# ---- internal API (delivery servers) ------------------------------------------------------


class CustomerMessageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sender_appid: int
    sender: int
    receiver_appid: int
    receiver: int
    content: str


class SyncKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appid: int
    uid: int
    key: int


async def internal_inbox(request: web.Request) -> web.Response:
    """``GET /internal/inbox?appid&uid|gid&after&limit``: entries after a sync key, oldest
    first, never past a gap (what a delivery server answers SYNC with)."""
    appid = query_id(request, "appid")
    if appid is None:
        raise InvalidParam()
    entries = await domain(request).inbox_page(
        appid,
        query_id(request, "uid"),
        query_id(request, "gid"),
        query_id(request, "after") or 0,
        query_id(request, "limit"),
    )
    return data([render_entry(e) for e in entries])


async def internal_sync_key(request: web.Request) -> web.Response:
    body = parse_model(SyncKeyRequest, await read_json(request))
    await domain(request).set_sync_key(body.appid, body.uid, body.key)
    return empty_ok()


async def internal_customer_message(request: web.Request) -> web.Response:
    body = parse_model(CustomerMessageRequest, await read_json(request))
    post = await domain(request).post_customer(
        body.sender_appid,
        body.sender,
        body.receiver_appid,
        body.receiver,
        body.content,
        request_id_of(request),
    )
    return json_response({"msg_id": post.id})


# ---- the API description (for /openapi.json) ------------------------------------------------


class OfflineCount(BaseModel):
    count: int
    new: Literal[0, 1]


class HistoryEntry(BaseModel):
    id: int
    command: int
    sender: int
    receiver: int
    timestamp: int
    content: str
    sender_appid: int | None = None
    receiver_appid: int | None = None


class Dequeued(BaseModel):
    success: Literal[True]


API: dict[str, Operation] = {
    "post_peer": Operation("Send a peer message (S11).", "server", PeerRequest, answer="empty"),
    "post_group": Operation("Send a group message (S12).", "server", PeerRequest, answer="empty"),
    "post_system": Operation(
        "Send a system message (S13).", "server", SystemRequest, answer="empty"
    ),
    "post_notification": Operation(
        "Send a notification, not stored (S14).", "server", NotificationRequest, answer="empty"
    ),
    "post_group_notification": Operation(
        "Send a group notification (S15).", "server", GroupNotificationRequest, answer="empty"
    ),
    "post_room": Operation(
        "Send a room message, not stored (S16).", "server", PeerRequest, answer="empty"
    ),
    "offline_count": Operation(
        "How many messages a user has not synced (S19).",
        "server_or_bearer",
        data=OfflineCount,
        query=(
            Query("uid", int, "the user (server calls)"),
            Query("customer_id", str, "a visitor's customer id (server calls)"),
        ),
    ),
    "history": Operation(
        "The caller's recent messages (S20).",
        "bearer",
        data=list[HistoryEntry],
        query=(Query("store", int, "only customer-service messages with this store's agents"),),
    ),
    "dequeue": Operation("Kept for old web clients; does nothing (X4).", "bearer", data=Dequeued),
}


HANDLERS = {
    "post_peer": post_peer,
    "post_group": post_group,
    "post_system": post_system,
    "post_notification": post_notification,
    "post_group_notification": post_group_notification,
    "post_room": post_room,
    "offline_count": offline_count,
    "history": history,
    "dequeue": dequeue,
    "cors_preflight": cors_preflight,
    "internal_inbox": internal_inbox,
    "internal_sync_key": internal_sync_key,
    "internal_customer_message": internal_customer_message,
    **delivery_handlers(MESSAGES),
}

# Group notifications (spec §2.6), stored from the groups service's ``group.*`` events. A big
# group's member notifications are many posts: their deadline is generous.
CONSUMERS = (
    Consumer(
        "messages.group-notifications",
        ("group.#",),
        lambda app: app[MESSAGES].on_group_event,
        timeout=300.0,
    ),
)


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        repo = MessagesRepository(app[DB])
        try:
            await repo.migrate()
            app[MESSAGES] = MessagesDomain(
                repo, app[BUS], settings, app[GROUP_DIRECTORY], app[CUSTOMERS]
            )
            if deps.messages is None:  # a delivery server in this process uses it directly
                deps.messages = LocalMessageStore(app[MESSAGES])
            posts = app[DB]["messages_posts"]

            async def pending_messages() -> None:
                PENDING_MESSAGES.set(await posts.count_documents({"state": "pending"}))

            backlog_probes(app).append(pending_messages)
            yield
        finally:
            await repo.close()

    app.cleanup_ctx.extend(
        service_steps(
            deps,
            SERVICE,
            INDEXES,
            resource_ctx(
                GROUP_DIRECTORY,
                lambda settings: HttpGroupDirectory(settings.groups_url, settings.internal_secret),
                lambda: deps.groups,
            ),
            resource_ctx(
                CUSTOMERS,
                lambda settings: HttpCustomerDirectory(
                    settings.customer_url, settings.internal_secret
                ),
                lambda: deps.customers,
            ),
            domain_ctx,
            consumers_ctx(*CONSUMERS),
            # Posts left pending (a crash between accepting and announcing) are finished.
            periodic_ctx(
                "messages-recovery",
                lambda app: functools.partial(app[MESSAGES].recover, settings.outbox_grace),
                lambda settings: settings.outbox_relay_interval,
            ),
        )
    )
    return app


SPEC = ServiceSpec(
    SERVICE,
    create_app,
    provides=frozenset({"messages"}),
    needs=frozenset({"verifier", "groups", "customers"}),
)
