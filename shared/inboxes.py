"""What a delivery server needs of the messages service: inbox pages for sync, stored sync
keys, and storing the messages clients send over their connections exactly as REST-sent ones.

An interface with two implementations, as in ``shared/internal.py``: the messages service's
internal HTTP API (``/internal/delivery/...``), or, in the same process, the messages domain
itself (put in ``Deps.messages`` by the messages service at startup).
"""

from __future__ import annotations

import abc
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.errors import ParleyError
from shared.internal import OverInternalApi


class InboxEntry(BaseModel):
    """One stored message under its key in an inbox or a super group's queue. ``msg`` is the
    accepted message's id (the id of its ``message.*`` event)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: int  # the sync key
    command: int
    sender: int
    receiver: int
    timestamp: int
    content: str
    msg: str = ""
    sender_appid: int | None = None
    receiver_appid: int | None = None


class InboxPage(BaseModel):
    """Entries after ``start`` (the key asked for, or the stored one when asked from 0), oldest
    first, never past a gap; ``last`` is the inbox's last committed key."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    start: int
    last: int
    entries: list[InboxEntry]


class DeliveryPost(BaseModel):
    """A message a client sent over its connection, stored as the REST endpoints store it, under
    the id the delivery server chose (its event's id)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["peer", "group", "customer"]
    msg_id: str
    appid: int
    sender: int
    receiver: int  # a uid, or a group id
    content: str
    receiver_appid: int = 0  # a customer message's receiver's app


class Stored(BaseModel):
    """Where a posted message was stored: the key in each user's inbox, or in the group queue."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    keys: dict[int, int]
    group_key: int | None = None


class MessageStore(abc.ABC):
    @abc.abstractmethod
    async def page(self, appid: int, uid: int, gid: int, after: int, limit: int) -> InboxPage:
        """The user's inbox (``gid`` 0) or super group ``gid``'s queue after ``after``; from 0,
        after the user's stored key (for a group with none: the newest ``limit`` entries)."""

    @abc.abstractmethod
    async def set_sync_key(self, appid: int, uid: int, gid: int, key: int) -> None:
        """Raise the user's stored key (of super group ``gid``, when not 0); never lowers it."""

    @abc.abstractmethod
    async def post(self, post: DeliveryPost) -> Stored | None:
        """Store and announce a client's message; None when the group does not exist."""

    async def close(self) -> None:
        return None


class HttpMessageStore(OverInternalApi, MessageStore):
    async def page(self, appid: int, uid: int, gid: int, after: int, limit: int) -> InboxPage:
        params = {"appid": str(appid), "uid": str(uid), "after": str(after), "limit": str(limit)}
        if gid:
            params["gid"] = str(gid)
        status, body = await self._client.call("GET", "/internal/delivery/inbox", params=params)
        if status != 200:
            raise ParleyError("messages service unavailable", status=503)
        return InboxPage.model_validate(body)

    async def set_sync_key(self, appid: int, uid: int, gid: int, key: int) -> None:
        status, _ = await self._client.call(
            "POST",
            "/internal/delivery/sync-key",
            json={"appid": appid, "uid": uid, "gid": gid, "key": key},
        )
        if status != 200:
            raise ParleyError("messages service unavailable", status=503)

    async def post(self, post: DeliveryPost) -> Stored | None:
        status, body = await self._client.call(
            "POST", "/internal/delivery/messages", json=post.model_dump()
        )
        if status == 404:
            return None
        if status != 200:
            raise ParleyError("messages service unavailable", status=503)
        return Stored.model_validate(body)
