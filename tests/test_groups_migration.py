"""Groups written by the previous version (one document per group, updated in place, and an
``$inc`` counter of group ids) keep working after an upgrade: the groups service rewrites them
as logs at start, once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.groups.admin import GroupsAdmin
from shared.mongo import make_client

from .conftest import allinone_stack, stack_settings, unique


def old_group(
    appid: int, gid: int, members: dict[int, dict[str, Any]], **fields: object
) -> dict[str, object]:
    return {
        "_id": gid,
        "appid": appid,
        "master": 1,
        "name": f"old {gid}",
        "notice": "kept",
        "super": False,
        "deleted": False,
        "revision": 3,
        "members": {str(uid): m for uid, m in members.items()},
        "member_uids": sorted(members),
        "created_at": datetime.now(UTC),
        "outbox": {},
        "outbox_n": 0,
        **fields,
    }


async def test_groups_of_the_previous_shape_keep_working(mongo_url: str) -> None:
    settings = stack_settings(mongo_url, None)
    client = make_client(mongo_url)
    db = client[settings.mongo_db]
    member = {"ts": 1_700_000_000, "nickname": "nick", "mute": True, "dnd": False}
    plain = {"ts": 1_700_000_000, "nickname": None, "mute": False, "dnd": False}
    try:
        async with allinone_stack("local", settings) as stack:
            app = await stack.new_app()
        # What the previous version left: two live groups, a disbanded one, the id counter.
        await db["groups_groups"].insert_many(
            [
                old_group(app.appid, 5, {1: plain, 2: member}),
                old_group(app.appid, 6, {2: plain}),
                old_group(app.appid, 7, {}, deleted=True),
            ]
        )
        await db["groups_counters"].insert_one({"_id": "gid", "seq": 7})
        await db.drop_collection("groups_log_revs")
        await db["groups_counters"].delete_many({"_id": {"$ne": "gid"}})

        for _ in range(2):  # a second start finds nothing to do
            async with allinone_stack("local", settings) as stack:
                group = await GroupsAdmin(stack.db).group(app.appid, 5)
                assert group is not None and group.uids == [1, 2] and group.notice == "kept"
                assert group.members[2].nickname == "nick" and group.members[2].mute
                assert await GroupsAdmin(stack.db).group(app.appid, 7) is None
                bob = await stack.client(app, 2)
                status, reply, _ = await stack.request("GET", "/client/groups", headers=bob)
                assert status == 200
                assert sorted(g["id"] for g in reply["data"]) == [5, 6]
        async with allinone_stack("local", settings) as stack:
            status, reply, _ = await stack.request(
                "POST", "/groups/5/members", json=[3], headers=app.server_auth
            )
            assert status == 200, reply
            group = await GroupsAdmin(stack.db).group(app.appid, 5)
            assert group is not None and group.uids == [1, 2, 3]
            status, reply, _ = await stack.request(
                "POST",
                "/groups",
                json={"master": 1, "name": unique("new"), "members": [1]},
                headers=app.server_auth,
            )
            assert status == 200 and reply["data"]["group_id"] > 7  # above the old counter
        assert await db["groups_counters"].count_documents({"_id": "migrated:groups_groups"}) == 1
    finally:
        await client.drop_database(settings.mongo_db)
        await client.close()
