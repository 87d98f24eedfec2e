"""The messages service's storage costs the same however much is stored: each request issues a
bounded number of store commands (counted by the command monitoring inside the running
services, per request id), each an insert or a single-document ``_id`` lookup the local store
answers without reading the collection (checked with ``explain``); and data written by the
previous version of the storage keeps working."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import structlog

from services.auth.admin import AuthAdmin
from services.messages.admin import (
    COUNTERS,
    ENTRIES,
    PENDING,
    POSTS,
    PROBE_COLD,
    SCHEMA_ID,
    SYNC_KEYS,
    MessagesAdmin,
)
from shared.events import utcnow
from shared.storecount import BACKGROUND, STORE_COMMANDS, StoreCommand

from .conftest import App, Stack, _prepared_db, allinone_stack, stack_settings
from .probes import counted, explained_by_id

# A history read by a process that has never seen the inbox: its hint, the keys after it with
# the open chunk's entries (one ``$in``), the copies of the whole chunks below (one ``$in``).
COLD_HISTORY_MAX = 3


@pytest.fixture(scope="module")
async def own_stack(mongo_url: str) -> AsyncIterator[Stack]:
    """An all-in-one stack on a database of its own: these tests store thousands of entries,
    which would slow the other tests' whole-collection reads of the shared one."""
    async with allinone_stack("local", stack_settings(mongo_url, None)) as built:
        yield built


async def fill(stack: Stack, app: App, receiver: int, count: int) -> None:
    """``count`` peer messages to ``receiver``, from a handful of senders, 32 at a time."""

    async def one(n: int) -> None:
        status, _, _ = await stack.request(
            "POST",
            "/messages/peers",
            json={"sender": 500 + n % 7, "receiver": receiver, "content": f"m{n}"},
            headers=app.server_auth,
        )
        assert status == 200

    for start in range(0, count, 32):
        await asyncio.gather(*(one(n) for n in range(start, min(count, start + 32))))


async def test_store_commands_per_request(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    client = await stack.client(app, 1)
    server = app.server_auth
    peer = {"sender": 2, "receiver": 1, "content": "warm"}
    await stack.request("POST", "/messages/peers", json=peer, headers=server)  # credentials cached
    await stack.request("GET", "/messages", headers=client)

    status, _, peer_cost = await counted(stack, "POST", "/messages/peers", server, peer)
    assert status == 200
    assert peer_cost <= 2, peer_cost

    status, reply, offline_cost = await counted(stack, "GET", "/messages/offline?uid=1", server)
    assert reply["data"]["count"] == 2
    assert offline_cost <= 2, offline_cost

    # History of a small inbox, then of one with more than 1,024 entries: bounded alike.
    status, reply, small_cost = await counted(stack, "GET", "/messages", client)
    assert [i["content"] for i in reply["data"]] == ["warm", "warm"]
    assert small_cost <= 2, small_cost  # the last key; the entries are the ones it stored
    await fill(stack, app, 1, 1100)
    await stack.request("GET", "/messages", headers=client)  # credentials cached again
    status, reply, large_cost = await counted(stack, "GET", "/messages", client)
    assert len(reply["data"]) == 1024
    assert {i["content"] for i in reply["data"]} <= {f"m{n}" for n in range(1100)}
    assert [i["id"] for i in reply["data"]] == list(range(1102 - 1023, 1103))
    # The process that stored them holds the newest chunks: the last key is all it reads.
    assert large_cost <= 1, large_cost
    # A process that holds none of it (another replica, a restart): a few more.
    cold = MessagesAdmin(stack.db, stack.settings)
    rid = f"cold-{uuid.uuid4().hex}"
    with structlog.contextvars.bound_contextvars(request_id=rid):
        entries = await cold.latest(app.appid, "u:1", (4, 8, 64), 1024)
    assert [e.key for e in entries] == [i["id"] for i in reply["data"]]
    assert STORE_COMMANDS.count(rid) <= COLD_HISTORY_MAX, STORE_COMMANDS.count(rid)
    await stack.request("GET", "/messages/offline", headers=server)  # credentials cached again
    status, reply, offline_cost = await counted(stack, "GET", "/messages/offline?uid=1", server)
    assert reply["data"]["count"] == 1102
    assert offline_cost <= 2, offline_cost


async def test_group_message_to_500_members(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    members = list(range(1, 501))
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": 1, "name": "big", "members": members},
        headers=app.server_auth,
    )
    assert status == 200, reply
    gid = reply["data"]["group_id"]
    # The create notification, everywhere: the first message to 500 inboxes this process has
    # not seen reads each one's hint (500 reads, once per inbox and process).
    await stack.wait_inbox(app.appid, "u:500", 1, timeout=60)
    body = {"sender": 1, "receiver": gid, "content": "to all"}
    status, _, _ = await stack.request(  # the app's credentials are cached from here on
        "POST", "/messages/groups", json={**body, "content": "warm"}, headers=app.server_auth
    )
    assert status == 200
    # The group's membership (one read, the groups service's), the pending post, the entries.
    status, _, cost = await counted(stack, "POST", "/messages/groups", app.server_auth, body)
    assert status == 200
    assert cost <= 3, cost
    inbox = await stack.wait_inbox(app.appid, "u:500", 3, timeout=60)
    assert [e["content"] for e in inbox][-1] == "to all"
    stored = await stack.db[ENTRIES].count_documents({"appid": app.appid, "msg": inbox[-1]["msg"]})
    assert stored == 500


async def test_every_query_is_an_id_lookup(local_stack: Stack) -> None:
    """Each filter the messages service sends while serving a mix of requests is answered from
    ``_id`` by the local store (``filterPushdown`` in its ``explain``)."""
    stack = local_stack
    app = await stack.new_app()
    client = await stack.client(app, 1)
    server = app.server_auth
    status, reply, _ = await stack.request(
        "POST", "/groups", json={"master": 1, "name": "g", "members": [1, 2, 3]}, headers=server
    )
    gid = reply["data"]["group_id"]
    await stack.wait_inbox(app.appid, "u:3", 1)
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/messages/peers", server, {"sender": 2, "receiver": 1, "content": "p"}),
        ("POST", "/messages/groups", server, {"sender": 2, "receiver": gid, "content": "g"}),
        ("POST", "/messages/systems", server, {"receiver": 1, "content": "s"}),
        ("POST", "/messages/notifications", server, {"receiver": 1, "content": "n"}),
        ("POST", "/messages/rooms", server, {"sender": 1, "receiver": 9, "content": "r"}),
        ("POST", "/messages/groups/notifications", server, {"group_id": gid, "content": "x"}),
        ("GET", "/messages/offline?uid=1", server, None),
        ("GET", "/messages", client, None),
        ("GET", "/messages/offline", client, None),
    ]
    commands: list[StoreCommand] = []
    STORE_COMMANDS.record = True
    try:
        for method, path, headers, body in requests:
            rid = f"explain-{uuid.uuid4().hex}"
            status, _, _ = await stack.request(
                method, path, json=body, headers={**headers, "X-Request-ID": rid}
            )
            assert status == 200, path
            commands += STORE_COMMANDS.commands(rid)
        with structlog.contextvars.bound_contextvars(request_id="test"):  # not the services'
            await stack.wait_inbox(app.appid, "u:1", 5)  # the background writes are done too
            await asyncio.sleep(1.0)
    finally:
        STORE_COMMANDS.record = False
    background = STORE_COMMANDS.commands(BACKGROUND)
    # The recovery loop's one query reads the pending list, a collection of the messages in
    # flight only: the one query allowed to read a whole collection.
    recovery = [c for c in background if c.collection == PENDING and c.name == "find"]
    assert recovery and all(list(q) == ["created_at"] for c in recovery for q in c.filters)
    mine = [
        c
        for c in commands + [c for c in background if c not in recovery]
        if c.collection.startswith("messages_") and c.name != "insert"
    ]
    assert {c.name for c in mine} == {"find", "update", "delete"}  # reads, hints, pending
    checked = await explained_by_id(stack.db, mine)
    assert checked >= {ENTRIES, COUNTERS, PENDING, SYNC_KEYS}


async def test_data_written_by_the_previous_version(mongo_url: str) -> None:
    """Parley started on documents in the previous shapes: a post left pending (in the log,
    ``state: pending``) with one of its two entries stored, a done post, and a counter holding
    both the key hint and the acknowledged sync key. It migrates them once at startup,
    finishes the pending post without storing anything twice, and counts from the old key."""
    settings = stack_settings(mongo_url, None)
    client, db = await _prepared_db(settings)
    try:
        creds = await AuthAdmin(db, settings).create_app("old")
        appid = creds.appid
        app = App(appid, creds.key, creds.secret)
        an_hour_ago = utcnow() - timedelta(hours=1)
        common = {"appid": appid, "cmd": 4, "sender": 2, "receiver": 1, "timestamp": 1_700_000_000}
        old = [(k, f"old{k}", f"old {k}") for k in (1, 2, 3)] + [(4, "stuck", "stuck")]
        await db[ENTRIES].insert_many(
            [
                {
                    **common,
                    "_id": f"{appid}:u:1:{k}",
                    "owner": "u:1",
                    "key": k,
                    "msg": msg,
                    "content": content,
                }
                for k, msg, content in old
            ]
        )
        await db[COUNTERS].insert_one({"_id": f"{appid}:u:1", "seq": 2, "sync_key": 3})
        post = {
            "appid": appid,
            "kind": "peer",
            "sender": 2,
            "receiver": 1,
            "created_at": an_hour_ago,
            "timestamp": 1_700_000_000,
        }
        await db[POSTS].insert_many(
            [
                {**post, "_id": "old1", "content": "old 1", "state": "done", "keys": {"u:1": 1}},
                {**post, "_id": "stuck", "content": "stuck", "state": "pending"},
            ]
        )
    finally:
        await client.close()

    async with allinone_stack("local", settings) as stack:
        db = stack.db
        assert await db[COUNTERS].find_one({"_id": SCHEMA_ID}) is not None  # migrated
        status, reply, _ = await stack.request(
            "GET", "/messages/offline?uid=1", headers=app.server_auth
        )
        assert reply["data"]["count"] == 1  # key 4, after the acknowledged 3
        # The recovery loop finishes the stuck post: found where it was, stored once more.
        async with asyncio.timeout(15):
            while await db[PENDING].count_documents({}):
                await asyncio.sleep(0.1)
        stuck = await db[POSTS].find_one({"_id": "stuck"})
        assert stuck is not None and stuck["state"] == "done"
        assert stuck["keys"] == {"u:1": 4, "u:2": 1}
        entries = await db[ENTRIES].find({"appid": appid, "msg": "stuck"}).to_list()
        assert sorted((e["owner"], e["key"]) for e in entries) == [("u:1", 4), ("u:2", 1)]
        # New messages follow the old ones, and history reads both.
        status, _, _ = await stack.request(
            "POST",
            "/messages/peers",
            json={"sender": 2, "receiver": 1, "content": "new"},
            headers=app.server_auth,
        )
        assert status == 200
        status, reply, _ = await stack.request(
            "GET", "/messages", headers=await stack.client(app, 1)
        )
        assert [(i["id"], i["content"]) for i in reply["data"]] == [
            (1, "old 1"),
            (2, "old 2"),
            (3, "old 3"),
            (4, "stuck"),
            (5, "new"),
        ]
        await MessagesAdmin(db, settings).set_sync_key(appid, "u:1", 5)  # a delivery server's ack
        status, reply, _ = await stack.request(
            "GET", "/messages/offline?uid=1", headers=app.server_auth
        )
        assert reply["data"]["count"] == 0
        # Starting again finds nothing more to do; the old done post is untouched. (The new
        # message is finished in the background first: wait for it.)
        async with asyncio.timeout(15):
            while await db[PENDING].count_documents({}):
                await asyncio.sleep(0.1)
        await MessagesAdmin(db, settings).migrate()
        assert await db[PENDING].count_documents({}) == 0
        old_done = await db[POSTS].find_one({"_id": "old1"})
        assert old_done is not None and old_done["keys"] == {"u:1": 1}


async def test_batches_and_single_appends_from_two_replicas_keep_keys_dense(
    own_stack: Stack,
) -> None:
    """A batch of notifications (one ordered insert) and single messages written at the same
    time by another process into the same inboxes: every message stored once per inbox, keys
    dense from 1, the batch in its order; a replay of the batch stores nothing and returns the
    same keys."""
    db = own_stack.db
    first, second = MessagesAdmin(db, own_stack.settings), MessagesAdmin(db, own_stack.settings)
    appid = 900_000 + uuid.uuid4().int % 100_000
    owners = ["g:1", "u:1", "u:2"]
    fields = {"cmd": 7, "sender": 0, "receiver": 1, "content": "n", "timestamp": 1}
    batch = [(owners, f"batch-{n}", fields) for n in range(300)]

    async def singles() -> None:
        for n in range(40):
            await second.append(appid, owners[n % 3 :], f"single-{n}", fields)
            await asyncio.sleep(0)

    async def batches() -> dict[str, dict[str, int]]:
        keys: dict[str, dict[str, int]] = {}
        for start in range(0, len(batch), 50):
            keys |= await first.append_batch(appid, batch[start : start + 50], {})
        return keys

    keys, _ = await asyncio.gather(batches(), singles())
    for owner in owners:
        stored = await db[ENTRIES].find({"appid": appid, "owner": owner}).to_list()
        by_key = sorted(int(d["key"]) for d in stored)
        assert by_key == list(range(1, len(stored) + 1)), owner  # dense
        msgs = [d["msg"] for d in sorted(stored, key=lambda d: int(d["key"]))]
        assert len(set(msgs)) == len(msgs)  # once each
        assert [m for m in msgs if m.startswith("batch-")] == [m for _, m, _ in batch]
        assert all(keys[m][owner] == msgs.index(m) + 1 for _, m, _ in batch)
    count = await db[ENTRIES].count_documents({"appid": appid})
    # A replay (by a process that never saw these inboxes) from the plan a pending post
    # records: the inboxes are read forward PROBE_COLD keys per command, nothing is written.
    rid = f"replay-{uuid.uuid4().hex}"
    with structlog.contextvars.bound_contextvars(request_id=rid):
        again = await MessagesAdmin(db, own_stack.settings).append_batch(
            appid, batch, dict.fromkeys(owners, 1)
        )
    assert STORE_COMMANDS.count(rid) <= 2 * (count // 3 // PROBE_COLD + 2) + 1
    assert again == keys
    assert await db[ENTRIES].count_documents({"appid": appid}) == count
