"""The lifecycle kit (``shared/lifecycle.py``): the all-in-one start order whatever the order of
registration, internal rows behind one secret check and never routed from outside, consumers
with a deadline per event on both transports, background passes that log their failures, and
a startup that fails halfway leaving nothing open."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import re
from typing import Any

import aio_pika
import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from parley.allinone import SERVICE_FACTORIES, create_allinone_app
from parley.servers import free_port
from services.messages.app import create_app as create_messages
from shared.bus import Bus, DeadLetter, LocalBus
from shared.events import Event, TokenGranted
from shared.gateway import ingress_prefixes, render_ingress, render_nginx
from shared.internal import INTERNAL_SECRET_HEADER
from shared.lifecycle import (
    Consumer,
    ServiceSpec,
    check_provided,
    consumers_ctx,
    start_order,
)
from shared.loops import run_every
from shared.routing import (
    INTERNAL_ROUTES,
    ROUTES,
    SERVICES,
    internal_routes_for,
    service_for_path,
)
from shared.server import serve
from shared.settings import Settings
from shared.web import BUS, SETTINGS, Deps, service_app

from .conftest import (
    ParleyTestServer,
    Stack,
    _prepared_db,
    bounded,
    stack_settings,
    unique,
)

WAIT = 10.0


def sample(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "12", path)


# ---- the all-in-one start order -----------------------------------------------------------


def test_the_start_order_is_the_same_for_every_registration_order() -> None:
    specs = list(SERVICE_FACTORIES.values())
    orders = {tuple(s.name for s in start_order(p)) for p in itertools.permutations(specs)}
    assert len(orders) == 1
    (order,) = orders
    position = {name: i for i, name in enumerate(order)}
    for spec in specs:
        for need in spec.needs:
            for provider in (s for s in specs if need in s.provides and s is not spec):
                assert position[provider.name] < position[spec.name], (spec.name, need)
    assert order[0] == "auth" and order[-1] == "messages"


def test_services_that_need_each_other_are_refused() -> None:
    def never(settings: Settings, deps: Deps) -> web.Application:
        raise AssertionError("not built")

    a = ServiceSpec("a", never, provides=frozenset({"groups"}), needs=frozenset({"customers"}))
    b = ServiceSpec("b", never, provides=frozenset({"customers"}), needs=frozenset({"groups"}))
    with pytest.raises(ValueError, match="a, b"):
        start_order([b, a])
    # A need nobody in the process provides is left to the service's HTTP client.
    assert [s.name for s in start_order([a])] == ["a"]


def test_a_service_that_does_not_provide_what_it_declares_fails_the_start() -> None:
    spec = SERVICE_FACTORIES["groups"]
    with pytest.raises(RuntimeError, match="groups"):
        check_provided(spec, Deps())


async def test_the_all_in_one_app_works_whatever_the_registration_order(mongo_url: str) -> None:
    names = list(SERVICE_FACTORIES)
    shuffled = names[::-1]
    while shuffled == names:  # pragma: no cover - the reversed order is already another one
        random.shuffle(shuffled)
    settings = stack_settings(mongo_url, None)
    bus = LocalBus()
    client, db = await _prepared_db(settings)
    deps = Deps(db=db, bus=bus)
    app = create_allinone_app(
        settings, factories={name: SERVICE_FACTORIES[name] for name in shuffled}, deps=deps
    )
    server = ParleyTestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        # The in-process APIs were all provided (a service started before its provider
        # would have used an internal HTTP client, and the group message would fail).
        assert None not in (deps.verifier, deps.tokens, deps.groups, deps.customers)
        async with aiohttp.ClientSession() as http:
            stack = Stack("local", str(server.make_url("")).rstrip("/"), db, bus, settings, http)
            parley = await stack.new_app()
            status, reply, _ = await stack.request(
                "POST",
                "/groups",
                json={"master": 1, "name": "g", "members": [1, 2, 3]},
                headers=parley.server_auth,
            )
            assert status == 200, reply
            gid = int(reply["data"]["group_id"])
            body = {"sender": 1, "receiver": gid, "content": "hello"}
            status, reply, _ = await stack.request(
                "POST", "/messages/groups", json=body, headers=parley.server_auth
            )
            assert status == 200, reply
            # The create notification (from the groups service's event) and the message.
            entries = await stack.wait_inbox(parley.appid, "u:2", 2)
            assert [e["content"] for e in entries][-1] == "hello"
            headers = await stack.client(parley, 2)
            status, reply, _ = await stack.request("GET", "/messages", headers=headers)
            assert status == 200 and reply["data"][-1]["content"] == "hello"
    finally:
        await bounded(server.close(), "the all-in-one server's shutdown")
        await bus.close()
        await client.close()


# ---- internal rows ------------------------------------------------------------------------


def test_internal_rows_are_only_under_internal_and_every_service_has_some() -> None:
    assert all(r.path.startswith("/internal/") and r.internal for r in INTERNAL_ROUTES)
    assert not any(r.path.startswith("/internal") or r.internal for r in ROUTES)
    assert {r.service for r in INTERNAL_ROUTES} == set(SERVICES)
    assert len({(r.method, r.path) for r in INTERNAL_ROUTES}) == len(INTERNAL_ROUTES)


def test_nothing_that_routes_from_outside_reaches_an_internal_row() -> None:
    nginx = render_nginx({s: ["127.0.0.1:9001"] for s in SERVICES})
    assert "internal" not in nginx
    assert "internal" not in render_ingress()
    for route in INTERNAL_ROUTES:
        path = sample(route.path)
        assert service_for_path(path) is None, route
        assert not any(path.startswith(prefix) for prefix in ingress_prefixes() if prefix != "/")
        for rule_regex in (r.regex for r in ROUTES):
            assert not re.match(rule_regex, path)


async def test_each_internal_row_is_behind_the_secret_check_and_no_public_row_is() -> None:
    secret = "k" * 40
    for service in SERVICES:

        async def answer(request: web.Request) -> web.Response:
            return web.json_response({"reached": request.path})

        names = {r.handler for r in ROUTES + INTERNAL_ROUTES if r.service == service}
        app = service_app(service, Settings(internal_secret=secret), dict.fromkeys(names, answer))
        async with TestClient(TestServer(app)) as client:
            for route in internal_routes_for(service):
                path = sample(route.path)
                for headers, status in (
                    ({}, 401),
                    ({INTERNAL_SECRET_HEADER: "wrong"}, 403),
                    ({INTERNAL_SECRET_HEADER: secret}, 200),
                ):
                    async with client.request(route.method, path, headers=headers) as resp:
                        assert resp.status == status, (route, headers)
            public = next(r for r in ROUTES if r.service == service and r.method != "OPTIONS")
            async with client.request(public.method, sample(public.path)) as resp:
                assert resp.status == 200, public


# ---- consumers ----------------------------------------------------------------------------


async def test_a_handler_past_its_deadline_fails_the_delivery(bus: Bus) -> None:
    """Cancelled and logged at its deadline; requeued once, then dead-lettered, as any
    failed handler's event is."""
    attempts: list[str] = []
    cancelled = 0

    async def slow(event: Event) -> None:
        nonlocal cancelled
        attempts.append(event.event_id)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled += 1
            raise

    consumer = Consumer("lifecycle.slow", ("token.granted",), lambda app: slow, timeout=0.2)
    app = web.Application()
    app[SETTINGS] = Settings(amqp_exchange=unique("parley.lifecycle."))
    app[BUS] = bus
    app.cleanup_ctx.append(consumers_ctx(consumer))
    app.pre_freeze()  # its steps fixed, as a runner does
    event = TokenGranted(appid=1, uid=7, user_name="slow")
    with structlog.testing.capture_logs() as logs:
        await app.startup()
        try:
            await bus.publish_event(event)
            letters: list[DeadLetter] = []
            async with asyncio.timeout(WAIT):
                while not letters:
                    letters = await bus.take_dead_letters()
                    await asyncio.sleep(0.05)
        finally:
            await app.cleanup()
    assert attempts == [event.event_id] * 2 and cancelled == 2
    assert [letter.routing_key for letter in letters] == ["token.granted"]
    queue = consumer.queue_name(app[SETTINGS])
    overran = [entry for entry in logs if "overran its deadline" in entry["event"]]
    assert len(overran) == 2
    assert all(e["queue"] == queue and e["seconds"] == 0.2 for e in overran)
    assert all(e["event_id"] == event.event_id for e in overran)


async def test_a_handlers_own_timeout_is_an_ordinary_failure() -> None:
    bus = LocalBus()
    seen: list[str] = []

    async def failing(event: Event) -> None:
        seen.append(event.event_id)
        raise TimeoutError("the store did not answer")

    consumer = Consumer("lifecycle.own", ("token.granted",), lambda app: failing, timeout=30)
    app = web.Application()
    app[SETTINGS] = Settings()
    app[BUS] = bus
    app.cleanup_ctx.append(consumers_ctx(consumer))
    app.pre_freeze()  # its steps fixed, as a runner does
    with structlog.testing.capture_logs() as logs:
        await app.startup()
        try:
            await bus.publish_event(TokenGranted(appid=1, uid=8, user_name=""))
            async with asyncio.timeout(WAIT):
                while not await bus.take_dead_letters():
                    await asyncio.sleep(0.01)
        finally:
            await app.cleanup()
    assert len(seen) == 2
    assert not [entry for entry in logs if "overran" in entry["event"]]


# ---- background passes --------------------------------------------------------------------


async def test_a_failed_background_pass_is_logged_and_the_next_one_runs() -> None:
    passes = 0
    second = asyncio.Event()

    async def step() -> None:
        nonlocal passes
        passes += 1
        if passes == 1:
            raise ConnectionError("store down")
        second.set()

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(run_every(0.01, step, "a test pass"))
        async with asyncio.timeout(WAIT):
            await second.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (failed,) = [entry for entry in logs if entry.get("loop") == "a test pass"]
    assert failed["log_level"] == "warning" and failed["exc_info"] is True


# ---- a startup that fails halfway ---------------------------------------------------------


def open_sessions() -> set[int]:
    found = (o for o in gc.get_objects() if issubclass(type(o), aiohttp.ClientSession))
    return {id(session) for session in found if not session.closed}


async def settled_tasks(before: set[asyncio.Task[Any]]) -> set[str]:
    """The tasks started since ``before`` still there once every closing step has had time
    to end (none, when nothing was left running)."""
    me = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        left = [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]
        if not left or asyncio.get_running_loop().time() > deadline:
            return {f"{t.get_name()}: {t.get_coro()!r}" for t in left}
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("runner", ["messages alone", "all-in-one"])
async def test_a_startup_refused_by_the_broker_leaves_nothing_open(
    mongo_url: str, amqp_url: str, runner: str
) -> None:
    """The broker refuses the messages service's subscription (its queue exists with other
    arguments): the startup fails, and every step that had opened (its database client and
    broker connection, the internal-API clients, the other services' consumers and relays)
    is closed, as ``parley serve`` and ``parley run`` run it."""
    settings = stack_settings(mongo_url, amqp_url).model_copy(
        update={
            "internal_secret": "i" * 40,
            "groups_url": f"http://127.0.0.1:{free_port()}",
            "customer_url": f"http://127.0.0.1:{free_port()}",
            "auth_url": f"http://127.0.0.1:{free_port()}",
        }
    )
    taken = f"{settings.amqp_exchange}.messages.group-notifications"
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(taken, durable=True)  # without a dead-letter exchange
        sessions = open_sessions()
        tasks = asyncio.all_tasks()
        app = (
            create_messages(settings, Deps())
            if runner == "messages alone"
            else create_allinone_app(settings, deps=Deps())
        )
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await serve(app, "127.0.0.1", free_port())
        assert await settled_tasks(tasks) == set()
        gc.collect()
        assert open_sessions() - sessions == set()
        if runner == "all-in-one":
            # The consumers that had subscribed before it were cancelled.
            for queue in ("groups.user-names", "customer.presence"):
                declared = await channel.declare_queue(
                    f"{settings.amqp_exchange}.{queue}", passive=True
                )
                assert declared.declaration_result.consumer_count == 0, queue
    finally:
        await connection.close()
