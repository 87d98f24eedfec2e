"""Events are at least once, consumers idempotent (DESIGN invariant 2): replaying ``group.*``
events to the messages service changes nothing, and a consumer that dies between its write
and its acknowledgement loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.messages.admin import MessagesAdmin
from shared.bus import Bus, LocalBus, RabbitBus
from shared.events import Event, GroupCreated, GroupMemberAdded
from shared.mongo import make_client
from shared.settings import Settings

from .conftest import Stack, unique


async def snapshot(stack: Stack, appid: int) -> tuple[list[Any], list[Any]]:
    entries = await stack.db["messages_entries"].find({"appid": appid}).sort("_id", 1).to_list()
    posts = await stack.db["messages_posts"].find({"appid": appid}).sort("_id", 1).to_list()
    return entries, posts


async def test_replaying_group_events_changes_nothing(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid, "group.#") as group_events:
        status, reply, _ = await stack.request(
            "POST",
            "/groups",
            json={"master": 1, "name": "g", "members": [1, 2]},
            headers=app.server_auth,
        )
        gid = reply["data"]["group_id"]
        for method, path, body in (
            ("POST", f"/groups/{gid}/members", [3]),
            ("PATCH", f"/groups/{gid}", {"name": "renamed"}),
            ("PATCH", f"/groups/{gid}/members/2", {"nickname": "two"}),
            ("PATCH", f"/groups/{gid}/members/2", {"mute": True}),
            ("DELETE", f"/groups/{gid}/members/3", None),
            ("POST", f"/groups/{gid}/upgrade", None),
            ("DELETE", f"/groups/{gid}", None),
        ):
            status, _, _ = await stack.request(method, path, json=body, headers=app.server_auth)
            assert status == 200
        received = await group_events.wait_for(8)
    # Every notification is stored and announced; then the state of the messages service is:
    await stack.wait_inbox(app.appid, "u:1", 6)  # create .. quit_group, and disband
    before = await snapshot(stack, app.appid)
    async with stack.recorder(app.appid, "message.#") as announced:
        for _ in range(2):
            for event in received:
                await stack.bus.publish_event(event)
        await asyncio.sleep(1.5)
        assert await announced.settle() == []  # nothing new was announced either
    assert await snapshot(stack, app.appid) == before


@pytest.fixture(params=["local", "rabbit"])
async def fresh(
    request: pytest.FixtureRequest, mongo_url: str
) -> AsyncIterator[tuple[Bus, MessagesAdmin, Any]]:
    """A messages domain on a database and exchange of its own, on either transport."""
    settings = Settings(mongo_url=mongo_url, mongo_db=unique("t_"))
    bus: Bus = (
        LocalBus()
        if request.param == "local"
        else RabbitBus(request.getfixturevalue("amqp_url"), exchange=unique("parley.redeliver."))
    )
    await bus.start()
    client = make_client(mongo_url)
    db = client[settings.mongo_db]
    domain = MessagesAdmin(db, settings, bus)
    await domain.ensure_indexes()
    yield bus, domain, db
    await bus.close()
    await client.close()


async def test_a_consumer_killed_between_write_and_ack(
    fresh: tuple[Bus, MessagesAdmin, Any],
) -> None:
    bus, domain, db = fresh
    queue = unique("redeliver.")
    wrote = asyncio.Event()

    async def dies_after_writing(event: Event) -> None:
        await domain.on_group_event(event)  # the write happens...
        wrote.set()
        await asyncio.sleep(3600)  # ...and the process dies before acknowledging

    doomed = await bus.subscribe(queue, ["group.#"], dies_after_writing)
    created = GroupCreated(
        appid=7,
        gid=70,
        name="g",
        super=False,
        members=[1, 2, 3],
        revision=1,
        master=1,
        members_given=[1, 2, 3],
    )
    added = GroupMemberAdded(
        appid=7,
        gid=70,
        name="g",
        super=False,
        members=[1, 2, 3, 4],
        revision=2,
        member_id=4,
        joined=True,
    )
    await bus.publish_event(created)
    async with asyncio.timeout(10):
        await wrote.wait()
    await doomed.cancel()  # killed: its unacknowledged event goes back to the queue
    await bus.publish_event(added)

    handled: list[str] = []

    async def healthy(event: Event) -> None:
        await domain.on_group_event(event)
        handled.append(event.event_id)

    survivor = await bus.subscribe(queue, ["group.#"], healthy)
    try:
        async with asyncio.timeout(10):
            while len(handled) < 2:
                await asyncio.sleep(0.02)
    finally:
        await survivor.cancel()
    assert sorted(handled) == sorted([created.event_id, added.event_id])  # nothing lost
    for uid, expected in ((1, ["create", "add_member"]), (4, ["add_member"])):
        entries = (
            await db["messages_entries"]
            .find({"appid": 7, "owner": f"u:{uid}"})
            .sort("key", 1)
            .to_list()
        )
        assert [next(iter(json.loads(e["content"]))) for e in entries] == expected  # no duplicate
        assert [e["key"] for e in entries] == list(range(1, len(expected) + 1))
    assert await db["messages_posts"].count_documents({"state": "done"}) == 2
