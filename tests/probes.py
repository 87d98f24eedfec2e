"""Helpers for refusal tests: call a Parley at any base URL, and prove that a block of requests
stored nothing and published no event for an app."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from shared.events import utcnow
from shared.mongo import Database
from shared.storecount import STORE_COMMANDS, StoreCommand

from .conftest import Stack

INVALID_PARAM = {"meta": {"code": 400, "message": "invalid param"}}
JSON_DECODE_ERROR = {"meta": {"code": 400, "message": "json decode error"}}
NO_AUTHORITY = {"meta": {"code": 400, "message": "no authority"}}


async def call(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    *,
    json: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, JSON body or text) of one request to the Parley at ``base``."""
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if json is not None:
        kwargs["json"] = json
    if data is not None:
        kwargs["data"] = data
    async with http.request(method, base + path, **kwargs) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def app_documents(db: Database, appid: int) -> dict[str, int]:
    """How many documents of the app each collection holds (by an ``appid`` field, or by an
    ``_id`` that starts with the appid, as the revision logs' do)."""
    # Pending pointers (``*_pending``) are bookkeeping of changes in flight, settled by the
    # relay in the background whenever it runs: not something a request stored.
    names = sorted(n for n in await db.list_collection_names() if not n.endswith("_pending"))
    mine = {"$or": [{"appid": appid}, {"_id": {"$regex": f"^{appid}:"}}]}
    return {name: await db[name].count_documents(mine) for name in names}


@contextlib.asynccontextmanager
async def nothing_written(stack: Stack, appid: int, quiet: float = 0.3) -> AsyncIterator[None]:
    """The block stores no document of the app and publishes no event of it (whatever was
    published arrived before the recorder's sentinel: ``Recorder.published``). Work still under
    way when it starts (consumers storing earlier notifications) is waited for first."""
    before = await app_documents(stack.db, appid)
    while True:
        await asyncio.sleep(quiet)
        now = await app_documents(stack.db, appid)
        if now == before:
            break
        before = now
    async with stack.recorder(appid) as events:
        started = utcnow()
        yield
        received = await events.published(quiet)
    # Earlier changes' events may be published again (the outbox relay, when a slow machine
    # clears an outbox late): only an event that occurred in the block counts.
    assert [e for e in received if e.occurred_at >= started] == []
    assert await app_documents(stack.db, appid) == before


def by_id_alone(query: Mapping[str, Any]) -> bool:
    """``{_id: "..."}`` or ``{_id: {$in: ["...", ...]}}``: the filters answered from ``_id``."""
    if list(query) != ["_id"]:
        return False
    value = query["_id"]
    if isinstance(value, dict):
        ids = value.get("$in") or []
        return list(value) == ["$in"] and bool(ids) and all(isinstance(i, str) for i in ids)
    return isinstance(value, str)


async def explained_by_id(db: Database, commands: Sequence[StoreCommand]) -> set[str]:
    """Asserts that every filter of ``commands`` is on a string ``_id`` alone (one value or an
    ``$in`` list) and that the store's ``explain`` answers it from ``_id``
    (``filterPushdown``); returns the collections checked. Collections read but never written
    yet are created first (explain needs them)."""
    existing = set(await db.list_collection_names())
    for name in {c.collection for c in commands} - existing:
        await db.create_collection(name)
    checked: set[str] = set()
    for command in commands:
        assert command.filters, command
        for query in command.filters:
            assert by_id_alone(query), command
            explained = await db.command("explain", {"find": command.collection, "filter": query})
            assert explained["filterPushdown"] is True, (command.collection, query)
            checked.add(command.collection)
    return checked


# The auth service's collections: a groups or messages request reads them only when the
# credentials it verifies have dropped out of its cache (``auth_cache_ttl``, 10 s), which the
# warm-up request of a count test cannot rule out on a loaded machine whose shared stack is
# still busy with an earlier test's work.
CREDENTIALS = "auth_"


async def counted(
    stack: Stack, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any, int]:
    """(status, body, store commands the services issued for it, credential checks aside)."""
    rid = f"count-{uuid.uuid4().hex}"
    recording, STORE_COMMANDS.record = STORE_COMMANDS.record, True
    try:
        status, reply, _ = await stack.request(
            method, path, json=body, headers={**headers, "X-Request-ID": rid}
        )
    finally:
        STORE_COMMANDS.record = recording
    commands = STORE_COMMANDS.commands(rid)
    assert len(commands) == STORE_COMMANDS.count(rid), commands
    return status, reply, sum(not c.collection.startswith(CREDENTIALS) for c in commands)
