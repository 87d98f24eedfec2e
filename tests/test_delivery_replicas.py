"""Two delivery replicas behind one broker, each its own ``parley serve delivery`` process in
the distributed stack: a user connected to one replica gets what is sent through the other
and through REST; killing a replica loses nothing (the client reconnects elsewhere, syncs,
and has every stored message exactly once). An agent connected to both replicas stays online
while one of them holds a connection, and a killed replica's agents lapse to offline."""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from parley.cluster import Cluster, start_cluster
from services.auth.admin import AuthAdmin
from services.customer.admin import CustomerAdmin
from shared.bus import RabbitBus

from .conftest import App, Stack, _prepared_db, stack_settings, unique
from .imclient import ACK, IM, SYNC_KEY, Client
from .test_delivery import rest_peer, visitor_sees, with_kefu_app

PRESENCE_INTERVAL = 1.0  # so that a killed replica's agents lapse within seconds


@pytest.fixture(scope="module")
async def cluster(
    mongo_url: str, amqp_url: str, workdir: Path
) -> AsyncIterator[tuple[Stack, Cluster]]:
    settings, _ = await with_kefu_app(stack_settings(mongo_url, amqp_url))
    settings = settings.model_copy(
        update={
            "internal_secret": secrets.token_urlsafe(32),
            "delivery_presence_interval": PRESENCE_INTERVAL,
        }
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


async def agent_desk(stack: Stack) -> tuple[App, App, int, int]:
    """A shop with a store of one agent: (the shop, the customer-service app, the store, the
    agent's seller id, which is its uid in the customer-service app)."""
    shop = await stack.new_app("shop")
    customer = CustomerAdmin(stack.db, stack.settings)
    store_id = await customer.create_store(shop.appid, "desk")
    seller = await customer.add_agent(shop.appid, store_id, "ann")
    apps = await AuthAdmin(stack.db, stack.settings).list_apps()
    kefu = next(a for a in apps if a.appid == stack.settings.kefu_appid)
    return shop, App(kefu.appid, kefu.key, kefu.secret), store_id, seller


async def test_an_agent_on_two_replicas_is_online_until_both_close(
    cluster: tuple[Stack, Cluster],
) -> None:
    stack, running = cluster
    one, two = running.delivery
    shop, agents, store_id, seller = await agent_desk(stack)
    await visitor_sees(stack, shop, store_id, "offline")
    phone = await Client.tcp(one.extra["tcp"])
    web = await Client.ws(two.extra["ws"])
    try:
        assert await phone.auth(await stack.token(agents, seller), 2, "phone") == 0
        assert await web.auth(await stack.token(agents, seller), 3, "web") == 0
        await visitor_sees(stack, shop, store_id, "online")
        await phone.close()  # replica 1 says offline; replica 2 still holds a connection
        await asyncio.sleep(2 * PRESENCE_INTERVAL)  # both have reported again meanwhile
        await visitor_sees(stack, shop, store_id, "online")
        await web.close()
        await visitor_sees(stack, shop, store_id, "offline")
    finally:
        await phone.close()
        await web.close()


async def test_replicas_share_every_message_and_a_killed_one_loses_none(
    cluster: tuple[Stack, Cluster],
) -> None:
    stack, running = cluster
    one, two = running.delivery
    app = await stack.new_app()
    shop, agents, store_id, seller = await agent_desk(stack)
    agent = await Client.tcp(one.extra["tcp"])
    assert await agent.auth(await stack.token(agents, seller), 2, "agent-phone") == 0
    await visitor_sees(stack, shop, store_id, "online")
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
        # The agent it held: offline once the dead replica's reports lapse.
        await visitor_sees(stack, shop, store_id, "offline")
        for n in range(5):
            await alice.send_im(1, 2, f"while away {n}")
            await alice.next(ACK)
        await rest_peer(stack, app, 1, 2, "while away (REST)")
    finally:
        await bob.close()
        await agent.close()
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
