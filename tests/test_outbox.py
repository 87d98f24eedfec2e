"""A 200 means durable *and* announced (DESIGN invariant 1): an event whose publish failed, or
whose request was cancelled between the write and the publish, is published by the relay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.auth.admin import AuthAdmin
from shared.bus import Bus, DeadLetter, EventHandler, Subscription
from shared.events import AppCreated, TokenGranted
from shared.outbox import OutboxRelay

from .conftest import Stack


class BrokenBus(Bus):
    """A broker that is down (``hang``: one that never confirms)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        raise ConnectionError("broker unreachable")

    async def subscribe(
        self,
        queue: str,
        bindings: Sequence[str],
        handler: EventHandler,
        *,
        durable: bool = True,
    ) -> Subscription:
        raise ConnectionError("broker unreachable")

    async def take_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return []


async def test_a_failed_publish_is_relayed_later(stack: Stack) -> None:
    app = await stack.new_app()
    broken = AuthAdmin(stack.db, stack.settings, BrokenBus())
    async with stack.recorder(app.appid) as events:
        token = await broken.grant(app.appid, 1, "eve")  # answered despite the broker
        user = await broken.user(app.appid, 1)
        assert user is not None and user.token == token
        assert await broken.unannounced(app.appid, 1) == [user.revision]
        # The running services' relay (every 0.5 s, for changes older than 1 s) publishes it.
        received = await events.wait_for(1)
        assert isinstance(received[0], TokenGranted)
        assert (received[0].uid, received[0].user_name) == (1, "eve")
    async with asyncio.timeout(10):  # settled right after the confirm
        while await broken.unannounced(app.appid, 1):
            await asyncio.sleep(0.05)


async def test_a_request_cancelled_after_its_write_still_gets_its_event(stack: Stack) -> None:
    app = await stack.new_app()
    hanging = AuthAdmin(stack.db, stack.settings, BrokenBus(hang=True))
    task = asyncio.create_task(hanging.grant(app.appid, 2, "frank"))
    async with asyncio.timeout(10):
        while await AuthAdmin(stack.db, stack.settings).user(app.appid, 2) is None:
            await asyncio.sleep(0.01)
    task.cancel()  # the client went away between the write and the publish
    async with stack.recorder(app.appid) as events:
        relay = OutboxRelay(hanging.revlogs(), stack.bus, interval=60, grace=0)
        assert await relay.run_once() in (0, 1)  # the services' relay may have been first
        received = await events.wait_for(1)
        assert [type(e) for e in received] == [TokenGranted]


async def test_management_writes_are_announced_by_the_running_services(stack: Stack) -> None:
    """``parley app create`` has no broker connection: its event waits in the outbox until a
    running service's relay publishes it."""
    async with stack.recorder(None) as events:
        app = await stack.new_app("offline", announce=False)
        async with asyncio.timeout(10):
            while not any(
                isinstance(e, AppCreated) and e.appid == app.appid for e in events.events
            ):
                await events.wait_for(len(events.events) + 1)
