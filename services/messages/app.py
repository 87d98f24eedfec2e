"""The messages service: message injection (S11-S16), offline counts (S19), history (S20),
the dequeue no-op (X4), group notifications from ``group.*`` events, and an internal API for
delivery servers (inbox paging, sync keys, customer messages)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from shared.auth import client_auth, server_auth, server_or_client_auth
from shared.errors import DISABLED_APPID, INVALID_UID, InvalidParam, ParleyError
from shared.http import (
    check_count,
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
from shared.logs import request_id_of
from shared.metrics import PENDING_MESSAGES, backlog_probes
from shared.openapi import Operation, Query
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    SETTINGS,
    Deps,
    bus_ctx,
    cors_preflight,
    database_ctx,
    require_internal,
    service_app,
    verifier_ctx,
)

from .delivery_api import LocalMessageStore, add_delivery_routes
from .domain import CMD_CUSTOMER, MessagesDomain
from .repository import INDEXES, Entry, MessagesRepository, user_inbox

log = structlog.get_logger("parley.messages")

SERVICE = "messages"
MESSAGES = web.AppKey("messages_domain", MessagesDomain)
CUSTOMERS = web.AppKey("customer_directory", CustomerDirectory)


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


M = TypeVar(
    "M", PeerRequest, SystemRequest, NotificationRequest, GroupNotificationRequest, RoomRequest
)


async def read_content_model(request: web.Request, model: type[M]) -> M:
    """The body of S11-S16: its ``content`` at most ``PARLEY_MAX_CONTENT_BYTES`` in UTF-8."""
    body = await read_model(request, model)
    if len(body.content.encode()) > request.app[SETTINGS].max_content_bytes:
        raise InvalidParam()
    return body


async def injection_auth(request: web.Request) -> int:
    """Scheme A, then the disabled-app check, both before the body is read (spec S11-S16)."""
    appid = await server_auth(request)
    if appid in request.app[SETTINGS].disabled_app_ids:
        raise ParleyError(DISABLED_APPID)
    return appid


# ---- S11-S16 ------------------------------------------------------------------------------


async def post_peer(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, PeerRequest)
    await domain(request).post_peer(
        appid, body.sender, body.receiver, body.content, request_id_of(request)
    )
    return empty_ok()


async def post_group(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, PeerRequest)
    await domain(request).post_group(
        appid, body.sender, body.receiver, body.content, request_id_of(request)
    )
    return empty_ok()


async def post_system(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, SystemRequest)
    receivers = list(body.receivers or [])
    check_count(receivers, request.app[SETTINGS].max_members_per_request)
    if body.receiver is not None:
        receivers.insert(0, body.receiver)
    if not receivers:
        raise InvalidParam()
    await domain(request).post_system(appid, receivers, body.content, request_id_of(request))
    return empty_ok()


async def post_notification(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, NotificationRequest)
    await domain(request).post_notification(
        appid, body.receiver, body.content, request_id_of(request)
    )
    return empty_ok()


async def post_group_notification(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, GroupNotificationRequest)
    await domain(request).post_group_notification(
        appid, body.group_id, body.content, request_id_of(request)
    )
    return empty_ok()


async def post_room(request: web.Request) -> web.Response:
    appid = await injection_auth(request)
    body = await read_content_model(request, RoomRequest)
    await domain(request).post_room(
        appid, body.sender, body.receiver, body.content, request_id_of(request)
    )
    return empty_ok()


# ---- S19, S20, X4 -------------------------------------------------------------------------


async def offline_count(request: web.Request) -> web.Response:
    appid, owner = await server_or_client_auth(request)
    uid = query_id(request, "uid")
    if owner is not None:
        uid = owner.uid  # a client reads only its own count
    elif not uid:
        customer_id = request.query.get("customer_id", "")
        if customer_id:
            uid = await request.app[CUSTOMERS].client_id(appid, customer_id)
    if not uid:
        raise ParleyError(INVALID_UID)
    try:
        count = await domain(request).offline_count(appid, uid)
    except Exception:  # a badge hint: a failed read answers "nothing new" (spec S19)
        log.exception("offline count failed")
        count = 0
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
    entries = await domain(request).history(owner.appid, owner.uid)
    if store:
        # Only customer-service messages with an agent of that store (spec S20).
        sellers = set(await request.app[CUSTOMERS].store_sellers(owner.appid, store))
        kefu = request.app[SETTINGS].kefu_appid
        entries = [
            e
            for e in entries
            if e.cmd == CMD_CUSTOMER
            and (
                (e.receiver_appid == kefu and e.receiver in sellers)
                or (e.sender_appid == kefu and e.sender in sellers)
            )
        ]
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
    require_internal(request)
    appid = query_id(request, "appid")
    uid, gid = query_id(request, "uid"), query_id(request, "gid")
    if appid is None or (uid is None) == (gid is None):
        raise InvalidParam()
    after = query_id(request, "after") or 0
    limit = min(query_id(request, "limit") or 1000, 3000)
    owner = user_inbox(uid) if uid is not None else f"g:{gid}"
    entries = await domain(request).repo.page(appid, owner, after, limit)
    return data([render_entry(e) for e in entries])


async def internal_sync_key(request: web.Request) -> web.Response:
    require_internal(request)
    body = parse_model(SyncKeyRequest, await read_json(request))
    await domain(request).repo.set_sync_key(body.appid, user_inbox(body.uid), body.key)
    return empty_ok()


async def internal_customer_message(request: web.Request) -> web.Response:
    require_internal(request)
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
}


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)
    app.router.add_get("/internal/inbox", internal_inbox)
    app.router.add_post("/internal/sync-key", internal_sync_key)
    app.router.add_post("/internal/messages/customer", internal_customer_message)
    add_delivery_routes(app, MESSAGES)  # delivery servers: sync pages, sync keys, client sends

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        groups: GroupDirectory = deps.groups or HttpGroupDirectory(
            settings.groups_url, settings.internal_secret
        )
        customers: CustomerDirectory = deps.customers or HttpCustomerDirectory(
            settings.customer_url, settings.internal_secret
        )
        repo = MessagesRepository(app[DB])
        await repo.migrate()
        messages = MessagesDomain(repo, app[BUS], settings, groups)
        app[MESSAGES] = messages
        app[CUSTOMERS] = customers
        if deps.messages is None:
            deps.messages = LocalMessageStore(messages)  # a delivery server in this process
        subscription = await app[BUS].subscribe(
            f"{settings.amqp_exchange}.messages.group-notifications",
            ["group.#"],
            messages.on_group_event,
        )
        posts = app[DB]["messages_posts"]

        async def pending_messages() -> None:
            PENDING_MESSAGES.set(await posts.count_documents({"state": "pending"}))

        backlog_probes(app).append(pending_messages)
        recovery = asyncio.create_task(
            messages.run_recovery(settings.outbox_relay_interval, settings.outbox_grace),
            name="messages-recovery",
        )
        try:
            yield
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
            await subscription.cancel()
            await repo.close()
            if deps.groups is None:
                await groups.close()
            if deps.customers is None:
                await customers.close()

    app.cleanup_ctx.extend(
        [
            database_ctx(deps, INDEXES),
            bus_ctx(deps, SERVICE),
            verifier_ctx(deps),
            domain_ctx,
        ]
    )
    return app
