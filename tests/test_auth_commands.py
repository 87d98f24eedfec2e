"""Store commands per request of the auth and customer services, counted by command monitoring
on the all-in-one stack's own MongoDB client, so a regression fails: how many, and that each
is a lookup, insert or delete by a string ``_id`` (the one filter the local store answers
without reading the whole collection)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pymongo import AsyncMongoClient, monitoring

from parley.allinone import create_allinone_app
from parley.servers import free_port
from services.customer.admin import CustomerAdmin
from shared.bus import LocalBus
from shared.mongo import Document
from shared.web import Deps

from .conftest import Stack, basic, stack_settings
from .probes import by_id_alone

PREFIXES = ("auth_", "customer_")


@dataclass
class Counter(monitoring.CommandListener):
    """The auth and customer commands a client sends (name, collection, filters)."""

    commands: list[tuple[str, str, list[Any]]] = field(default_factory=list)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = str(event.command.get(event.command_name, ""))
        if not collection.startswith(PREFIXES):
            return
        cmd = event.command
        filters: list[Any] = []
        if event.command_name == "find":
            filters = [cmd.get("filter")]
        elif event.command_name == "delete":
            filters = [d["q"] for d in cmd.get("deletes", [])]
        elif event.command_name == "update":
            filters = [u["q"] for u in cmd.get("updates", [])]
        self.commands.append((event.command_name, collection, filters))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None: ...

    def failed(self, event: monitoring.CommandFailedEvent) -> None: ...

    @contextlib.contextmanager
    def during(self) -> Iterator[list[tuple[str, str, list[Any]]]]:
        start = len(self.commands)
        window: list[tuple[str, str, list[Any]]] = []
        yield window
        window.extend(self.commands[start:])


def by_string_id(command: tuple[str, str, list[Any]]) -> bool:
    name, _, filters = command
    if name == "insert":
        return True
    return bool(filters) and all(isinstance(f, dict) and by_id_alone(f) for f in filters)


@pytest.fixture(scope="module")
async def counted(mongo_url: str) -> AsyncIterator[tuple[Stack, Counter]]:
    settings = stack_settings(mongo_url, None).model_copy(
        update={"outbox_relay_interval": 3600.0}  # no background pass during the counts
    )
    counter = Counter()
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongo_url, w=1, journal=True, tz_aware=True, event_listeners=[counter]
    )
    db = client[settings.mongo_db]
    bus = LocalBus()
    await bus.start()
    app = create_allinone_app(settings, deps=Deps(db=db, bus=bus))
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            yield Stack("local", url, db, bus, settings, http), counter
    finally:
        await server.close()
        await bus.close()
        await client.drop_database(settings.mongo_db)
        await client.close()


async def test_commands_per_request(counted: tuple[Stack, Counter]) -> None:
    stack, counter = counted
    app = await stack.new_app()
    customer = CustomerAdmin(stack.db, stack.settings)
    store_id = await customer.create_store(app.appid, "desk")
    await customer.add_agent(app.appid, store_id, "ann")
    await stack.token(app, 1, "warm")  # the app's credentials are now known to the process

    async def count(method: str, path: str, body: Any, headers: dict[str, str]) -> list[Any]:
        with counter.during() as window:
            status, reply, _ = await stack.request(method, path, json=body, headers=headers)
            assert status == 200, reply
        assert all(by_string_id(c) for c in window), window
        return window

    server = app.server_auth

    async def grant(name: str) -> list[Any]:
        return await count("POST", "/auth/grant", {"uid": 2, "user_name": name}, server)

    counts = {
        "grant, new user": await grant("a"),
        "grant, unchanged": await grant("a"),
        "grant, new name": await grant("b"),
        "POST /users/{uid}": await count("POST", "/users/2", {"mute": True}, server),
    }
    token = await stack.token(app, 3, "c")
    counts["Bearer request"] = await count(
        "GET", "/messages", None, {"Authorization": f"Bearer {token}"}
    )
    key = {"Authorization": basic(app.appid, app.key)}
    first = {"appid": app.appid, "customer_id": "u"}
    await count("POST", "/customer/register", first, key)  # the app's store and a block of ids
    register = {"appid": app.appid, "customer_id": "v", "name": "vi"}
    counts["register, new visitor"] = await count("POST", "/customer/register", register, key)
    counts["register, again"] = await count("POST", "/customer/register", register, key)
    anonymous = {"appid": app.appid}
    counts["register, anonymous"] = await count("POST", "/customer/register", anonymous, key)
    print({name: len(window) for name, window in counts.items()})
    limits = {
        "grant, new user": 6,
        "grant, unchanged": 1,
        "grant, new name": 3,
        "POST /users/{uid}": 3,
        "Bearer request": 1,
        "register, new visitor": 11,
        "register, again": 1,
        "register, anonymous": 9,
    }
    for name, window in counts.items():
        print(name, len(window), [(c[0], c[1]) for c in window])
    # And the local store answers each such lookup without reading the collection.
    finds = {c[1] for w in counts.values() for c in w if c[0] == "find"}
    for collection in sorted(finds & set(await stack.db.list_collection_names())):
        plan = await stack.db.command("explain", {"find": collection, "filter": {"_id": "x:1"}})
        if "filterPushdown" in plan:  # FerretDB; MongoDB answers by the _id index
            assert plan["filterPushdown"] is True, (collection, plan)
    over = {name: w for name, w in counts.items() if len(w) > limits[name]}
    assert not over, over
