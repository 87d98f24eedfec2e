"""Test harness: real servers, started once per session.

* FerretDB (``PARLEY_TEST_MONGO_URL`` to use another MongoDB-compatible server instead) and
  RabbitMQ (``PARLEY_TEST_AMQP_URL``) are started here, each waited on with a protocol probe;
  FerretDB on SQLite, or with ``PARLEY_LOCAL_STORE=postgresql`` on a private PostgreSQL
  cluster started here too.
* ``stack`` is Parley itself, reached over real HTTP, in three modes:
  ``local`` (all-in-one, in-process bus), ``rabbit`` (all-in-one on RabbitMQ) and
  ``distributed`` (``parley serve`` processes behind nginx rendered from the routing table).
  Tests isolate themselves by tenancy: each makes its own app (``stack.new_app()``).
* ``stack.recorder(appid)`` subscribes to every event (a temporary queue bound to ``#``) and
  collects the events of one app, so tests assert exactly which events a request published.
  ``Recorder.published()`` proves that nothing more was published without waiting out a quiet
  spell: it publishes a sentinel event and returns what arrived before it.
* A test whose requests are all refused (a 4xx that writes nothing and publishes nothing)
  crosses no bus: ``@one_mode`` runs it on the ``local`` stack alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from parley.allinone import ALL_IN_ONE, create_allinone_app
from parley.cluster import start_cluster
from parley.servers import (
    REPO_ROOT,
    Process,
    free_port,
    start_ferretdb,
    start_postgres,
    start_rabbitmq,
)
from services.auth.admin import AppCredentials, AuthAdmin
from shared.bus import Bus, LocalBus, RabbitBus, topic_matches
from shared.events import Event
from shared.logs import configure_logging
from shared.mongo import Database, make_client
from shared.routing import SERVICES
from shared.server import ParleyRunner
from shared.settings import Settings
from shared.web import Deps

configure_logging(level=os.environ.get("PARLEY_TEST_LOG_LEVEL", "warning"), cache=False)
# `parley run` processes the tests start listen for IM clients on free ports, not the defaults
# (several test sessions share the machine).
os.environ.setdefault("PARLEY_DELIVERY_TCP_ADDR", f"127.0.0.1:{free_port()}")
os.environ.setdefault("PARLEY_DELIVERY_WS_ADDR", f"127.0.0.1:{free_port()}")

# The ``parley`` command as the tests start it.
PARLEY = [sys.executable, "-m", "parley.cli"]
EVENT_WAIT = 10.0
TEST_DEADLINE = 60.0
# An all-in-one stack shuts down in well under a second; one still shutting down after this
# long is waiting on something that will not end by itself.
SHUTDOWN_BOUND = 60.0


def parley_run_argv(http: int, mongo: int, data: Path) -> list[str]:
    """``parley run`` on loopback: its HTTP port, its FerretDB's port and its data directory."""
    return [
        *PARLEY,
        "run",
        "--http-addr",
        f"127.0.0.1:{http}",
        "--data",
        str(data),
        "--embedded-mongo-addr",
        f"127.0.0.1:{mongo}",
    ]


def start_parley_run(
    directory: Path,
    http: int,
    mongo: int,
    name: str = "run",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path, str]:
    """``parley run`` in a subprocess (data in ``directory/data``, output in
    ``directory/<name>.out``), once its banner with the curl line is out (it is printed when the
    port accepts connections): the process, its output file and the banner."""
    out = directory / f"{name}.out"
    with open(out, "wb") as sink:
        process = subprocess.Popen(
            parley_run_argv(http, mongo, directory / "data"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 60
    while "curl" not in (text := out.read_text(errors="replace")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise AssertionError(f"parley run did not start:\n{text}")
        time.sleep(0.1)
    return process, out, text


@pytest.fixture(params=["local", "rabbit"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A bus of each kind on its own (the in-process one, and RabbitMQ on a fresh exchange)."""
    transport: Bus
    if request.param == "local":
        transport = LocalBus()
    else:
        url = request.getfixturevalue("amqp_url")
        transport = RabbitBus(url, exchange=unique("parley.bus-test."), prefetch=8)
    await transport.start()
    yield transport
    await transport.close()


class Sentinel(Event):
    """The tests' marker on the bus: no service binds its routing key, only recorders see it."""

    routing_key: ClassVar[str] = "test.sentinel"
    version: Literal[1] = 1


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="parley-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mongo_url(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("PARLEY_TEST_MONGO_URL"):
        yield url
        return
    addr = f"127.0.0.1:{free_port()}"
    # PARLEY_LOCAL_STORE=postgresql: FerretDB on a private PostgreSQL cluster, as `parley run`.
    postgres = start_postgres(workdir / "postgres") if local_store() == "postgresql" else None
    try:
        process = start_ferretdb(
            workdir / "ferretdb", addr, postgresql_url=postgres.extra["url"] if postgres else None
        )
    except BaseException:
        if postgres is not None:
            postgres.stop()
        raise
    yield f"mongodb://{addr}/"
    process.stop()
    if postgres is not None:
        postgres.stop()


def local_store() -> str:
    """The store the tests' FerretDB keeps its data in: ``PARLEY_LOCAL_STORE``, as Parley."""
    return Settings().local_store


@pytest.fixture(scope="session")
def rabbitmq(workdir: Path) -> Iterator[Process | None]:
    if os.environ.get("PARLEY_TEST_AMQP_URL"):
        yield None
        return
    process = start_rabbitmq(workdir / "rabbitmq", free_port())
    yield process
    process.stop()


@pytest.fixture(scope="session")
def amqp_url(rabbitmq: Process | None) -> str:
    return os.environ.get("PARLEY_TEST_AMQP_URL") or (rabbitmq.extra["url"] if rabbitmq else "")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def basic(appid: int | str, credential: str) -> str:
    return "Basic " + base64.b64encode(f"{appid}:{credential}".encode()).decode()


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@dataclass
class Recorder:
    """Collects the events of one app from a temporary subscription to every routing key."""

    appid: int | None
    pattern: str = "#"
    events: list[Event] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    bus: Bus | None = None
    # Whether the services publish on ``bus`` itself (the all-in-one stacks), so that one
    # queue receives their events and the sentinel in the order they were published.
    shares_the_bus: bool = False
    sentinels: set[str] = field(default_factory=set)

    async def handle(self, event: Event) -> None:
        if isinstance(event, Sentinel):
            self.sentinels.add(event.event_id)
            self.arrived.set()
        elif (self.appid is None or event.appid == self.appid) and topic_matches(
            self.pattern, event.routing_key
        ):
            self.events.append(event)
            self.arrived.set()

    async def wait_for(self, count: int, timeout: float = EVENT_WAIT) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return list(self.events)

    async def settle(self, quiet: float = 0.5) -> list[Event]:
        """Everything received once no new event arrived for ``quiet`` seconds."""
        while True:
            seen = len(self.events)
            await asyncio.sleep(quiet)
            if len(self.events) == seen:
                return list(self.events)

    async def published(self, quiet: float = 0.5, timeout: float = EVENT_WAIT) -> list[Event]:
        """Everything published until now. On a stack whose services publish on the recorder's
        bus, a sentinel event published now arrives after every event published before it (a
        queue keeps its one publisher's order), so once it is here nothing earlier is missing.
        The distributed stack's services publish on connections of their own, with no order
        relative to the sentinel: there, a quiet spell of ``quiet`` seconds (``settle``) it is."""
        if self.bus is None or not self.shares_the_bus:
            return await self.settle(quiet)
        sentinel = Sentinel(appid=self.appid or 0)
        await self.bus.publish_event(sentinel)
        async with asyncio.timeout(timeout):
            while sentinel.event_id not in self.sentinels:
                self.arrived.clear()
                await self.arrived.wait()
        return list(self.events)

    def keys(self) -> list[str]:
        return [e.routing_key for e in self.events]


@dataclass
class App:
    appid: int
    key: str
    secret: str

    @property
    def server_auth(self) -> dict[str, str]:
        return {"Authorization": basic(self.appid, md5_hex(self.secret))}


@dataclass
class Stack:
    mode: str
    base_url: str
    db: Database
    bus: Bus
    settings: Settings
    http: aiohttp.ClientSession
    processes: list[Process] = field(default_factory=list)

    async def new_app(self, name: str = "test", *, announce: bool = True) -> App:
        """A fresh app (its ``app.created`` event published now, or left to the outbox relay
        of the running services when ``announce`` is false, as ``parley app create`` does)."""
        bus = self.bus if announce else None
        creds: AppCredentials = await AuthAdmin(self.db, self.settings, bus).create_app(name)
        return App(creds.appid, creds.key, creds.secret)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One HTTP request through the edge: (status, decoded JSON body or raw text, response)."""
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            text = await resp.text()
            body: Any = text
            if text and resp.content_type == "application/json":
                body = await resp.json()
            return resp.status, body, resp

    async def token(self, app: App, uid: int, name: str = "") -> str:
        status, body, _ = await self.request(
            "POST", "/auth/grant", json={"uid": uid, "user_name": name}, headers=app.server_auth
        )
        assert status == 200, body
        return str(body["data"]["token"])

    async def client(self, app: App, uid: int, name: str = "") -> dict[str, str]:
        """Bearer headers for user ``uid`` of ``app``."""
        return {"Authorization": f"Bearer {await self.token(app, uid, name)}"}

    async def inbox(self, appid: int, owner: str) -> list[dict[str, Any]]:
        """Stored entries of an inbox (``u:<uid>``) or group queue (``g:<gid>``), by key."""
        cursor = self.db["messages_entries"].find({"appid": appid, "owner": owner})
        return await cursor.sort("key", 1).to_list()

    async def wait_inbox(
        self, appid: int, owner: str, count: int, timeout: float = EVENT_WAIT
    ) -> list[dict[str, Any]]:
        """The inbox once it holds at least ``count`` entries (stored by consumers) and every
        message of the app has been announced (so later recorders see none of them)."""
        pending = self.db["messages_pending"]
        async with asyncio.timeout(timeout):
            while len(entries := await self.inbox(appid, owner)) < count:
                await asyncio.sleep(0.05)
            while await pending.count_documents({"appid": appid}):
                await asyncio.sleep(0.05)
        return entries

    @contextlib.asynccontextmanager
    async def recorder(self, appid: int | None, pattern: str = "#") -> AsyncIterator[Recorder]:
        """Events of one app (all apps: None) whose routing key matches the topic ``pattern``."""
        recorder = Recorder(appid, pattern, bus=self.bus, shares_the_bus=self.mode != "distributed")
        subscription = await self.bus.subscribe(
            unique("test.recorder."), ["#"], recorder.handle, durable=False
        )
        try:
            yield recorder
        finally:
            await subscription.cancel()


class ParleyTestServer(TestServer):
    """aiohttp's test server on Parley's runner (``shared/server.py``), as ``parley run``."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ParleyRunner(self.app, **kwargs)


async def _prepared_db(settings: Settings) -> tuple[Any, Database]:
    """A client of the settings' store and its database, with the auth service's indexes."""
    client = make_client(settings.mongo_url, timeout=TEST_DEADLINE)
    db = client[settings.mongo_db]
    await AuthAdmin(db, settings).ensure_indexes()
    return client, db


@contextlib.asynccontextmanager
async def allinone_stack(mode: str, settings: Settings) -> AsyncIterator[Stack]:
    bus: Bus = (
        LocalBus()
        if not settings.amqp_url
        else RabbitBus(
            settings.amqp_url, exchange=settings.amqp_exchange, connection_name="parley-test"
        )
    )
    await bus.start()
    client, db = await _prepared_db(settings)
    app = create_allinone_app(settings, ALL_IN_ONE, deps=Deps(db=db, bus=bus))
    server = ParleyTestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Stack(mode, str(server.make_url("")).rstrip("/"), db, bus, settings, http)
    finally:
        await bounded(server.close(), "the all-in-one server's shutdown")
        await bounded(bus.close(), "the bus's shutdown")
        await client.close()


async def bounded(step: Awaitable[None], what: str, seconds: float = SHUTDOWN_BOUND) -> None:
    """A teardown step that must end. Past ``seconds`` every task's stack is printed (what it
    waits on), the step is cancelled, and the teardown fails, naming the tasks that were still
    being cancelled (a loop that swallowed an earlier cancellation keeps a shutdown waiting
    until it is cancelled again: a bug, see ``shared/loops.py``)."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        return task.result()
    for other in asyncio.all_tasks():
        print(f"--- {other.get_name()}", file=sys.stderr)
        other.print_stack(file=sys.stderr)
    stuck = sorted(
        t.get_name()
        for t in asyncio.all_tasks()
        if t is not task and not t.done() and t.cancelling()
    )
    task.cancel()
    await asyncio.wait({task}, timeout=seconds)
    raise AssertionError(
        f"{what} did not end in {seconds:g} s (tasks still being cancelled:"
        f" {', '.join(stuck) or 'none'})"
    )


@contextlib.asynccontextmanager
async def distributed_stack(
    settings: Settings, workdir: Path, replicas: dict[str, int] | None = None
) -> AsyncIterator[Stack]:
    """Every service as its own ``parley serve`` process (``replicas`` of each, default one)
    behind nginx rendered from the routing table; events through RabbitMQ."""
    settings = settings.model_copy(update={"internal_secret": secrets.token_urlsafe(32)})
    cluster = start_cluster(settings, workdir / unique("distributed-"), replicas)
    try:
        bus = RabbitBus(settings.amqp_url or "", exchange=settings.amqp_exchange)
        await bus.start()
        client, db = await _prepared_db(settings)
        try:
            async with aiohttp.ClientSession() as http:
                stack = Stack("distributed", cluster.edge_url, db, bus, settings, http)
                stack.processes = cluster.processes
                yield stack
        finally:
            await bus.close()
            await client.close()
    finally:
        cluster.stop()


MODES = ["local", "rabbit", "distributed"]

one_mode = pytest.mark.parametrize("stack", ["local"], indirect=True)
"""For a test whose requests are all refused: nothing it does crosses the bus, so the
all-in-one stack (``stack`` in its ``local`` mode) is enough; the modes differ in how events
travel, not in how a request is refused."""


def stack_settings(mongo_url: str, amqp_url: str | None) -> Settings:
    return Settings(
        mongo_url=mongo_url,
        mongo_db=unique("t_"),
        amqp_url=amqp_url,
        amqp_exchange=unique("parley.test."),
        outbox_relay_interval=0.5,
        outbox_grace=1.0,
        # Deadlines for a test machine whose CPUs are shared: slowness is not what these
        # stacks test (tests/test_supervision.py tests the deadlines themselves).
        request_timeout=TEST_DEADLINE,
        mongo_timeout=TEST_DEADLINE,
        # The delivery service's client listeners: ports of each stack's own.
        delivery_tcp_addr=f"127.0.0.1:{free_port()}",
        delivery_ws_addr=f"127.0.0.1:{free_port()}",
    )


@pytest.fixture(scope="session")
async def local_stack(mongo_url: str) -> AsyncIterator[Stack]:
    """The all-in-one stack on the in-process bus, for tests one mode suffices for."""
    async with allinone_stack("local", stack_settings(mongo_url, None)) as built:
        yield built


@pytest.fixture(scope="module")
async def own_stack(mongo_url: str) -> AsyncIterator[Stack]:
    """The all-in-one stack on the in-process bus with a database of its own, for a module
    whose tests count an app's documents before and after (quick in a small database)."""
    async with allinone_stack("local", stack_settings(mongo_url, None)) as built:
        yield built


@pytest.fixture(scope="session")
async def two_replicas(mongo_url: str, amqp_url: str, workdir: Path) -> AsyncIterator[Stack]:
    """The distributed stack with two replicas of every service (one cluster for every module
    that tests replicas racing; started once: a cluster takes seconds to start)."""
    settings = stack_settings(mongo_url, amqp_url)
    async with distributed_stack(settings, workdir, dict.fromkeys(SERVICES, 2)) as built:
        yield built


@pytest.fixture(scope="session", params=MODES)
async def stack(
    request: pytest.FixtureRequest, mongo_url: str, workdir: Path
) -> AsyncIterator[Stack]:
    mode = request.param
    amqp = request.getfixturevalue("amqp_url") if mode != "local" else None
    settings = stack_settings(mongo_url, amqp)
    if mode == "distributed":
        async with distributed_stack(settings, workdir) as built:
            yield built
    else:
        async with allinone_stack(mode, settings) as built:
            yield built
