"""Limits on what one caller can make Parley store (README, "Limits"): at each limit the request
is accepted; one past it is 400 in the envelope, stores nothing and publishes no event. Also
spec §6's leave rule, ids <= 0 and the IP allow-list's source of the caller's address. One mode
suffices: every refusal happens in the handler, before anything reaches the bus."""

from __future__ import annotations

from typing import Any

import pytest

from services.groups.admin import GroupsAdmin
from shared.settings import Settings

from .conftest import App, Stack
from .probes import INVALID_PARAM, NO_AUTHORITY, call, nothing_written
from .test_customer import app_key, desk
from .test_messages import parley_with

TOO_MANY_GROUPS = {"meta": {"code": 400, "message": "too many groups created, retry later"}}


def test_documented_defaults() -> None:
    settings = Settings()
    assert (settings.max_name_length, settings.max_notice_length) == (256, 256)
    assert (settings.max_nickname_length, settings.max_avatar_length) == (256, 1024)
    assert settings.max_content_bytes == 64 * 1024
    assert (settings.max_group_members, settings.max_super_group_members) == (10_000, 100_000)
    assert settings.max_members_per_request == 1_000
    assert settings.client_groups_per_minute == 10
    assert settings.client_super_groups is False
    assert settings.trusted_proxies == ()


async def new_group(stack: Stack, app: App, master: int, members: list[int]) -> int:
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": master, "name": "g", "members": members},
        headers=app.server_auth,
    )
    assert status == 200, reply
    return int(reply["data"]["group_id"])


async def group(stack: Stack, gid: int) -> dict[str, Any]:
    """The stored group (any app: group ids are unique), as of its latest revision."""
    versioned = None
    async for doc in stack.db["groups_log_revs"].find({"_id": {"$regex": f":{gid}:1$"}}):
        appid = int(str(doc["_id"]).split(":")[0])
        versioned = await GroupsAdmin(stack.db).stored(appid, gid)
    assert versioned is not None and versioned.state is not None
    return {**versioned.state, "revision": versioned.rev, "members": versioned.state["m"]}


# ---- text lengths (defaults) ----------------------------------------------------------------


async def test_group_name_notice_and_nickname_lengths(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    alice = await stack.client(app, 1)
    gid = await new_group(stack, app, 1, [1, 2])
    at, over = "n" * 256, "n" * 257
    accepted = [
        ("POST", "/groups", {"master": 1, "name": at, "members": [1]}, app.server_auth),
        ("PATCH", f"/groups/{gid}", {"name": at}, app.server_auth),
        ("PATCH", f"/groups/{gid}", {"notice": at}, app.server_auth),
        ("PATCH", f"/groups/{gid}/members/2", {"nickname": at}, app.server_auth),
        ("POST", "/client/groups", {"master": 1, "name": at, "members": [2]}, alice),
        ("PATCH", f"/client/groups/{gid}", {"name": at}, alice),
        ("PATCH", f"/client/groups/{gid}", {"notice": at}, alice),
        ("PATCH", f"/client/groups/{gid}/members/1", {"nickname": at}, alice),
    ]
    for method, path, body, headers in accepted:
        status, reply, _ = await stack.request(method, path, json=body, headers=headers)
        assert status == 200, (path, body, reply)
    revision = (await group(stack, gid))["revision"]
    refused = [
        ("POST", "/groups", {"master": 1, "name": over, "members": [1]}, app.server_auth),
        ("PATCH", f"/groups/{gid}", {"name": over}, app.server_auth),
        ("PATCH", f"/groups/{gid}", {"notice": over}, app.server_auth),
        ("PATCH", f"/groups/{gid}/members/2", {"nickname": over}, app.server_auth),
        ("POST", "/client/groups", {"master": 1, "name": over, "members": [2]}, alice),
        ("PATCH", f"/client/groups/{gid}", {"name": over}, alice),
        ("PATCH", f"/client/groups/{gid}", {"notice": over}, alice),
        ("PATCH", f"/client/groups/{gid}/members/1", {"nickname": over}, alice),
        # Member names and avatars are copied into notifications: bounded too.
        ("POST", f"/groups/{gid}/members", {"uid": 3, "name": over}, app.server_auth),
        ("POST", f"/groups/{gid}/members", {"uid": 3, "avatar": "a" * 1025}, app.server_auth),
        (
            "POST",
            f"/groups/{gid}/members",
            {"members": [3], "inviter": {"uid": 1, "name": over}},
            app.server_auth,
        ),
        ("DELETE", f"/groups/{gid}/members", [{"uid": 2, "name": over}], app.server_auth),
    ]
    async with nothing_written(stack, app.appid):
        for method, path, body, headers in refused:
            status, reply, _ = await stack.request(method, path, json=body, headers=headers)
            assert (status, reply) == (400, INVALID_PARAM), (method, path)
    doc = await group(stack, gid)
    assert doc["revision"] == revision and doc["name"] == at and doc["notice"] == at
    assert sorted(doc["members"]) == ["1", "2"]


async def test_user_name_lengths(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    at, over = "u" * 256, "u" * 257
    for method, path, body in (
        ("POST", "/auth/grant", {"uid": 1, "user_name": at}),
        ("POST", "/users/2", {"name": at}),
        ("PATCH", "/users/2", {"name": at}),
    ):
        status, reply, _ = await stack.request(method, path, json=body, headers=app.server_auth)
        assert status == 200, (path, reply)
    async with nothing_written(stack, app.appid):
        for method, path, body in (
            ("POST", "/auth/grant", {"uid": 3, "user_name": over}),
            ("POST", "/users/4", {"name": over}),
            ("PATCH", "/users/4", {"name": over}),
        ):
            status, reply, _ = await stack.request(method, path, json=body, headers=app.server_auth)
            assert (status, reply) == (400, INVALID_PARAM), path


async def test_visitor_name_avatar_and_customer_id_lengths(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    at = {"appid": app.appid, "customer_id": "c" * 256, "name": "v" * 256, "avatar": "a" * 1024}
    for path in ("/customer/register", "/auth/customer"):
        status, reply, _ = await stack.request("POST", path, json=at, headers=app_key(app))
        assert status == 200, reply
    async with nothing_written(stack, app.appid):
        for field, value in (
            ("customer_id", "d" * 257),
            ("name", "v" * 257),
            ("avatar", "a" * 1025),
        ):
            for path in ("/customer/register", "/auth/customer"):
                body = {"appid": app.appid, "customer_id": "fresh", field: value}
                status, reply, _ = await stack.request(
                    "POST", path, json=body, headers=app_key(app)
                )
                assert (status, reply) == (400, INVALID_PARAM), (path, field)


# ---- content size ---------------------------------------------------------------------------


async def test_message_content_size(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    gid = await new_group(stack, app, 1, [1, 2])
    limit = stack.settings.max_content_bytes
    at = "é" * (limit // 2)  # counted in UTF-8 bytes: exactly the limit
    over = at + "x"
    bodies = {
        "/messages/peers": {"sender": 1, "receiver": 2},
        "/messages/groups": {"sender": 1, "receiver": gid},
        "/messages/systems": {"receiver": 2},
        "/messages/notifications": {"receiver": 2},
        "/messages/groups/notifications": {"group_id": gid},
        "/messages/rooms": {"sender": 0, "receiver": 5},
    }
    for path, body in bodies.items():
        status, reply, _ = await stack.request(
            "POST", path, json={**body, "content": at}, headers=app.server_auth
        )
        assert status == 200, (path, reply)
    await stack.wait_inbox(app.appid, "u:2", 4)  # create, peer, group, system, notification
    async with nothing_written(stack, app.appid):
        for path, body in bodies.items():
            status, reply, _ = await stack.request(
                "POST", path, json={**body, "content": over}, headers=app.server_auth
            )
            assert (status, reply) == (400, INVALID_PARAM), path


# ---- member counts (small configured limits) -----------------------------------------------


Request = tuple[str, str, Any, dict[str, str]]


async def each(
    stack: Stack, base: str, requests: list[Request], status: int, reply: Any = None
) -> None:
    for method, path, body, headers in requests:
        got = await call(stack.http, base, method, path, json=body, headers=headers)
        assert got[0] == status, (method, path, got)
        if reply is not None:
            assert got[1] == reply, (method, path)


async def test_members_per_request(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    alice, server = await stack.client(app, 1), app.server_auth
    async with parley_with(stack, max_members_per_request=3) as base:
        created = []
        for path, body, headers in (
            ("/groups", {"master": 1, "name": "g", "members": [1, 2, 3]}, server),
            ("/client/groups", {"master": 1, "name": "c", "members": [2, 3, 4]}, alice),
        ):
            status, reply = await call(stack.http, base, "POST", path, json=body, headers=headers)
            assert status == 200, reply
            created.append(reply["data"]["group_id"])
        gid, cgid = created
        three = {"receivers": [1, 2, 3], "content": "x"}
        await each(
            stack,
            base,
            [
                ("POST", f"/groups/{gid}/members", [4, 5, 6], server),
                ("DELETE", f"/groups/{gid}/members", [4, 5, 6], server),
                ("POST", f"/client/groups/{cgid}/members", [5, 6, 7], alice),
                ("DELETE", f"/client/groups/{cgid}/members", [5, 6, 7], alice),
                ("POST", "/messages/systems", three, server),
            ],
            200,
        )
        four = [11, 12, 13, 14]
        async with nothing_written(stack, app.appid):
            await each(
                stack,
                base,
                [
                    ("POST", "/groups", {"master": 1, "name": "g", "members": four}, server),
                    ("POST", "/client/groups", {"master": 1, "name": "g", "members": four}, alice),
                    ("POST", f"/groups/{gid}/members", {"members": four}, server),
                    ("DELETE", f"/groups/{gid}/members", four, server),
                    ("POST", f"/client/groups/{cgid}/members", four, alice),
                    ("DELETE", f"/client/groups/{cgid}/members", four, alice),
                    ("POST", "/messages/systems", {"receivers": four, "content": "x"}, server),
                ],
                400,
                INVALID_PARAM,
            )


async def test_members_per_group(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    alice, server = await stack.client(app, 1), app.server_auth
    async with parley_with(stack, max_group_members=4, max_super_group_members=6) as base:
        gids = []
        for path, body, headers in (
            ("/groups", {"master": 1, "name": "g", "members": [1, 2, 3, 4]}, server),
            (
                "/groups",
                {"master": 1, "name": "s", "members": [1, 2, 3, 4, 5, 6], "super": 1},
                server,
            ),
            ("/groups", {"master": 1, "name": "t", "members": [1, 2, 3]}, server),
            # The client route counts the caller in: 1 + three others is the limit.
            ("/client/groups", {"master": 1, "name": "c", "members": [2, 3, 4]}, alice),
        ):
            status, reply = await call(stack.http, base, "POST", path, json=body, headers=headers)
            assert status == 200, reply
            gids.append(reply["data"]["group_id"])
        full, full_super, three, _ = gids
        # Re-adding members of a full group is no growth: accepted.
        await each(stack, base, [("POST", f"/groups/{full}/members", [2, 3], server)], 200)
        before = {gid: (await group(stack, gid))["revision"] for gid in gids}
        async with nothing_written(stack, app.appid):
            await each(
                stack,
                base,
                [
                    (
                        "POST",
                        "/groups",
                        {"master": 1, "name": "g", "members": [1, 2, 3, 4, 5]},
                        server,
                    ),
                    (
                        "POST",
                        "/groups",
                        {"master": 1, "name": "s", "members": list(range(1, 8)), "super": True},
                        server,
                    ),
                    ("POST", f"/groups/{full}/members", [5], server),
                    ("POST", f"/groups/{full_super}/members", [7], server),
                    ("POST", f"/groups/{three}/members", [4, 5], server),
                    ("POST", f"/client/groups/{three}/members", [6, 7], alice),
                    (
                        "POST",
                        "/client/groups",
                        {"master": 1, "name": "c", "members": [2, 3, 4, 5]},
                        alice,
                    ),
                ],
                400,
                INVALID_PARAM,
            )
        for gid, revision in before.items():
            assert (await group(stack, gid))["revision"] == revision


async def test_client_group_creation_rate(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    alice, bob = await stack.client(app, 1), await stack.client(app, 2)
    body = {"master": 1, "name": "g", "members": [2]}
    async with parley_with(stack, client_groups_per_minute=2) as base:
        for _ in range(2):
            status, reply = await call(
                stack.http, base, "POST", "/client/groups", json=body, headers=alice
            )
            assert status == 200, reply
        await stack.wait_inbox(app.appid, "u:2", 2)
        async with nothing_written(stack, app.appid):
            status, reply = await call(
                stack.http, base, "POST", "/client/groups", json=body, headers=alice
            )
            assert (status, reply) == (400, TOO_MANY_GROUPS)
        # Per client: another user of the app is not held back; nor are server calls.
        status, _ = await call(
            stack.http,
            base,
            "POST",
            "/client/groups",
            json={"master": 2, "name": "g", "members": [1]},
            headers=bob,
        )
        assert status == 200
        status, _ = await call(
            stack.http, base, "POST", "/groups", json=body, headers=app.server_auth
        )
        assert status == 200


async def test_clients_create_super_groups_only_when_allowed(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    alice = await stack.client(app, 1)
    body = {"master": 1, "name": "g", "members": [2], "super": True}
    async with nothing_written(stack, app.appid):
        status, reply, _ = await stack.request("POST", "/client/groups", json=body, headers=alice)
        assert (status, reply) == (400, NO_AUTHORITY)
    async with parley_with(stack, client_super_groups=True) as base:
        status, reply = await call(
            stack.http, base, "POST", "/client/groups", json=body, headers=alice
        )
        assert status == 200, reply
        assert (await group(stack, reply["data"]["group_id"]))["super"] is True


# ---- spec §6: leaving requires membership ---------------------------------------------------


async def test_a_non_member_cannot_leave(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    gid = await new_group(stack, app, 1, [1, 2])
    await stack.wait_inbox(app.appid, "u:2", 1)
    outsider = await stack.client(app, 3)
    revision = (await group(stack, gid))["revision"]
    async with nothing_written(stack, app.appid):
        status, reply, _ = await stack.request(
            "DELETE", f"/client/groups/{gid}/members/3", headers=outsider
        )
        assert (status, reply) == (400, NO_AUTHORITY)
    assert await stack.inbox(app.appid, "u:3") == []  # no quit_group (with the group's name)
    assert (await group(stack, gid))["revision"] == revision
    assert len(await stack.inbox(app.appid, "u:2")) == 1  # no quit_group notification
    # A member still leaves.
    bob = await stack.client(app, 2)
    status, _, _ = await stack.request("DELETE", f"/client/groups/{gid}/members/2", headers=bob)
    assert status == 200
    assert sorted((await group(stack, gid))["members"]) == ["1"]


# ---- ids <= 0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, "0", -(2**63)])
async def test_ids_must_be_positive(own_stack: Stack, bad: Any) -> None:
    stack = own_stack
    app = await stack.new_app()
    gid = await new_group(stack, app, 1, [1, 2])
    await stack.wait_inbox(app.appid, "u:2", 1)
    alice = await stack.client(app, 1)
    cases: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/auth/grant", {"uid": bad}, app.server_auth),
        ("POST", "/users/5", {"do_not_disturb": {"peer_uid": bad, "on": True}}, app.server_auth),
        ("POST", "/groups", {"master": bad, "name": "g", "members": [1]}, app.server_auth),
        ("POST", "/groups", {"master": 1, "name": "g", "members": [bad]}, app.server_auth),
        ("POST", f"/groups/{gid}/members", [bad], app.server_auth),
        (
            "POST",
            f"/groups/{gid}/members",
            {"members": [3], "inviter": {"uid": bad}},
            app.server_auth,
        ),
        ("DELETE", f"/groups/{gid}/members", [bad], app.server_auth),
        ("POST", "/client/groups", {"master": 1, "name": "g", "members": [bad]}, alice),
        (
            "POST",
            "/messages/peers",
            {"sender": bad, "receiver": 2, "content": "x"},
            app.server_auth,
        ),
        (
            "POST",
            "/messages/peers",
            {"sender": 1, "receiver": bad, "content": "x"},
            app.server_auth,
        ),
        (
            "POST",
            "/messages/groups",
            {"sender": 1, "receiver": bad, "content": "x"},
            app.server_auth,
        ),
        ("POST", "/messages/systems", {"receiver": bad, "content": "x"}, app.server_auth),
        ("POST", "/messages/systems", {"receivers": [2, bad], "content": "x"}, app.server_auth),
        ("POST", "/messages/notifications", {"receiver": bad, "content": "x"}, app.server_auth),
        (
            "POST",
            "/messages/groups/notifications",
            {"group_id": bad, "content": "x"},
            app.server_auth,
        ),
        (
            "POST",
            "/messages/rooms",
            {"sender": 1, "receiver": bad, "content": "x"},
            app.server_auth,
        ),
        ("POST", "/customer/register", {"appid": bad}, app_key(app)),
    ]
    if bad != 0 and bad != "0":  # a room message's sender may be 0 (spec S16), never negative
        cases.append(
            (
                "POST",
                "/messages/rooms",
                {"sender": bad, "receiver": 5, "content": "x"},
                app.server_auth,
            )
        )
    async with nothing_written(stack, app.appid):
        for method, path, body, headers in cases:
            status, reply, _ = await stack.request(method, path, json=body, headers=headers)
            assert (status, reply) == (400, INVALID_PARAM), (method, path, body)
        if bad == 0:  # path ids: digits only, so 0 is the only one that reaches a handler
            for method, path, body, headers in (
                ("POST", "/users/0", {"name": "x"}, app.server_auth),
                ("PATCH", "/users/0", {"name": "x"}, app.server_auth),
                ("PATCH", "/groups/0", {"name": "x"}, app.server_auth),
                ("DELETE", "/groups/0", None, app.server_auth),
                ("POST", "/groups/0/members", [3], app.server_auth),
                ("DELETE", f"/groups/{gid}/members/0", None, app.server_auth),
                ("PATCH", f"/groups/{gid}/members/0", {"mute": True}, app.server_auth),
                ("POST", "/groups/0/upgrade", None, app.server_auth),
                ("GET", "/client/groups/0", None, alice),
                ("DELETE", f"/client/groups/{gid}/members/0", None, alice),
                ("PATCH", f"/client/groups/{gid}/members/0", {"quiet": 1}, alice),
            ):
                status, reply, _ = await stack.request(method, path, json=body, headers=headers)
                assert (status, reply) == (400, INVALID_PARAM), (method, path)
        status, reply, _ = await stack.request(
            "POST", "/users/-1", json={}, headers=app.server_auth
        )
        assert (status, reply) == (404, {"meta": {"code": 404}})  # no route (spec §1.1)
    status, _, _ = await stack.request(
        "POST",
        "/messages/rooms",
        json={"sender": 0, "receiver": 5, "content": "x"},
        headers=app.server_auth,
    )
    assert status == 200


# ---- the IP allow-list ------------------------------------------------------------------------


async def test_ip_allow_list_uses_the_peer_address_without_a_trusted_proxy(
    own_stack: Stack,
) -> None:
    """All-in-one with no proxy configured: the connection's address decides, whatever
    ``X-Real-IP`` claims, and leaving the header out bypasses nothing."""
    stack = own_stack
    app, loopback = await stack.new_app(), await stack.new_app()
    permissions = {app.appid: ["10.0.0.1"], loopback.appid: ["127.0.0.1"]}
    async with parley_with(stack, ip_permissions=permissions) as base:
        refused = {"meta": {"code": 400, "message": "非法的ip"}}
        for claimed in (None, "10.0.0.1"):
            headers = dict(app.server_auth)
            if claimed:
                headers["X-Real-IP"] = claimed
            async with nothing_written(stack, app.appid):
                status, reply = await call(
                    stack.http, base, "POST", "/auth/grant", json={"uid": 1}, headers=headers
                )
                assert (status, reply) == (400, refused), claimed
            headers = {**loopback.server_auth, **({"X-Real-IP": claimed} if claimed else {})}
            status, reply = await call(
                stack.http, base, "POST", "/auth/grant", json={"uid": 1}, headers=headers
            )
            assert status == 200, (claimed, reply)
