"""Messages over real HTTP through the edge, in every mode: injection (S11-S16), offline
counts (S19), history (S20), dequeue (X4); the inbox entries each message leaves and the
``message.*`` event it publishes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from parley.allinone import create_allinone_app
from parley.servers import free_port
from shared.events import (
    GroupMessage,
    GroupNotificationMessage,
    NotificationMessage,
    PeerMessage,
    RoomMessage,
    SystemMessage,
)
from shared.web import Deps

from .conftest import App, Stack, bounded, one_mode

INVALID_PARAM = {"meta": {"code": 400, "message": "invalid param"}}
NON_EXISTS = {"meta": {"code": 400, "message": "group non exists"}}


async def send(stack: Stack, app: App, path: str, body: Any) -> tuple[int, Any]:
    status, reply, _ = await stack.request("POST", path, json=body, headers=app.server_auth)
    return status, reply


async def new_group(stack: Stack, app: App, members: list[int], *, super_: bool = False) -> int:
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": members[0], "name": "g", "members": members, "super": super_},
        headers=app.server_auth,
    )
    assert status == 200, reply
    return int(reply["data"]["group_id"])


def stored(entries: list[dict[str, Any]], cmd: int) -> list[tuple[int, int, str]]:
    return [(e["sender"], e["receiver"], e["content"]) for e in entries if e["cmd"] == cmd]


async def test_peer_message(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        status, reply = await send(
            stack,
            app,
            "/messages/peers",
            {"sender": 1, "receiver": "2", "content": '{"text":"hi"}'},
        )
        assert (status, reply) == (200, "")
        (event,) = await events.wait_for(1)
        assert await events.published(0.3) == [event]
    for uid in (1, 2):  # the receiver's inbox and the sender's own
        (entry,) = await stack.inbox(app.appid, f"u:{uid}")
        assert (entry["cmd"], entry["sender"], entry["receiver"], entry["content"]) == (
            4,
            1,
            2,
            '{"text":"hi"}',
        )
        assert entry["key"] == 1
    assert isinstance(event, PeerMessage)
    assert (event.sender, event.receiver, event.content) == (1, 2, '{"text":"hi"}')
    assert sorted((k.uid, k.key) for k in event.keys) == [(1, 1), (2, 1)]


@one_mode
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", {"meta": {"code": 400, "message": "json decode error"}}),
        (b"{", {"meta": {"code": 400, "message": "json decode error"}}),
        (b'{"sender": 1, "receiver": 2}', INVALID_PARAM),
        (b'{"sender": 1, "content": "x"}', INVALID_PARAM),
        (b'{"sender": 1, "receiver": 2, "content": 5}', INVALID_PARAM),
        (b'{"sender": "a", "receiver": 2, "content": "x"}', INVALID_PARAM),
        (b'{"sender": 1.5, "receiver": 2, "content": "x"}', INVALID_PARAM),
        (b'{"sender": true, "receiver": 2, "content": "x"}', INVALID_PARAM),
    ],
)
async def test_peer_message_refuses_bad_bodies(
    stack: Stack, raw: bytes, expected: dict[str, Any]
) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        status, reply, _ = await stack.request(
            "POST", "/messages/peers", data=raw, headers=app.server_auth
        )
        assert (status, reply) == (400, expected)
        assert await events.published(0.3) == []
    assert await stack.db["messages_entries"].count_documents({"appid": app.appid}) == 0


async def test_message_routes_need_server_credentials(stack: Stack) -> None:
    app = await stack.new_app()
    bearer = await stack.client(app, 1)
    for path in (
        "/messages/peers",
        "/messages/groups",
        "/messages/systems",
        "/messages/notifications",
        "/messages/groups/notifications",
        "/messages/rooms",
    ):
        for headers in ({}, bearer):
            status, reply, _ = await stack.request("POST", path, json={}, headers=headers)
            assert (status, reply) == (400, {"meta": {"code": 400, "message": "非法的appid"}})


async def test_normal_group_message(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await new_group(stack, app, [1, 2, 3])
    for uid in (1, 2, 3):
        await stack.wait_inbox(app.appid, f"u:{uid}", 1)  # the create notification
    async with stack.recorder(app.appid, "message.group") as events:
        status, reply = await send(
            stack, app, "/messages/groups", {"sender": "1", "receiver": gid, "content": "hello"}
        )
        assert (status, reply) == (200, "")
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupMessage)
    assert (event.gid, event.sender, event.super, event.members) == (gid, 1, False, [1, 2, 3])
    assert event.group_key is None
    for uid in (1, 2, 3):  # every member, the sender included
        entries = await stack.inbox(app.appid, f"u:{uid}")
        assert stored(entries, 8) == [(1, gid, "hello")]
        assert entries[-1]["key"] == 2
    assert sorted((k.uid, k.key) for k in event.keys) == [(1, 2), (2, 2), (3, 2)]


async def test_super_group_message_is_stored_once(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await new_group(stack, app, [1, 2], super_=True)
    await stack.wait_inbox(app.appid, f"g:{gid}", 1)
    async with stack.recorder(app.appid, "message.group") as events:
        status, _ = await send(
            stack, app, "/messages/groups", {"sender": 9, "receiver": gid, "content": "all"}
        )
        assert status == 200
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupMessage)
    assert (event.super, event.group_key, event.keys) == (True, 2, [])
    queue = await stack.inbox(app.appid, f"g:{gid}")
    assert stored(queue, 8) == [(9, gid, "all")]
    assert await stack.inbox(app.appid, "u:1") == []


async def test_group_message_to_unknown_or_foreign_group(stack: Stack) -> None:
    a, b = await stack.new_app("a"), await stack.new_app("b")
    gid = await new_group(stack, a, [1, 2])
    await stack.wait_inbox(a.appid, "u:1", 1)
    async with stack.recorder(a.appid, "message.group") as a_events:
        for app, target in ((a, 99999999), (b, gid)):
            status, reply = await send(
                stack, app, "/messages/groups", {"sender": 1, "receiver": target, "content": "x"}
            )
            assert (status, reply) == (400, NON_EXISTS)
        assert await a_events.published(0.3) == []
    assert len(await stack.inbox(a.appid, "u:1")) == 1  # nothing delivered into A's group
    assert await stack.db["messages_entries"].count_documents({"appid": b.appid}) == 0


async def test_a_member_added_gets_the_next_message(stack: Stack) -> None:
    """Membership for group messages is the groups service's, read when the message is sent:
    a member whose addition answered 200 receives the very next message."""
    app = await stack.new_app()
    gid = await new_group(stack, app, [1])
    for newcomer in range(2, 7):
        status, _, _ = await stack.request(
            "POST", f"/groups/{gid}/members", json=[newcomer], headers=app.server_auth
        )
        assert status == 200
        status, _ = await send(
            stack,
            app,
            "/messages/groups",
            {"sender": 1, "receiver": gid, "content": f"m{newcomer}"},
        )
        assert status == 200
        assert (1, gid, f"m{newcomer}") in stored(await stack.inbox(app.appid, f"u:{newcomer}"), 8)
    status, _, _ = await stack.request(
        "DELETE", f"/groups/{gid}/members/6", headers=app.server_auth
    )
    await send(stack, app, "/messages/groups", {"sender": 1, "receiver": gid, "content": "after"})
    assert (1, gid, "after") not in stored(await stack.inbox(app.appid, "u:6"), 8)


async def test_system_messages(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        assert await send(stack, app, "/messages/systems", {"receiver": 5, "content": "s1"}) == (
            200,
            "",
        )
        assert await send(
            stack, app, "/messages/systems", {"receivers": [5, "6"], "content": "s2"}
        ) == (200, "")
        received = await events.wait_for(2)
    assert all(isinstance(e, SystemMessage) for e in received)
    assert [e.content for e in received] == ["s1", "s2"]  # type: ignore[attr-defined]
    assert [(e["cmd"], e["content"], e["key"]) for e in await stack.inbox(app.appid, "u:5")] == [
        (21, "s1", 1),
        (21, "s2", 2),
    ]
    assert [e["content"] for e in await stack.inbox(app.appid, "u:6")] == ["s2"]
    for body in ({"content": "x"}, {"receiver": 5}, {"receivers": "5", "content": "x"}):
        assert await send(stack, app, "/messages/systems", body) == (400, INVALID_PARAM)


async def test_notifications_and_room_messages_are_not_stored(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        assert await send(
            stack, app, "/messages/notifications", {"receiver": 3, "content": "n"}
        ) == (200, "")
        assert await send(
            stack, app, "/messages/rooms", {"sender": 0, "receiver": 77, "content": "r"}
        ) == (200, "")
        received = await events.wait_for(2)
    notification, room = received
    assert isinstance(notification, NotificationMessage)
    assert (notification.receiver, notification.content) == (3, "n")
    assert isinstance(room, RoomMessage)
    assert (room.sender, room.room, room.content) == (0, 77, "r")
    assert await stack.db["messages_entries"].count_documents({"appid": app.appid}) == 0
    assert await send(stack, app, "/messages/rooms", {"receiver": 77, "content": "r"}) == (
        400,
        INVALID_PARAM,
    )


async def test_custom_group_notification(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await new_group(stack, app, [1, 2])
    await stack.wait_inbox(app.appid, "u:2", 1)
    async with stack.recorder(app.appid, "message.group_notification") as events:
        assert await send(
            stack, app, "/messages/groups/notifications", {"group_id": gid, "content": '{"x":1}'}
        ) == (200, "")
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupNotificationMessage)
    assert (event.recipients, event.content, event.cause) == ([1, 2], '{"x":1}', None)
    for uid in (1, 2):
        assert (await stack.inbox(app.appid, f"u:{uid}"))[-1]["content"] == '{"x":1}'
    empty = await new_group(stack, app, [3])
    await stack.request("DELETE", f"/groups/{empty}/members/3", headers=app.server_auth)
    assert await send(
        stack, app, "/messages/groups/notifications", {"group_id": empty, "content": "x"}
    ) == (400, {"meta": {"code": 400, "message": "group no member"}})
    assert await send(
        stack, app, "/messages/groups/notifications", {"group_id": 99999999, "content": "x"}
    ) == (400, NON_EXISTS)


async def test_offline_count(stack: Stack) -> None:
    app = await stack.new_app()
    for n in range(3):
        await send(stack, app, "/messages/peers", {"sender": 1, "receiver": 2, "content": str(n)})
    cases: list[tuple[str, dict[str, str], int, Any]] = [
        ("uid=2", app.server_auth, 200, {"data": {"count": 3, "new": 1}}),
        ("uid=3", app.server_auth, 200, {"data": {"count": 0, "new": 0}}),
        ("", await stack.client(app, 2), 200, {"data": {"count": 3, "new": 1}}),
        # A client reads only its own count, whatever it asks for.
        ("uid=2", await stack.client(app, 3), 200, {"data": {"count": 0, "new": 0}}),
        ("", app.server_auth, 400, {"meta": {"code": 400, "message": "invalid uid"}}),
        ("uid=abc", app.server_auth, 400, INVALID_PARAM),
        ("uid=2", {}, 400, {"meta": {"code": 400, "message": "非法的authorization"}}),
        (
            "uid=2",
            {"Authorization": "Token x"},
            400,
            {"meta": {"code": 400, "message": "非法的authorization"}},
        ),
    ]
    for query, headers, status_expected, reply_expected in cases:
        status, reply, _ = await stack.request("GET", f"/messages/offline?{query}", headers=headers)
        assert (status, reply) == (status_expected, reply_expected), query


async def test_history(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await new_group(stack, app, [1, 2])
    await stack.wait_inbox(app.appid, "u:1", 1)
    await send(stack, app, "/messages/peers", {"sender": 2, "receiver": 1, "content": "p"})
    await send(stack, app, "/messages/groups", {"sender": 2, "receiver": gid, "content": "g"})
    await send(stack, app, "/messages/systems", {"receiver": 1, "content": "s"})
    alice = await stack.client(app, 1)
    status, reply, resp = await stack.request("GET", "/messages", headers=alice)
    assert status == 200
    items = reply["data"]
    # Peer and group messages, oldest first; notifications and system messages are left out.
    assert [(i["command"], i["content"]) for i in items] == [(4, "p"), (8, "g")]
    first = items[0]
    assert set(first) == {"id", "command", "sender", "receiver", "timestamp", "content"}
    assert (first["sender"], first["receiver"], first["id"]) == (2, 1, 2)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    status, again, _ = await stack.request("GET", "/messages?store=0", headers=alice)
    assert again == reply
    status, reply, _ = await stack.request("GET", "/messages?store=abc", headers=alice)
    assert (status, reply) == (400, INVALID_PARAM)
    status, reply, resp = await stack.request("GET", "/messages")
    assert status == 400 and reply["error"] == "非法的access token"
    assert resp.headers["Access-Control-Allow-Origin"] == "*"  # browsers can read the error


async def test_cors_preflight_and_dequeue(stack: Stack) -> None:
    app = await stack.new_app()
    for path in ("/messages", "/messages/dequeue"):
        status, reply, resp = await stack.request("OPTIONS", path)
        assert (status, reply) == (200, "")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "AUTHORIZATION" in resp.headers["Access-Control-Allow-Headers"]
        assert resp.headers["Access-Control-Max-Age"] == "21600"
    status, reply, _ = await stack.request(
        "POST", "/messages/dequeue", json={"msgid": 1}, headers=await stack.client(app, 1)
    )
    assert (status, reply) == (200, {"data": {"success": True}})
    status, _, _ = await stack.request("POST", "/messages/dequeue")
    assert status == 400


@contextlib.asynccontextmanager
async def parley_with(stack: Stack, **settings: Any) -> AsyncIterator[str]:
    """Another all-in-one Parley on the same database and bus, with other settings."""
    app = create_allinone_app(
        stack.settings.model_copy(update=settings), deps=Deps(db=stack.db, bus=stack.bus)
    )
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await bounded(server.close(), "another Parley's shutdown")


async def test_disabled_apps_cannot_inject(local_stack: Stack) -> None:
    stack = local_stack
    app, other = await stack.new_app(), await stack.new_app()
    disabled = parley_with(stack, disabled_app_ids=frozenset({app.appid}))
    async with disabled as base, aiohttp.ClientSession() as http:
        for path in ("/messages/peers", "/messages/rooms", "/messages/systems"):
            async with http.post(base + path, data=b"garbage", headers=app.server_auth) as r:
                assert r.status == 400
                assert await r.json() == {"meta": {"code": 400, "message": "disabled appid"}}
        body = {"sender": 1, "receiver": 2, "content": "x"}
        async with http.post(base + "/messages/peers", json=body, headers=other.server_auth) as r:
            assert r.status == 200
        async with http.post(  # other endpoints ignore the list
            base + "/auth/grant", json={"uid": 1}, headers=app.server_auth
        ) as r:
            assert r.status == 200


async def test_many_messages_to_a_large_group(local_stack: Stack) -> None:
    """Past several counter refreshes for 120 inboxes at once (FerretDB once stalled on large
    update batches there): every message is stored in every member's inbox, keys dense."""
    stack = local_stack
    app = await stack.new_app()
    members = list(range(1, 121))
    gid = await new_group(stack, app, members)
    await stack.wait_inbox(app.appid, "u:120", 1)
    for n in range(40):
        status, _ = await send(
            stack, app, "/messages/groups", {"sender": 1, "receiver": gid, "content": f"m{n}"}
        )
        assert status == 200
    for uid in (1, 60, 120):
        entries = await stack.inbox(app.appid, f"u:{uid}")
        assert [e["key"] for e in entries] == list(range(1, 42))
        assert [e["content"] for e in entries[1:]] == [f"m{n}" for n in range(40)]
