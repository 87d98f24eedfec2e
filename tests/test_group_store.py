"""What the groups service asks of its store: few commands per request, each answered by the
local store from a string ``_id`` (``filterPushdown`` in its ``explain``), never by reading a
collection that grows with the data."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import structlog

from shared.storecount import BACKGROUND, STORE_COMMANDS, StoreCommand

from .conftest import Stack
from .probes import counted, explained_by_id


async def test_store_commands_per_group_request(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    server = app.server_auth
    body = {"master": 1, "name": "warm", "members": [1]}
    status, _, _ = await stack.request("POST", "/groups", json=body, headers=server)
    assert status == 200  # the app's credentials are cached and a block of group ids held
    status, reply, create_cost = await counted(
        stack, "POST", "/groups", server, {"master": 1, "name": "g", "members": [1, 2]}
    )
    assert status == 200, reply
    gid = reply["data"]["group_id"]
    # An id from this process's block, the pending pointer, the revision, the members' lists.
    assert create_cost <= 4, create_cost
    status, _, add_cost = await counted(stack, "POST", f"/groups/{gid}/members", server, [3])
    assert status == 200
    # The pending pointer, the revision (which is the compare-and-set), the new member's list.
    assert add_cost <= 3, add_cost
    status, _, rename_cost = await counted(stack, "PATCH", f"/groups/{gid}", server, {"name": "h"})
    assert status == 200
    assert rename_cost <= 2, rename_cost
    client = await stack.client(app, 1)
    status, _, _ = await stack.request("GET", "/client/groups", headers=client)
    assert status == 200  # the token's owner is cached
    status, reply, get_cost = await counted(stack, "GET", f"/client/groups/{gid}", client)
    assert status == 200 and [m["uid"] for m in reply["data"]["members"]] == [1, 2, 3]
    assert get_cost <= 2, get_cost  # the next revision's probe; the three names (one $in)


async def test_every_group_query_is_an_id_lookup(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    server = app.server_auth
    alice = await stack.client(app, 1, "alice")
    commands: list[StoreCommand] = []
    STORE_COMMANDS.record = True
    try:
        status, reply, _ = await stack.request(
            "POST", "/groups", json={"master": 1, "name": "g", "members": [1, 2]}, headers=server
        )
        gid = reply["data"]["group_id"]
        requests: list[tuple[str, str, dict[str, str], Any]] = [
            ("POST", f"/groups/{gid}/members", server, [3, 4]),
            ("PATCH", f"/groups/{gid}", server, {"name": "renamed"}),
            ("PATCH", f"/groups/{gid}/members/2", server, {"nickname": "two", "mute": True}),
            ("DELETE", f"/groups/{gid}/members/4", server, None),
            ("POST", f"/groups/{gid}/upgrade", server, None),
            ("GET", "/client/groups?fields=members,quiet", alice, None),
            ("GET", f"/client/groups/{gid}", alice, None),
            ("PATCH", f"/client/groups/{gid}", alice, {"notice": "hello"}),
            ("POST", "/client/groups", alice, {"master": 1, "name": "mine", "members": [2]}),
            ("DELETE", f"/groups/{gid}", server, None),
        ]
        for method, path, headers, body in requests:
            rid = f"explain-{uuid.uuid4().hex}"
            status, reply, _ = await stack.request(
                method, path, json=body, headers={**headers, "X-Request-ID": rid}
            )
            assert status == 200, (path, reply)
            commands += STORE_COMMANDS.commands(rid)
        with structlog.contextvars.bound_contextvars(request_id="test"):
            await asyncio.sleep(1.5)  # the relay's pass and the pointers' deletion
    finally:
        STORE_COMMANDS.record = False
    background = STORE_COMMANDS.commands(BACKGROUND)
    # The relay reads the pending pointers: changes in flight only, the one whole-collection
    # read allowed.
    relay = [c for c in background if c.collection.endswith("_pending") and c.name == "find"]
    mine = [
        c
        for c in commands + [c for c in background if c not in relay]
        if c.collection.startswith("groups_") and c.name not in ("insert", "createIndexes")
    ]
    assert {c.name for c in mine} >= {"find", "delete"}
    checked = await explained_by_id(stack.db, mine)
    assert checked >= {"groups_log_revs", "groups_log_pending", "groups_mine_revs", "groups_users"}
