"""Replicas and failures, with real processes: two replicas of every service behind nginx, on
a RabbitMQ node of this module's own (so restarting it disturbs no other test).

* SIGKILL of a service process in the middle of a stream of writes loses no acknowledged
  write and no event of one;
* restarting RabbitMQ in the middle of a stream loses no event of an acknowledged write;
* a dead consumer (holding its events unacknowledged while its queue grows) does not slow
  the API.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from parley.servers import Process, free_port, restart_rabbitmq, start_rabbitmq
from services.auth.admin import AuthAdmin
from shared.bus import RabbitBus
from shared.events import Event, PeerMessage, TokenGranted

from .conftest import App, Stack, distributed_stack, stack_settings, unique

# Processes killed and brokers restarted: slow (``-m "not slow"`` leaves them out; CI runs them).
pytestmark = pytest.mark.slow

REPLICAS = {"auth": 2, "groups": 2, "messages": 2, "customer": 2}
SETTLE = 30.0


@pytest.fixture(scope="module")
def broker(workdir: Path) -> Iterator[dict[str, Process]]:
    holder = {"process": start_rabbitmq(workdir / unique("rabbitmq-failures-"), free_port())}
    yield holder
    holder["process"].stop()


@pytest.fixture(scope="module")
async def replicated(
    broker: dict[str, Process], mongo_url: str, workdir: Path
) -> AsyncIterator[Stack]:
    settings = stack_settings(mongo_url, broker["process"].extra["url"]).model_copy(
        update={"publish_timeout": 1.0}
    )
    async with distributed_stack(settings, workdir, REPLICAS) as built:
        yield built


class Durable:
    """A durable subscriber (its queue outlives broker restarts) collecting events."""

    def __init__(self) -> None:
        self.events: dict[str, Event] = {}

    async def __call__(self, event: Event) -> None:
        self.events[event.event_id] = event


async def stream(
    stack: Stack, app: App, count: int, tag: str, concurrency: int = 4
) -> tuple[list[str], list[int]]:
    """Peer messages and grants through the edge; returns the acknowledged message contents
    and granted uids (requests that failed while a process died are simply not counted)."""
    acked: list[str] = []
    granted: list[int] = []
    failures: list[int] = []

    async def writer(w: int) -> None:
        for n in range(w, count, concurrency):
            content = f"{tag}-{n}"
            try:
                status, _, _ = await stack.request(
                    "POST",
                    "/messages/peers",
                    json={"sender": 1, "receiver": 2, "content": content},
                    headers=app.server_auth,
                )
                if status == 200:
                    acked.append(content)
                else:
                    failures.append(status)
                status, _, _ = await stack.request(
                    "POST", "/auth/grant", json={"uid": 1000 + n}, headers=app.server_auth
                )
                if status == 200:
                    granted.append(1000 + n)
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.005)

    await asyncio.gather(*(writer(w) for w in range(concurrency)))
    print(f"{tag}: {len(acked)} acknowledged, failures {sorted(set(failures))}")
    return acked, granted


async def all_announced(
    stack: Stack, collector: Durable, app: App, acked: list[str], granted: list[int]
) -> None:
    """Every acknowledged write is stored, and its event arrives (in time)."""
    inbox = {e["content"] for e in await stack.inbox(app.appid, "u:2")}
    assert set(acked) <= inbox, "an acknowledged message was lost"
    auth = AuthAdmin(stack.db, stack.settings)
    users = await asyncio.gather(*(auth.user(app.appid, uid) for uid in granted))
    assert all(u is not None and u.token for u in users), "an acknowledged grant was lost"
    deadline = time.monotonic() + SETTLE
    while True:
        events = list(collector.events.values())
        peer = {e.content for e in events if isinstance(e, PeerMessage) and e.appid == app.appid}
        grants = {e.uid for e in events if isinstance(e, TokenGranted) and e.appid == app.appid}
        missing = (set(acked) - peer, set(granted) - grants)
        if not any(missing):
            return
        assert time.monotonic() < deadline, f"events never published: {missing}"
        await asyncio.sleep(0.2)


async def subscribe_durably(stack: Stack, collector: Durable) -> Any:
    return await stack.bus.subscribe(
        unique(f"{stack.settings.amqp_exchange}.audit."),
        ["message.peer", "token.granted"],
        collector,
    )


async def test_two_replicas_of_every_service_serve(replicated: Stack) -> None:
    running = [p.name for p in replicated.processes if p.popen.poll() is None]
    for service in REPLICAS:
        assert running.count(f"parley-{service}") == 2
    app = await replicated.new_app()
    acked, granted = await stream(replicated, app, 40, "plain")
    assert len(acked) == 40 and len(granted) == 40


async def test_sigkill_mid_stream_loses_no_acknowledged_write(replicated: Stack) -> None:
    stack = replicated
    app = await stack.new_app()
    collector = Durable()
    subscription = await subscribe_durably(stack, collector)
    try:
        victims = [
            next(p for p in stack.processes if p.name == f"parley-{s}" and p.popen.poll() is None)
            for s in ("messages", "auth")
        ]

        async def kill_soon() -> None:
            await asyncio.sleep(0.6)
            for victim in victims:
                victim.popen.send_signal(signal.SIGKILL)

        killer = asyncio.create_task(kill_soon())
        acked, granted = await stream(stack, app, 300, "kill")
        await killer
        assert all(v.popen.wait(5) == -signal.SIGKILL for v in victims)
        assert len(acked) > 100 and len(granted) > 100  # the survivors kept serving
        await all_announced(stack, collector, app, acked, granted)
    finally:
        await subscription.cancel()


async def test_rabbitmq_restart_mid_stream_loses_no_event(
    replicated: Stack, broker: dict[str, Process]
) -> None:
    stack = replicated
    app = await stack.new_app()
    collector = Durable()
    subscription = await subscribe_durably(stack, collector)
    try:

        async def restart_soon() -> None:
            await asyncio.sleep(0.5)
            broker["process"] = await asyncio.to_thread(restart_rabbitmq, broker["process"])

        restarter = asyncio.create_task(restart_soon())
        acked, granted = await stream(stack, app, 200, "restart")
        await restarter
        acked2, granted2 = await stream(stack, app, 20, "after")  # writes after the restart
        assert acked2 and granted2
        await all_announced(stack, collector, app, acked + acked2, granted + granted2)
    finally:
        await subscription.cancel()


async def timed_requests(stack: Stack, app: App, count: int) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        status, _, _ = await stack.request(
            "POST",
            "/messages/peers",
            json={"sender": 5, "receiver": 6, "content": str(n)},
            headers=app.server_auth,
        )
        latencies.append(time.perf_counter() - started)
        assert status == 200
    return latencies


async def test_a_dead_consumer_does_not_slow_the_api(replicated: Stack) -> None:
    stack = replicated
    app = await stack.new_app()
    baseline = statistics.median(await timed_requests(stack, app, 40))

    stuck = asyncio.Event()

    async def dead(event: Event) -> None:
        stuck.set()
        await asyncio.sleep(3600)  # never acknowledges

    bus = RabbitBus(
        stack.settings.amqp_url or "", exchange=stack.settings.amqp_exchange, prefetch=1
    )
    await bus.start()
    queue = unique(f"{stack.settings.amqp_exchange}.dead-consumer.")
    subscription = await bus.subscribe(queue, ["#"], dead)
    try:
        with_dead = statistics.median(await timed_requests(stack, app, 40))
        print(f"median latency: {baseline * 1000:.1f} ms alone, {with_dead * 1000:.1f} ms with")
        assert stuck.is_set()
        # Its queue keeps growing while the API answers as before.
        assert with_dead <= 3 * baseline + 0.025, (baseline, with_dead)
    finally:
        await subscription.cancel()
        await bus.close()


def readyz(process: Process) -> tuple[int, Any]:
    argv = [str(a) for a in process.popen.args]  # type: ignore[union-attr]
    url = f"http://{argv[argv.index('--http-addr') + 1]}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_readyz_follows_the_broker(replicated: Stack, broker: dict[str, Process]) -> None:
    services = [p for p in replicated.processes if p.name.startswith("parley-")]
    services = [p for p in services if p.popen.poll() is None]  # SIGKILLed ones stay dead
    assert len(services) >= 4
    for process in services:
        assert (await asyncio.to_thread(readyz, process))[0] == 200

    await asyncio.to_thread(broker["process"].stop)
    stopped = time.monotonic()
    for process in services:
        while True:
            status, body = await asyncio.to_thread(readyz, process)
            if status == 503:
                break
            assert time.monotonic() - stopped < 10, (process.name, body)
            await asyncio.sleep(0.1)
        assert body["meta"] == {"code": 503, "message": "not ready: rabbitmq"}, body
        assert body["checks"]["mongodb"] == "ok"
    print(f"all not ready {time.monotonic() - stopped:.2f}s after the broker stopped")

    base = Path(broker["process"].extra["base_dir"])
    port = int(broker["process"].extra["port"])
    broker["process"] = await asyncio.to_thread(start_rabbitmq, base, port)
    returned = time.monotonic()
    for process in services:
        while (await asyncio.to_thread(readyz, process))[0] != 200:
            assert time.monotonic() - returned < 30, process.name
            await asyncio.sleep(0.2)
    print(f"all ready {time.monotonic() - returned:.2f}s after the broker returned")
