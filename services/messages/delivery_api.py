"""The messages service's side of ``shared/inboxes.py``: what delivery servers ask of it (inbox
pages for SYNC and SYNC_GROUP, stored sync keys, storing client-sent messages), in process
(``LocalMessageStore``) and as the internal API ``/internal/delivery/...``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from shared.errors import InvalidParam
from shared.http import parse_model, query_id, read_json
from shared.inboxes import DeliveryPost, InboxEntry, InboxPage, MessageStore, Stored
from shared.jsonio import json_response
from shared.logs import request_id_of

from .domain import MessagesDomain
from .repository import Entry, group_queue, user_inbox
from .rules import CMD_CUSTOMER

MAX_PAGE = 3000


def _key_owner(uid: int, gid: int) -> str:
    """Where a user's acknowledged position is kept: their inbox's, or per super group."""
    return f"{user_inbox(uid)}:{group_queue(gid)}" if gid else user_inbox(uid)


def _entry(entry: Entry) -> InboxEntry:
    return InboxEntry(
        id=entry.key,
        command=entry.cmd,
        sender=entry.sender,
        receiver=entry.receiver,
        timestamp=entry.timestamp,
        content=entry.content,
        msg=entry.msg,
        sender_appid=entry.sender_appid,
        receiver_appid=entry.receiver_appid,
    )


class LocalMessageStore(MessageStore):
    def __init__(self, domain: MessagesDomain) -> None:
        self._domain = domain

    async def page(self, appid: int, uid: int, gid: int, after: int, limit: int) -> InboxPage:
        repo = self._domain.repo
        owner = group_queue(gid) if gid else user_inbox(uid)
        limit = max(1, min(limit, MAX_PAGE))
        start = after or await repo.sync_key(appid, _key_owner(uid, gid))
        last = await repo.last_key(appid, owner)
        if gid and not start:
            start = max(0, last - limit)  # a super group from nothing: its newest entries
        entries = await repo.page(appid, owner, start, limit) if last > start else []
        return InboxPage(start=start, last=last, entries=[_entry(e) for e in entries])

    async def set_sync_key(self, appid: int, uid: int, gid: int, key: int) -> None:
        if key > 0:
            await self._domain.repo.set_sync_key(appid, _key_owner(uid, gid), key)

    async def post(self, post: DeliveryPost, rid: str = "") -> Stored | None:
        domain = self._domain
        if post.kind == "customer":
            return await self._customer(post, rid)
        fields: dict[str, Any] = {"sender": post.sender}
        if post.kind == "group":
            group = await domain.groups.get_group(post.appid, post.receiver)
            if group is None:
                return None
            fields |= {"gid": post.receiver, "super": group.super, "members": group.members}
        else:
            fields["receiver"] = post.receiver
        accepted = domain._new(post.appid, post.kind, post.content, **fields)
        accepted.id = post.msg_id
        done = await domain.post(accepted, rid)
        keys = {int(o[2:]): k for o, k in done.keys.items() if o.startswith("u:")}
        return Stored(keys=keys, group_key=done.keys.get(group_queue(post.receiver)))

    async def _customer(self, post: DeliveryPost, rid: str) -> Stored:
        """As ``MessagesDomain.post_customer``, under the delivery server's id: the receiver's
        copy in the receiver's app first (idempotent by id), then the post in the sender's."""
        domain = self._domain
        accepted = domain._new(
            post.appid,
            "customer",
            post.content,
            sender=post.sender,
            receiver=post.receiver,
            sender_appid=post.appid,
            receiver_appid=post.receiver_appid,
        )
        accepted.id = post.msg_id
        fields = {
            "cmd": CMD_CUSTOMER,
            "sender": post.sender,
            "receiver": post.receiver,
            "sender_appid": post.appid,
            "receiver_appid": post.receiver_appid,
            "content": post.content,
            "timestamp": accepted.timestamp,
        }
        receiver_inbox = user_inbox(post.receiver)
        keys = await domain.repo.append(post.receiver_appid, [receiver_inbox], accepted.id, fields)
        accepted.receiver_key = keys[receiver_inbox]
        done = await domain.post(accepted, rid)
        return Stored(keys={post.sender: done.keys[user_inbox(post.sender)]})


# ---- the internal API -----------------------------------------------------------------------


class SyncKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appid: int
    uid: int
    gid: int = 0
    key: int


Handler = Callable[[web.Request], Awaitable[web.Response]]


def delivery_handlers(key: web.AppKey[MessagesDomain]) -> dict[str, Handler]:
    """The handlers of the ``/internal/delivery/*`` rows of the routing table (behind the
    internal-secret check, as every internal row), for the messages domain at ``key``."""

    def local(request: web.Request) -> LocalMessageStore:
        return LocalMessageStore(request.app[key])

    async def inbox(request: web.Request) -> web.Response:
        """``GET /internal/delivery/inbox?appid&uid[&gid]&after&limit``."""
        appid, uid = query_id(request, "appid"), query_id(request, "uid")
        if appid is None or uid is None:
            raise InvalidParam()
        page = await local(request).page(
            appid,
            uid,
            query_id(request, "gid") or 0,
            query_id(request, "after") or 0,
            query_id(request, "limit") or MAX_PAGE,
        )
        return json_response(page.model_dump())

    async def sync_key(request: web.Request) -> web.Response:
        body = parse_model(SyncKeyBody, await read_json(request))
        await local(request).set_sync_key(body.appid, body.uid, body.gid, body.key)
        return json_response({})

    async def messages(request: web.Request) -> web.Response:
        body = parse_model(DeliveryPost, await read_json(request))
        stored = await local(request).post(body, request_id_of(request))
        if stored is None:
            raise web.HTTPNotFound()
        return json_response(stored.model_dump())

    return {
        "internal_delivery_inbox": inbox,
        "internal_delivery_sync_key": sync_key,
        "internal_delivery_messages": messages,
    }
