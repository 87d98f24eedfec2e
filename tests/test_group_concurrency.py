"""Concurrency loses nothing (DESIGN invariant 8) on the local store, which has no atomic
update: many concurrent group creates, member adds and setting changes, all-in-one and with
two replicas of the groups (and messages) service."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.groups.admin import GroupsAdmin
from shared.events import Event, GroupCreated, GroupMembersAdded

from .conftest import App, Stack, allinone_stack, stack_settings

CREATES = 400
CLIENTS = 32
ADDS = 40


@pytest.fixture(scope="module")
async def own_local(mongo_url: str) -> AsyncIterator[Stack]:
    """All-in-one on a database of its own (hundreds of groups and their notifications would
    slow the other tests' whole-collection probes of the shared one)."""
    async with allinone_stack("local", stack_settings(mongo_url, None)) as built:
        yield built


@pytest.fixture(params=["local", "two-replicas"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    name = "own_local" if request.param == "local" else "two_replicas"
    stack: Stack = request.getfixturevalue(name)
    return stack


def distinct(events: list[Event]) -> list[Event]:
    """Events are at-least-once: a slow change may also be published by the relay."""
    return list({e.event_id: e for e in events}.values())


async def post(stack: Stack, app: App, method: str, path: str, body: Any) -> tuple[int, Any]:
    status, reply, _ = await stack.request(method, path, json=body, headers=app.server_auth)
    return status, reply


async def test_concurrent_creates_get_distinct_ids(any_stack: Stack) -> None:
    stack = any_stack
    app = await stack.new_app()
    pending = list(range(CREATES))
    answers: list[tuple[int, Any]] = []

    async def client() -> None:
        while pending:
            n = pending.pop()
            body = {"master": 1, "name": f"g{n}", "members": [1, 2]}
            answers.append(await post(stack, app, "POST", "/groups", body))

    async with stack.recorder(app.appid, "group.created") as events:
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        await events.wait_for(CREATES, timeout=60)
        created = distinct(await events.published())
    assert [a for a in answers if a[0] != 200] == []
    gids = [reply["data"]["group_id"] for _, reply in answers]
    assert len(set(gids)) == CREATES
    assert sorted(e.gid for e in created if isinstance(e, GroupCreated)) == sorted(gids)


async def test_concurrent_adds_keep_every_member(any_stack: Stack) -> None:
    stack = any_stack
    app = await stack.new_app()
    status, reply = await post(
        stack, app, "POST", "/groups", {"master": 1, "name": "g", "members": [1]}
    )
    assert status == 200
    gid = reply["data"]["group_id"]
    await stack.wait_inbox(app.appid, "u:1", 1)
    newcomers = list(range(100, 100 + ADDS))
    async with stack.recorder(app.appid, "group.member.added") as events:
        answers = await asyncio.gather(
            *(post(stack, app, "POST", f"/groups/{gid}/members", [uid]) for uid in newcomers)
        )
        assert [a for a in answers if a[0] != 200] == []
        await events.wait_for(ADDS, timeout=120)
        added = distinct(await events.published())
    group = await GroupsAdmin(stack.db).group(app.appid, gid)
    assert group is not None and group.uids == [1, *newcomers]
    assert (
        sorted(a.member_id for e in added if isinstance(e, GroupMembersAdded) for a in e.added)
        == newcomers
    )
    # Every add_member notification reached the first member: 1 create + 40 adds.
    await stack.wait_inbox(app.appid, "u:1", 1 + ADDS, timeout=120)


async def test_concurrent_changes_keep_the_last_acknowledged_values(any_stack: Stack) -> None:
    """Renames, notice changes and member settings racing on one group: no acknowledged
    change is lost (each field ends at a value some request set, and the members' settings
    each end at their own last acknowledged value), and every change has its event."""
    stack = any_stack
    app = await stack.new_app()
    members = list(range(1, 9))
    status, reply = await post(
        stack, app, "POST", "/groups", {"master": 1, "name": "g", "members": members}
    )
    assert status == 200
    gid = reply["data"]["group_id"]
    last_nickname: dict[int, str] = {}
    names: list[str] = []
    notices: list[str] = []

    async def renamer(n: int) -> None:
        for i in range(5):
            name = f"name-{n}-{i}"
            status, reply = await post(stack, app, "PATCH", f"/groups/{gid}", {"name": name})
            assert status == 200, reply
            names.append(name)
            notice = f"notice-{n}-{i}"
            status, reply = await post(stack, app, "PATCH", f"/groups/{gid}", {"notice": notice})
            assert status == 200, reply
            notices.append(notice)

    async def member(uid: int) -> None:
        for i in range(5):
            nickname = f"nick-{uid}-{i}"
            body = {"nickname": nickname, "mute": i % 2 == 0}
            status, reply = await post(stack, app, "PATCH", f"/groups/{gid}/members/{uid}", body)
            assert status == 200, reply
            last_nickname[uid] = nickname
            await asyncio.sleep(random.random() / 100)

    async with stack.recorder(app.appid, "group.#") as events:
        await asyncio.gather(*(renamer(n) for n in range(4)), *(member(uid) for uid in members))
        expected = 4 * 5 * 2 + len(members) * 5 * 2
        await events.wait_for(expected, timeout=30)
        assert len(distinct(await events.published())) == expected
    group = await GroupsAdmin(stack.db).group(app.appid, gid)
    assert group is not None
    # Each renamer changes sequentially, so the final value is one of their last ones: no
    # field went back to a value an acknowledged later change had replaced.
    assert group.name in {f"name-{n}-4" for n in range(4)} and group.name in names
    assert group.notice in {f"notice-{n}-4" for n in range(4)} and group.notice in notices
    assert {uid: m.nickname for uid, m in group.members.items()} == last_nickname
    assert all(m.mute for m in group.members.values())  # the last change of each was i = 4
