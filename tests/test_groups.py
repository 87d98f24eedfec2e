"""Groups over real HTTP through the edge, in every mode: the server API (S3-S10), the
client API (S21-S28, X3) with spec §6's rules, the ``group.*`` events each change publishes,
and the group notifications the messages service stores for them (spec §2.6)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.groups.admin import GroupsAdmin
from shared.events import (
    GroupCreated,
    GroupDisbanded,
    GroupMemberDoNotDisturbChanged,
    GroupMemberMuted,
    GroupMemberNicknameChanged,
    GroupMembersAdded,
    GroupMembersRemoved,
    GroupNoticeChanged,
    GroupRenamed,
    GroupUpgraded,
)

from .conftest import App, Stack, one_mode

INVALID_PARAM = {"meta": {"code": 400, "message": "invalid param"}}
NON_EXISTS = {"meta": {"code": 400, "message": "group non exists"}}
NO_AUTHORITY = {"meta": {"code": 400, "message": "no authority"}}
SUCCESS = {"success": True}


async def create(stack: Stack, app: App, body: dict[str, Any]) -> int:
    status, reply, _ = await stack.request("POST", "/groups", json=body, headers=app.server_auth)
    assert status == 200, reply
    assert set(reply) == {"data"} and set(reply["data"]) == {"group_id"}
    return int(reply["data"]["group_id"])


async def group_doc(stack: Stack, appid: int, gid: int) -> dict[str, Any] | None:
    """The live group as stored (read by a repository of its own, so nothing is cached)."""
    group = await GroupsAdmin(stack.db).group(appid, gid)
    if group is None:
        return None
    return {
        "master": group.master,
        "name": group.name,
        "notice": group.notice,
        "super": group.super,
        "revision": group.revision,
        "member_uids": group.uids,
        "members": {str(uid): m.model_dump(exclude={"uid"}) for uid, m in group.members.items()},
    }


def ops(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The group-notification ops stored in an inbox, oldest first."""
    return [json.loads(e["content"]) for e in entries if e["cmd"] == 7]


async def notified(stack: Stack, appid: int, uid: int, count: int) -> list[dict[str, Any]]:
    return ops(await stack.wait_inbox(appid, f"u:{uid}", count))


async def wait_name(stack: Stack, appid: int, uid: int, name: str) -> None:
    """Until the groups service's user-name view (fed by auth events) has the name."""
    async with asyncio.timeout(10):
        while (await stack.db["groups_users"].find_one({"_id": f"{appid}:{uid}"}) or {}).get(
            "name"
        ) != name:
            await asyncio.sleep(0.05)


# ---- S3 create ----------------------------------------------------------------------------


async def test_create_group(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid, "group.#") as events:
        gid = await create(
            stack,
            app,
            {
                "master": 9,
                "name": "team",
                "super": False,
                "members": [1, {"uid": "2", "name": "bob", "avatar": "a.png"}, "3", 1],
            },
        )
        received = await events.wait_for(1)
        assert len(await events.published()) == 1
    event = received[0]
    assert isinstance(event, GroupCreated)
    assert (event.gid, event.master, event.name, event.super) == (gid, 9, "team", False)
    assert event.members == [1, 2, 3]  # distinct, and the master is not added (server route)
    assert event.members_given == [1, {"uid": 2, "name": "bob", "avatar": "a.png"}, 3, 1]
    doc = await group_doc(stack, app.appid, gid)
    assert doc is not None and doc["member_uids"] == [1, 2, 3] and doc["master"] == 9
    for uid in (1, 2, 3):
        (op,) = await notified(stack, app.appid, uid, 1)
        assert op == {
            "create": {
                "group_id": gid,
                "timestamp": event.timestamp,
                "master": 9,
                "name": "team",
                "members": [1, {"uid": 2, "name": "bob", "avatar": "a.png"}, 3, 1],
            }
        }
    assert await stack.inbox(app.appid, "u:9") == []  # the master is not a member


@one_mode
@pytest.mark.parametrize(
    "body",
    [
        {"name": "n", "members": []},
        {"master": 1, "members": []},
        {"master": 1, "name": "n"},
        {"master": 1, "name": "n", "members": "1,2"},
        {"master": 1, "name": "n", "members": ["x"]},
        {"master": 1, "name": "n", "members": [0]},
        {"master": 1, "name": "n", "members": [{"name": "no uid"}]},
        {"master": 1, "name": "n", "members": [], "super": "yes"},
        {"master": "1x", "name": "n", "members": []},
        {"master": 1, "name": 7, "members": []},
    ],
)
async def test_create_group_refuses_bad_bodies(stack: Stack, body: dict[str, Any]) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request(
            "POST", "/groups", json=body, headers=app.server_auth
        )
        assert (status, reply) == (400, INVALID_PARAM)
        assert await events.published(0.3) == []
    assert await stack.db["groups_groups"].count_documents({"appid": app.appid}) == 0


async def test_external_group_id_is_ignored_unless_enabled(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1], "group_id": 987654})
    assert gid != 987654


async def test_group_routes_need_server_credentials(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1]})
    bearer = await stack.client(app, 1)
    for method, path in (
        ("POST", "/groups"),
        ("PATCH", f"/groups/{gid}"),
        ("DELETE", f"/groups/{gid}"),
        ("POST", f"/groups/{gid}/members"),
        ("DELETE", f"/groups/{gid}/members/1"),
        ("DELETE", f"/groups/{gid}/members"),
        ("POST", f"/groups/{gid}/upgrade"),
        ("PATCH", f"/groups/{gid}/members/1"),
    ):
        for headers in ({}, bearer):  # a client token never acts with the server's powers
            status, reply, _ = await stack.request(method, path, json={}, headers=headers)
            assert (status, reply) == (400, {"meta": {"code": 400, "message": "非法的appid"}})
    assert (await group_doc(stack, app.appid, gid) or {}).get("revision") == 1


# ---- S4 rename, S5 disband, S9 upgrade ----------------------------------------------------


async def test_rename_group(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "old", "members": [1, 2]})
    await notified(stack, app.appid, 2, 1)
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request(
            "PATCH", f"/groups/{gid}", json={"name": "new"}, headers=app.server_auth
        )
        assert (status, reply) == (200, "")
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupRenamed) and event.name == "new" and event.members == [1, 2]
    assert (await group_doc(stack, app.appid, gid) or {})["name"] == "new"
    assert (await notified(stack, app.appid, 2, 2))[-1] == {
        "update_name": {"group_id": gid, "timestamp": event.timestamp, "name": "new"}
    }
    for path, body, expected in (
        (f"/groups/{gid}", {}, INVALID_PARAM),
        (f"/groups/{gid}", {"name": 5}, INVALID_PARAM),
        ("/groups/99999999", {"name": "x"}, NON_EXISTS),
    ):
        status, reply, _ = await stack.request("PATCH", path, json=body, headers=app.server_auth)
        assert (status, reply) == (400, expected)


async def test_disband_reaches_every_member(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "bye", "members": [1, 2, 3]})
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request("DELETE", f"/groups/{gid}", headers=app.server_auth)
        assert (status, reply) == (200, SUCCESS)
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupDisbanded) and event.members == [1, 2, 3]
    for uid in (1, 2, 3):
        assert (await notified(stack, app.appid, uid, 2))[-1] == {
            "disband": {"group_id": gid, "timestamp": event.timestamp, "group_name": "bye"}
        }
    assert await group_doc(stack, app.appid, gid) is None
    for method in ("DELETE", "PATCH"):
        status, reply, _ = await stack.request(
            method, f"/groups/{gid}", json={"name": "x"}, headers=app.server_auth
        )
        assert (status, reply) == (400, NON_EXISTS)


async def test_upgrade_to_super_group(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "big", "members": [1, 2]})
    await notified(stack, app.appid, 1, 1)
    async with stack.recorder(app.appid, "group.#") as events:
        for _ in range(2):  # idempotent: each call repeats the event and the notification
            status, reply, _ = await stack.request(
                "POST", f"/groups/{gid}/upgrade", headers=app.server_auth
            )
            assert (status, reply) == (200, SUCCESS)
        received = await events.wait_for(2)
    assert all(isinstance(e, GroupUpgraded) and e.super for e in received)
    assert (await group_doc(stack, app.appid, gid) or {})["super"] is True
    queue = await stack.wait_inbox(app.appid, f"g:{gid}", 2)  # super: stored once, in the queue
    assert ops(queue)[0] == {
        "upgrade": {
            "group_id": gid,
            "timestamp": received[0].timestamp,  # type: ignore[attr-defined]
            "group_name": "big",
            "super": 1,
        }
    }
    assert len(await stack.inbox(app.appid, "u:2")) == 1  # only the create op
    status, reply, _ = await stack.request(
        "POST", "/groups/99999999/upgrade", headers=app.server_auth
    )
    assert (status, reply) == (400, NON_EXISTS)


# ---- S6 add, S7/S8 remove -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {
            "members": [5, {"uid": 6, "name": "six", "avatar": "6.png"}],
            "inviter": {"uid": 1, "name": "one"},
        },
        [5, {"uid": 6, "name": "six", "avatar": "6.png"}],
        {"uid": 5},
    ],
)
async def test_add_members_in_each_body_form(stack: Stack, body: Any) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1]})
    await notified(stack, app.appid, 1, 1)
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request(
            "POST", f"/groups/{gid}/members", json=body, headers=app.server_auth
        )
        assert (status, reply) == (200, SUCCESS)
        expected = 1 if isinstance(body, dict) and "uid" in body else 2
        (first,) = await events.wait_for(1)  # one event per call, listing the members
        assert len(await events.published()) == 1
    assert isinstance(first, GroupMembersAdded) and all(a.joined for a in first.added)
    assert [a.member_id for a in first.added] == [5, 6][:expected]
    doc = await group_doc(stack, app.appid, gid)
    assert doc is not None
    assert doc["member_uids"] == ([1, 5] if expected == 1 else [1, 5, 6])
    op = (await notified(stack, app.appid, 5, 1))[0]["add_member"]
    want: dict[str, Any] = {
        "group_id": gid,
        "timestamp": first.timestamp,
        "group_name": "g",
        "member_id": 5,
    }
    if isinstance(body, dict) and "inviter" in body:
        want["inviter"] = {"uid": 1, "name": "one"}
    assert op == want
    if expected == 2:
        six = (await notified(stack, app.appid, 6, 2))[-1]["add_member"]
        assert (six["member_id"], six["name"], six["avatar"]) == (6, "six", "6.png")
    # The existing member hears of each newcomer too.
    assert len(await notified(stack, app.appid, 1, 1 + expected)) == 1 + expected


async def test_add_members_edge_cases(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1, 2]})
    for path in (f"/groups/{gid}/members", "/groups/99999999/members"):
        # An empty list answers 200 with an empty body before the group is looked up.
        empties: list[Any] = [[], {"members": []}]
        for empty in empties:
            status, reply, _ = await stack.request(
                "POST", path, json=empty, headers=app.server_auth
            )
            assert (status, reply) == (200, "")
    async with stack.recorder(app.appid, "group.#") as events:
        # Re-adding a member is not an error: nothing stored changes, members are told again.
        status, _, _ = await stack.request(
            "POST", f"/groups/{gid}/members", json=[2], headers=app.server_auth
        )
        assert status == 200
        (event,) = await events.wait_for(1)
        assert isinstance(event, GroupMembersAdded)
        assert [(a.member_id, a.joined) for a in event.added] == [(2, False)]
    bad: list[tuple[Any, dict[str, Any]]] = [
        ([0], INVALID_PARAM),
        (["abc"], INVALID_PARAM),
        ({"members": "1"}, INVALID_PARAM),
        ("x", INVALID_PARAM),
    ]
    for body, expected in bad:
        status, reply, _ = await stack.request(
            "POST", f"/groups/{gid}/members", json=body, headers=app.server_auth
        )
        assert (status, reply) == (400, expected)
    status, reply, _ = await stack.request(
        "POST", "/groups/99999999/members", json=[3], headers=app.server_auth
    )
    assert (status, reply) == (400, NON_EXISTS)


async def test_remove_one_member_uses_the_stored_name(stack: Stack) -> None:
    app = await stack.new_app()
    await stack.token(app, 2, "bob")
    await wait_name(stack, app.appid, 2, "bob")
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1, 2]})
    async with stack.recorder(app.appid, "group.#") as events:
        for _ in range(2):  # idempotent
            status, reply, _ = await stack.request(
                "DELETE", f"/groups/{gid}/members/2", headers=app.server_auth
            )
            assert (status, reply) == (200, SUCCESS)
        received = await events.wait_for(2)
    removals = [e for e in received if isinstance(e, GroupMembersRemoved)]
    assert [(r.member_id, r.was_member) for e in removals for r in e.removed] == [
        (2, True),
        (2, False),
    ]
    quit_op = {
        "quit_group": {
            "group_id": gid,
            "timestamp": removals[0].timestamp,
            "group_name": "g",
            "member_id": 2,
            "name": "bob",
        }
    }
    assert (await notified(stack, app.appid, 2, 2))[1] == quit_op  # the leaver is told too
    assert (await notified(stack, app.appid, 1, 2))[1] == quit_op
    assert (await group_doc(stack, app.appid, gid) or {})["member_uids"] == [1]
    status, reply, _ = await stack.request(
        "DELETE", "/groups/99999999/members/2", headers=app.server_auth
    )
    assert (status, reply) == (400, NON_EXISTS)


async def test_remove_several_members(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1, 2, 3, 4]})
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request(
            "DELETE",
            f"/groups/{gid}/members",
            json=[2, {"uid": "3", "name": "three", "avatar": "3.png"}],
            headers=app.server_auth,
        )
        assert (status, reply) == (200, SUCCESS)
        (event,) = await events.wait_for(1)  # one event per call, listing the members
    assert isinstance(event, GroupMembersRemoved)
    assert [r.member_id for r in event.removed] == [2, 3]
    op = (await notified(stack, app.appid, 3, 2))[1]["quit_group"]
    assert (op["member_id"], op["name"], op["avatar"]) == (3, "three", "3.png")
    assert (await group_doc(stack, app.appid, gid) or {})["member_uids"] == [1, 4]
    for path, body, expected in (
        (f"/groups/{gid}/members", [], {"meta": {"code": 400, "message": "no memebers to delete"}}),
        (
            "/groups/99999999/members",
            [],
            {"meta": {"code": 400, "message": "no memebers to delete"}},
        ),
        (f"/groups/{gid}/members", {}, {"meta": {"code": 400, "message": "no memebers to delete"}}),
        (f"/groups/{gid}/members", {"uid": 1}, INVALID_PARAM),
        (f"/groups/{gid}/members", ["x"], INVALID_PARAM),
        ("/groups/99999999/members", [1], NON_EXISTS),
    ):
        status, reply, _ = await stack.request("DELETE", path, json=body, headers=app.server_auth)
        assert (status, reply) == (400, expected), body


# ---- S10 member settings ------------------------------------------------------------------


async def test_member_settings(stack: Stack) -> None:
    app = await stack.new_app()
    gid = await create(stack, app, {"master": 1, "name": "g", "members": [1, 2]})
    await notified(stack, app.appid, 1, 1)
    path = f"/groups/{gid}/members/2"
    async with stack.recorder(app.appid, "group.#") as events:
        for body in ({"do_not_disturb": True}, {"nickname": "bobby"}, {"mute": 1}):
            status, reply, _ = await stack.request(
                "PATCH", path, json=body, headers=app.server_auth
            )
            assert (status, reply) == (200, SUCCESS)
        received = await events.wait_for(3)
    assert isinstance(received[0], GroupMemberDoNotDisturbChanged)
    assert isinstance(received[1], GroupMemberNicknameChanged)
    assert isinstance(received[2], GroupMemberMuted)
    member = (await group_doc(stack, app.appid, gid) or {})["members"]["2"]
    assert (member["dnd"], member["nickname"], member["mute"]) == (True, "bobby", True)
    # Only the nickname change notifies, everyone.
    entries = await notified(stack, app.appid, 1, 2)
    assert entries[1] == {
        "update_member_nickname": {
            "group_id": gid,
            "timestamp": received[1].timestamp,
            "group_name": "g",
            "nickname": "bobby",
            "member_id": 2,
        }
    }
    await asyncio.sleep(0.5)
    assert len(ops(await stack.inbox(app.appid, "u:1"))) == 2
    for target, body, expected in (
        (path, {}, {"meta": {"code": 400, "message": "no action"}}),
        (path, {"mute": "yes"}, INVALID_PARAM),
        (f"/groups/{gid}/members/77", {"nickname": "x"}, INVALID_PARAM),  # not a member
        ("/groups/99999999/members/2", {"mute": True}, NON_EXISTS),
    ):
        status, reply, _ = await stack.request("PATCH", target, json=body, headers=app.server_auth)
        assert (status, reply) == (400, expected), body


# ---- client API (S21-S28, X3) -------------------------------------------------------------


async def client_create(stack: Stack, headers: dict[str, str], body: dict[str, Any]) -> int:
    status, reply, _ = await stack.request("POST", "/client/groups", json=body, headers=headers)
    assert status == 200, reply
    return int(reply["data"]["group_id"])


async def test_client_create_adds_the_creator(stack: Stack) -> None:
    app = await stack.new_app()
    alice = await stack.client(app, 1, "alice")
    status, reply, _ = await stack.request(
        "POST", "/client/groups", json={"master": 2, "name": "g", "members": [1]}, headers=alice
    )
    assert (status, reply) == (400, {"meta": {"code": 400, "message": "master must be self"}})
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": [2, 3]})
    assert (await group_doc(stack, app.appid, gid) or {})["member_uids"] == [1, 2, 3]
    status, reply, _ = await stack.request("POST", "/client/groups", json={}, headers={})
    assert (status, reply) == (
        400,
        {"error": "非法的access token", "meta": {"code": 400, "message": "非法的access token"}},
    )


async def test_client_list_and_get(stack: Stack) -> None:
    app = await stack.new_app()
    alice, bob = await stack.client(app, 1, "alice"), await stack.client(app, 2, "bob")
    await wait_name(stack, app.appid, 2, "bob")
    mine = await client_create(stack, alice, {"master": 1, "name": "both", "members": [2]})
    other = await client_create(stack, bob, {"master": 2, "name": "bob only", "members": []})
    await stack.request(
        "PATCH", f"/client/groups/{mine}/members/2", json={"nickname": "B"}, headers=bob
    )
    await stack.request(
        "PATCH", f"/client/groups/{mine}/members/1", json={"quiet": 1}, headers=alice
    )
    status, reply, _ = await stack.request("GET", "/client/groups", headers=alice)
    assert status == 200
    assert reply == {
        "data": [
            {"id": mine, "appid": app.appid, "master": 1, "super": 0, "name": "both", "notice": ""}
        ]
    }
    status, reply, _ = await stack.request(
        "GET", "/client/groups?fields=members,quiet", headers=alice
    )
    (group,) = reply["data"]
    assert group["do_not_disturb"] is True
    assert group["members"] == [
        {"uid": 1, "name": "alice", "nickname": "alice", "avatar": ""},
        {"uid": 2, "name": "bob", "nickname": "B", "avatar": "", "nickname_in_group": "B"},
    ]
    status, reply, _ = await stack.request("GET", f"/client/groups/{mine}", headers=bob)
    assert status == 200
    assert reply["data"]["id"] == mine and reply["data"]["do_not_disturb"] is False
    assert [m["uid"] for m in reply["data"]["members"]] == [1, 2]
    status, reply, _ = await stack.request("GET", f"/client/groups/{other}", headers=alice)
    assert (status, reply) == (400, NO_AUTHORITY)  # not a member
    status, reply, _ = await stack.request("GET", "/client/groups/99999999", headers=alice)
    assert (status, reply) == (400, NON_EXISTS)


async def test_client_patch_rules(stack: Stack) -> None:
    app = await stack.new_app()
    alice, bob, carol = [await stack.client(app, uid) for uid in (1, 2, 3)]
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": [2]})
    path = f"/client/groups/{gid}"
    async with stack.recorder(app.appid, "group.#") as events:
        cases = [
            (bob, {"name": "by bob"}, 200, SUCCESS),  # any member renames
            (bob, {"notice": "hi"}, 400, NO_AUTHORITY),  # only the master sets the notice
            (alice, {"notice": "hello", "name": None}, 200, SUCCESS),
            (alice, {"name": "wins", "notice": "ignored"}, 200, SUCCESS),
            (carol, {"name": "outsider"}, 400, NO_AUTHORITY),  # not a member
            (alice, {}, 400, {"meta": {"code": 400, "message": "patch nothing"}}),
        ]
        for headers, body, status_expected, reply_expected in cases:
            status, reply, _ = await stack.request("PATCH", path, json=body, headers=headers)
            assert (status, reply) == (status_expected, reply_expected), body
        received = await events.wait_for(3)
    assert [type(e) for e in received] == [GroupRenamed, GroupNoticeChanged, GroupRenamed]
    doc = await group_doc(stack, app.appid, gid)
    assert doc is not None and (doc["name"], doc["notice"]) == ("wins", "hello")
    notices = [op for op in await notified(stack, app.appid, 2, 4) if "update_notice" in op]
    assert notices[0]["update_notice"]["notice"] == "hello"


async def test_client_disband_and_invite_rules(stack: Stack) -> None:
    app = await stack.new_app()
    alice, bob, carol = [await stack.client(app, uid, f"u{uid}") for uid in (1, 2, 3)]
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": [2]})
    path = f"/client/groups/{gid}"
    status, reply, _ = await stack.request("POST", f"{path}/members", json=[4], headers=carol)
    assert (status, reply) == (400, NO_AUTHORITY)  # only members invite
    status, reply, _ = await stack.request("POST", f"{path}/members", json=[], headers=carol)
    assert (status, reply) == (200, "")
    async with stack.recorder(app.appid, "group.#") as events:
        status, reply, _ = await stack.request(
            "POST", f"{path}/members", json={"members": [4], "inviter": {"uid": 99}}, headers=bob
        )
        assert (status, reply) == (200, SUCCESS)
        (event,) = await events.wait_for(1)
    assert isinstance(event, GroupMembersAdded)
    assert event.inviter == {"uid": 2, "name": "u2"}  # the caller, not the body's inviter
    status, reply, _ = await stack.request("DELETE", path, headers=bob)
    assert (status, reply) == (400, NO_AUTHORITY)  # only the master disbands
    status, reply, _ = await stack.request("DELETE", path, headers=alice)
    assert (status, reply) == (200, SUCCESS)
    status, reply, _ = await stack.request("DELETE", path, headers=alice)
    assert (status, reply) == (400, NON_EXISTS)


async def test_client_leave_and_remove_rules(stack: Stack) -> None:
    app = await stack.new_app()
    alice, bob, carol = [await stack.client(app, uid) for uid in (1, 2, 3)]
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": [2, 3, 4]})
    path = f"/client/groups/{gid}/members"
    cases = [
        ("DELETE", f"{path}/3", bob, None, 400, NO_AUTHORITY),  # removing someone else
        ("DELETE", f"{path}/1", alice, None, 400, NO_AUTHORITY),  # the master cannot leave
        ("DELETE", f"{path}/3", carol, None, 200, SUCCESS),  # leaving
        ("DELETE", f"{path}/4", alice, None, 200, SUCCESS),  # the master removes one
        ("DELETE", path, bob, [], 400, NO_AUTHORITY),  # authority is checked before the body
        (
            "DELETE",
            path,
            alice,
            [],
            400,
            {"meta": {"code": 400, "message": "no memebers to delete"}},
        ),
        ("DELETE", path, alice, [1, 2], 400, NO_AUTHORITY),  # the master cannot remove themself
        ("DELETE", path, alice, [{"uid": 2}], 200, SUCCESS),
        ("DELETE", "/client/groups/99999999/members/1", alice, None, 400, NON_EXISTS),
    ]
    for method, target, headers, body, status_expected, reply_expected in cases:
        status, reply, _ = await stack.request(method, target, json=body, headers=headers)
        assert (status, reply) == (status_expected, reply_expected), (target, body)
    assert (await group_doc(stack, app.appid, gid) or {})["member_uids"] == [1]
    # Alone now, the master may leave.
    status, _, _ = await stack.request("DELETE", f"{path}/1", headers=alice)
    assert status == 200


async def test_admin_actions_stay_server_only(stack: Stack) -> None:
    """Banning from speaking and upgrading have no client route (spec §6)."""
    app = await stack.new_app()
    alice = await stack.client(app, 1)
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": []})
    status, reply, _ = await stack.request("POST", f"/client/groups/{gid}/upgrade", headers=alice)
    assert (status, reply) == (404, {"meta": {"code": 404}})
    status, reply, _ = await stack.request(
        "PATCH", f"/client/groups/{gid}/members/1", json={"mute": True}, headers=alice
    )
    assert (status, reply) == (400, {"meta": {"code": 400, "message": "no action"}})
    assert (await group_doc(stack, app.appid, gid) or {})["super"] is False


async def test_client_member_settings_rules(stack: Stack) -> None:
    app = await stack.new_app()
    alice, bob, carol = [await stack.client(app, uid) for uid in (1, 2, 3)]
    gid = await client_create(stack, alice, {"master": 1, "name": "g", "members": [2]})
    path = f"/client/groups/{gid}/members"
    cases = [
        (
            f"{path}/1",
            bob,
            {"quiet": True},
            400,
            {"meta": {"code": 400, "message": "setting other is forbidden"}},
        ),
        (f"{path}/2", bob, {"mute": True}, 400, {"meta": {"code": 400, "message": "no action"}}),
        (f"{path}/3", carol, {"quiet": True}, 400, NO_AUTHORITY),  # not a member
        (f"{path}/2", bob, {"quiet": 1}, 200, SUCCESS),
        (f"{path}/2", bob, {"nickname": "b"}, 200, SUCCESS),
        ("/client/groups/99999999/members/2", bob, {"quiet": 1}, 400, NON_EXISTS),
    ]
    for target, headers, body, status_expected, reply_expected in cases:
        status, reply, _ = await stack.request("PATCH", target, json=body, headers=headers)
        assert (status, reply) == (status_expected, reply_expected), (target, body)
    member = (await group_doc(stack, app.appid, gid) or {})["members"]["2"]
    assert (member["dnd"], member["nickname"], member["mute"]) == (True, "b", False)


# ---- tenancy ------------------------------------------------------------------------------


async def test_another_app_cannot_touch_a_group(stack: Stack) -> None:
    a, b = await stack.new_app("a"), await stack.new_app("b")
    gid = await create(stack, a, {"master": 1, "name": "a's", "members": [1, 2]})
    await notified(stack, a.appid, 1, 1)
    b_user_1 = await stack.client(b, 1)  # the same uid, in app B
    before = await group_doc(stack, a.appid, gid)
    async with stack.recorder(a.appid) as a_events:
        server_calls: list[tuple[str, str, Any]] = [
            ("PATCH", f"/groups/{gid}", {"name": "x"}),
            ("DELETE", f"/groups/{gid}", None),
            ("POST", f"/groups/{gid}/members", [3]),
            ("DELETE", f"/groups/{gid}/members/2", None),
            ("DELETE", f"/groups/{gid}/members", [2]),
            ("POST", f"/groups/{gid}/upgrade", None),
            ("PATCH", f"/groups/{gid}/members/2", {"mute": True}),
        ]
        for method, path, body in server_calls:
            status, reply, _ = await stack.request(method, path, json=body, headers=b.server_auth)
            assert (status, reply) == (400, NON_EXISTS), path
        client_calls: list[tuple[str, str, Any]] = [
            ("GET", f"/client/groups/{gid}", None),
            ("PATCH", f"/client/groups/{gid}", {"name": "x"}),
            ("DELETE", f"/client/groups/{gid}", None),
            ("POST", f"/client/groups/{gid}/members", [3]),
            ("DELETE", f"/client/groups/{gid}/members/1", None),
            ("DELETE", f"/client/groups/{gid}/members", [2]),
            ("PATCH", f"/client/groups/{gid}/members/1", {"quiet": 1}),
        ]
        for method, path, body in client_calls:
            status, reply, _ = await stack.request(method, path, json=body, headers=b_user_1)
            assert (status, reply) == (400, NON_EXISTS), path
        status, reply, _ = await stack.request("GET", "/client/groups", headers=b_user_1)
        assert (status, reply) == (200, {"data": []})
        assert await a_events.published() == []
    assert await group_doc(stack, a.appid, gid) == before
    assert len(await stack.inbox(a.appid, "u:1")) == 1
