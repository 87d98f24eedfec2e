"""Two delivery replicas behind one broker, each its own ``parley serve delivery`` process in
the distributed stack: a user connected to one replica gets what is sent through the other
and through REST; killing a replica loses nothing (the client reconnects elsewhere, syncs,
and has every stored message exactly once)."""

from __future__ import annotations

import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from parley.cluster import Cluster, start_cluster
from shared.bus import RabbitBus

from .conftest import Stack, _prepared_db, stack_settings, unique
from .imclient import ACK, IM, SYNC_KEY, Client
from .test_delivery import rest_peer


@pytest.fixture(scope="module")
async def cluster(
    mongo_url: str, amqp_url: str, workdir: Path
) -> AsyncIterator[tuple[Stack, Cluster]]:
    settings = stack_settings(mongo_url, amqp_url).model_copy(
        update={"internal_secret": secrets.token_urlsafe(32)}
    )
    running = start_cluster(settings, workdir / unique("delivery-replicas-"), delivery=2)
    try:
        bus = RabbitBus(amqp_url, exchange=settings.amqp_exchange)
        await bus.start()
        client, db = await _prepared_db(settings)
        try:
            async with aiohttp.ClientSession() as http:
                yield Stack("distributed", running.edge_url, db, bus, settings, http), running
        finally:
            await bus.close()
            await client.close()
    finally:
        running.stop()


async def test_replicas_share_every_message_and_a_killed_one_loses_none(
    cluster: tuple[Stack, Cluster],
) -> None:
    stack, running = cluster
    one, two = running.delivery
    app = await stack.new_app()
    bob = await Client.tcp(one.extra["tcp"])
    alice = await Client.ws(two.extra["ws"])
    try:
        assert await bob.auth(await stack.token(app, 2), 2, "bob-phone") == 0
        assert await alice.auth(await stack.token(app, 1), 3, "alice-web") == 0
        # Sent through replica 2: bob, on replica 1, gets it live.
        await alice.send_im(1, 2, "via replica 2")
        await alice.next(ACK)
        _, message = await bob.pushed(IM)
        assert message.im()["content"] == "via replica 2"
        # Sent through REST: the same.
        await rest_peer(stack, app, 1, 2, "via REST")
        meta, message = await bob.pushed(IM)
        assert message.im()["content"] == "via REST"
        key = struct.unpack_from(">q", meta.body)[0]
        await bob.send(SYNC_KEY, struct.pack(">q", key))
        await bob.quiet(0.3)
        # Replica 1 dies; what is sent meanwhile is stored, and waits for bob's next sync.
        one.kill()
        await bob.wait_closed()
        for n in range(5):
            await alice.send_im(1, 2, f"while away {n}")
            await alice.next(ACK)
        await rest_peer(stack, app, 1, 2, "while away (REST)")
    finally:
        await bob.close()
    again = await Client.tcp(two.extra["tcp"])
    try:
        assert await again.auth(await stack.token(app, 2), 2, "bob-phone") == 0
        found, _ = await again.sync_all(0)
        assert [m.im()["content"] for m in found] == [
            *(f"while away {n}" for n in range(5)),
            "while away (REST)",
        ]
    finally:
        await again.close()
        await alice.close()
