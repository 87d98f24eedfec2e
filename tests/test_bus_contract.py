"""The bus contract, run against both transports (RabbitMQ and the in-process bus): routing by
key, redelivery of an unacknowledged event, an idempotent consumer, and dead-lettering."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import pytest

from shared.bus import Bus, RabbitBus
from shared.events import Event, TokenGranted, UserSettingsChanged
from shared.mongo import make_client

from .conftest import unique

WAIT = 10.0


def granted(uid: int, appid: int = 1) -> TokenGranted:
    return TokenGranted(appid=appid, uid=uid, user_name=f"u{uid}")


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Condition()

    async def __call__(self, event: Event) -> None:
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def wait_for(self, count: int) -> list[Event]:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: len(self.events) >= count)
        return list(self.events)


async def dead_letters(bus: Bus, count: int) -> list[Any]:
    letters: list[Any] = []
    async with asyncio.timeout(WAIT):
        while len(letters) < count:
            letters += await bus.take_dead_letters()
            if len(letters) < count:
                await asyncio.sleep(0.05)
    return letters


async def test_routing_by_key(bus: Bus) -> None:
    users, grants, everything = Collector(), Collector(), Collector()
    subs = [
        await bus.subscribe(unique("c.users."), ["user.#"], users),
        await bus.subscribe(unique("c.grants."), ["token.granted"], grants),
        await bus.subscribe(unique("c.all."), ["#"], everything),
    ]
    try:
        first, second = granted(1), granted(2)
        change = UserSettingsChanged(appid=1, uid=1, mute=True)
        for event in (first, change, second):
            await bus.publish_event(event)
        await everything.wait_for(3)
        await grants.wait_for(2)
        await users.wait_for(1)
        await asyncio.sleep(0.3)
        assert [e.event_id for e in grants.events] == [first.event_id, second.event_id]
        assert [e.event_id for e in users.events] == [change.event_id]
        assert {e.event_id for e in everything.events} == {
            first.event_id,
            second.event_id,
            change.event_id,
        }
        assert isinstance(users.events[0], UserSettingsChanged)
        assert users.events[0] == change  # the payload survives the round trip
    finally:
        for sub in subs:
            await sub.cancel()


async def test_a_failed_event_is_redelivered_once_then_acknowledged(bus: Bus) -> None:
    attempts: list[str] = []

    async def flaky(event: Event) -> None:
        attempts.append(event.event_id)
        if len(attempts) == 1:
            raise RuntimeError("transient failure")

    sub = await bus.subscribe(unique("c.flaky."), ["token.*"], flaky)
    try:
        event = granted(3)
        await bus.publish_event(event)
        async with asyncio.timeout(WAIT):
            while len(attempts) < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert attempts == [event.event_id, event.event_id]
        assert await bus.take_dead_letters() == []
    finally:
        await sub.cancel()


async def test_an_event_failing_twice_is_dead_lettered(bus: Bus) -> None:
    attempts: list[str] = []

    async def broken(event: Event) -> None:
        attempts.append(event.event_id)
        raise RuntimeError("permanent failure")

    queue = unique("c.broken.")
    sub = await bus.subscribe(queue, ["token.*"], broken)
    try:
        event = granted(4)
        await bus.publish_event(event)
        letters = await dead_letters(bus, 1)
        assert attempts == [event.event_id, event.event_id]
        assert [(d.routing_key, d.queue) for d in letters] == [("token.granted", queue)]
        assert letters[0].body == event.to_json()
    finally:
        await sub.cancel()


async def test_an_unacknowledged_event_comes_back_to_the_next_consumer(bus: Bus) -> None:
    """A consumer that stops (crashes) mid-event never acknowledged it: the event is
    delivered again to whoever consumes the queue next, flagged as a redelivery."""
    queue = unique("c.crash.")
    started = asyncio.Event()

    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    sub = await bus.subscribe(queue, ["token.*"], stuck)
    event = granted(5)
    await bus.publish_event(event)
    async with asyncio.timeout(WAIT):
        await started.wait()
    await sub.cancel()

    second = Collector()
    sub = await bus.subscribe(queue, ["token.*"], second)
    try:
        received = await second.wait_for(1)
        assert [e.event_id for e in received] == [event.event_id]
    finally:
        await sub.cancel()


async def test_an_idempotent_consumer_applies_a_duplicate_once(bus: Bus, mongo_url: str) -> None:
    """At-least-once delivery means duplicates; a consumer that derives its write from the
    event id applies each event once, however often it arrives."""
    client = make_client(mongo_url)
    collection = client[unique("t_")]["contract_effects"]
    seen = Collector()

    async def apply(event: Event) -> None:
        assert isinstance(event, TokenGranted)
        await collection.update_one(
            {"_id": event.event_id},
            {"$setOnInsert": {"uid": event.uid}},
            upsert=True,
        )
        await collection.update_one(
            {"_id": f"total:{event.uid}", "applied": {"$ne": event.event_id}},
            {"$inc": {"n": 1}, "$push": {"applied": event.event_id}},
            upsert=False,
        )
        await seen(event)

    await collection.insert_one({"_id": "total:6", "n": 0, "applied": []})
    sub = await bus.subscribe(unique("c.idem."), ["token.*"], apply)
    try:
        event = granted(6)
        for _ in range(3):  # the same event, delivered three times
            await bus.publish_event(event)
        await seen.wait_for(3)
        assert await collection.count_documents({"_id": event.event_id}) == 1
        total = await collection.find_one({"_id": "total:6"})
        assert total is not None and total["n"] == 1
    finally:
        await sub.cancel()
        await client.close()


@pytest.mark.parametrize(
    ("routing_key", "body"),
    [
        ("token.granted", b"\x00not json"),
        ("token.granted", b"[1, 2]"),
        ("token.granted", b'{"version": 99, "appid": 1, "uid": 1, "user_name": ""}'),
        ("token.granted", b'{"version": 1, "appid": 1, "uid": "x", "user_name": ""}'),
        ("token.granted", b'{"version": 1, "appid": 1, "uid": 1, "user_name": "", "extra": 1}'),
        ("token.unknown", b'{"version": 1, "appid": 1}'),
    ],
)
async def test_a_malformed_event_is_dead_lettered_and_does_not_block(
    bus: Bus, routing_key: str, body: bytes
) -> None:
    handled = Collector()
    queue = unique("c.malformed.")
    sub = await bus.subscribe(queue, ["token.*"], handled)
    try:
        await bus.publish(routing_key, body, message_id="garbage")
        good = granted(7)
        await bus.publish_event(good)
        received = await handled.wait_for(1)
        assert [e.event_id for e in received] == [good.event_id]
        letters = await dead_letters(bus, 1)
        assert [(d.routing_key, d.body, d.queue) for d in letters] == [(routing_key, body, queue)]
    finally:
        await sub.cancel()


async def test_rabbitmq_topology_is_durable(amqp_url: str) -> None:
    """Events are persistent and queues durable: declared passively, they exist after the
    publisher and consumer are gone."""
    exchange = unique("parley.contract.")
    bus = RabbitBus(amqp_url, exchange=exchange)
    await bus.start()
    queue = unique("c.durable.")
    sub = await bus.subscribe(queue, ["token.*"], Collector())
    await sub.cancel()
    await bus.publish_event(granted(8))
    await bus.close()

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        message = None
        async with asyncio.timeout(WAIT):
            while message is None:
                message = await declared.get(fail=False)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.message_id
        await message.ack()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
