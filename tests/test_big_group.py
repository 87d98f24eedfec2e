"""A group of 10,000 members: created, changed, messaged and listed with no stored document
above 2 MB and one event per call. It is a super group: a normal group's notifications are
stored in every member's inbox (spec §2.6), so adding k members to a normal group of m members
stores k x m entries whatever the storage; a super group stores each notification once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import bson
import pytest

from shared.events import GroupMembersAdded, GroupMembersRemoved

from .conftest import App, Stack, allinone_stack, stack_settings

pytestmark = pytest.mark.slow  # a 10,000-member group (``-m "not slow"`` leaves it out)

MEMBERS = 10_000
CHUNK = 1_000
MAX_DOCUMENT = 2 * 1024 * 1024


async def call(stack: Stack, app: App, method: str, path: str, body: Any = None) -> Any:
    status, reply, _ = await stack.request(method, path, json=body, headers=app.server_auth)
    assert status == 200, reply
    return reply


@pytest.fixture(scope="module")
async def own_stack(mongo_url: str) -> AsyncIterator[Stack]:
    """An all-in-one stack on a database of its own: tens of thousands of documents would slow
    the other tests' whole-collection probes of the shared one."""
    async with allinone_stack("local", stack_settings(mongo_url, None)) as built:
        yield built


async def test_ten_thousand_members(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    async with stack.recorder(app.appid, "group.#") as events:
        first = list(range(1, CHUNK + 1))
        reply = await call(
            stack,
            app,
            "POST",
            "/groups",
            {"master": 1, "name": "big", "super": 1, "members": first},
        )
        gid = reply["data"]["group_id"]
        for start in range(CHUNK + 1, MEMBERS + 1, CHUNK):
            await call(
                stack, app, "POST", f"/groups/{gid}/members", list(range(start, start + CHUNK))
            )
        await events.wait_for(MEMBERS // CHUNK, timeout=60)

        extra = list(range(MEMBERS + 1, MEMBERS + CHUNK + 1))
        began = time.monotonic()
        await call(stack, app, "POST", f"/groups/{gid}/members", extra)
        added_in = time.monotonic() - began
        began = time.monotonic()
        await call(stack, app, "DELETE", f"/groups/{gid}/members", extra)
        removed_in = time.monotonic() - began
        await call(stack, app, "PATCH", f"/groups/{gid}", {"name": "bigger"})
        await events.wait_for(MEMBERS // CHUNK + 3, timeout=30)
        await asyncio.sleep(1)
    print(f"add {CHUNK} to {MEMBERS}: {added_in:.2f} s; remove them: {removed_in:.2f} s")
    kinds = [e.routing_key for e in {e.event_id: e for e in events.events}.values()]
    assert kinds == [
        "group.created",
        *["group.member.added"] * (MEMBERS // CHUNK - 1),
        "group.member.added",
        "group.member.removed",
        "group.renamed",
    ]
    added = [e for e in events.events if isinstance(e, GroupMembersAdded)]
    assert sum(len(e.added) for e in added[-1:]) == CHUNK
    removed = [e for e in events.events if isinstance(e, GroupMembersRemoved)]
    assert [len(e.removed) for e in removed] == [CHUNK]

    status, _, _ = await stack.request(
        "POST",
        "/messages/groups",
        json={"sender": 1, "receiver": gid, "content": "hello, all"},
        headers=app.server_auth,
    )
    assert status == 200
    client = await stack.client(app, 1)
    status, reply, _ = await stack.request("GET", f"/client/groups/{gid}", headers=client)
    assert status == 200, reply
    listed = reply["data"]["members"]
    assert [m["uid"] for m in listed] == list(range(1, MEMBERS + 1))
    assert reply["data"]["name"] == "bigger"

    largest = 0
    for name in await stack.db.list_collection_names():
        async for doc in stack.db[name].find({}):
            largest = max(largest, len(bson.encode(doc)))
    print(f"largest stored document: {largest} bytes")
    assert largest <= MAX_DOCUMENT
