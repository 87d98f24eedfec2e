"""Sync never skips (DESIGN invariant 3): concurrent writers of every stored kind at one user
while a reader pages through the inbox by key, in every mode and with two replicas of the
messages service on one RabbitMQ and one database."""

from __future__ import annotations

import asyncio

from services.messages.admin import Entry, MessagesAdmin

from .conftest import Stack

WRITERS = 8
PER_WRITER = 20


async def run_sync_check(stack: Stack) -> None:
    app = await stack.new_app()
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": 2, "name": "g", "members": [1, 2]},
        headers=app.server_auth,
    )
    assert status == 200
    gid = reply["data"]["group_id"]
    await stack.wait_inbox(app.appid, "u:1", 1)  # the create notification

    accepted: list[str] = []
    done = asyncio.Event()

    async def writer(w: int) -> None:
        for n in range(PER_WRITER):
            content = f"w{w}-{n}"
            kind = (w + n) % 3
            if kind == 0:
                path, body = (
                    "/messages/peers",
                    {"sender": 100 + w, "receiver": 1, "content": content},
                )
            elif kind == 1:
                path, body = "/messages/groups", {"sender": 2, "receiver": gid, "content": content}
            else:
                path, body = "/messages/systems", {"receiver": 1, "content": content}
            status, _, _ = await stack.request("POST", path, json=body, headers=app.server_auth)
            assert status == 200
            accepted.append(content)

    repo = MessagesAdmin(stack.db, stack.settings)
    seen: list[Entry] = []

    async def reader() -> None:
        after = 0
        while True:
            finished = done.is_set()
            page = await repo.page(app.appid, "u:1", after, 7)
            for entry in page:
                assert entry.key == after + 1, "keys are dense and strictly increasing"
                after = entry.key
                seen.append(entry)
            if finished and not page:
                return
            if not page:
                await asyncio.sleep(0.005)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    done.set()
    await reading

    contents = [e.content for e in seen if e.cmd in (4, 8, 21)]
    assert sorted(contents) == sorted(accepted)  # every accepted message, exactly once
    assert len(contents) == WRITERS * PER_WRITER
    # Nothing committed later at or below a key the reader had passed.
    final = await stack.inbox(app.appid, "u:1")
    assert [e["_id"] for e in final] == [e.id for e in seen]


async def test_sync_never_skips(stack: Stack) -> None:
    await run_sync_check(stack)


async def test_sync_never_skips_with_two_messages_replicas(two_replicas: Stack) -> None:
    messages = [p for p in two_replicas.processes if p.name == "parley-messages"]
    assert len(messages) == 2 and all(p.popen.poll() is None for p in messages)
    await run_sync_check(two_replicas)
