"""The customer-service desk over real HTTP through the edge, in every mode: visitor tokens
(S17 ``/auth/customer``, X2 ``/customer/register``), choosing an agent (S18), agent presence
from ``agent.presence`` events, and the customer parts of S19 and S20."""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from services.auth.admin import AuthAdmin
from services.customer.admin import CustomerAdmin
from services.messages.admin import MessagesAdmin
from shared.errors import ParleyError
from shared.events import AgentAdded, AgentPresence, CustomerRegistered, StoreCreated, utcnow

from .conftest import App, Stack, md5_hex
from .test_messages import parley_with

INVALID_APPID = {"meta": {"code": 400, "message": "非法的appid"}}


def app_key(app: App, key: str | None = None) -> dict[str, str]:
    raw = f"{app.appid}:{key if key is not None else app.key}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def desk(stack: Stack, app: App, agents: list[str]) -> tuple[int, list[int]]:
    """A store for the app with these agents (what `parley store ...` does)."""
    customer = CustomerAdmin(stack.db, stack.settings)
    store_id = await customer.create_store(app.appid, "desk")
    return store_id, [await customer.add_agent(app.appid, store_id, name) for name in agents]


async def register(
    stack: Stack, app: App, body: dict[str, Any], path: str = "/customer/register"
) -> tuple[int, Any]:
    status, reply, _ = await stack.request("POST", path, json=body, headers=app_key(app))
    return status, reply


async def test_stores_and_agents_are_announced(stack: Stack) -> None:
    """What `parley store ...` writes gets its event (published by the running customer
    service's relay: the command has no broker)."""
    app, other = await stack.new_app(), await stack.new_app()
    async with stack.recorder(app.appid, "customer.#") as events:
        store_id, (ann,) = await desk(stack, app, ["ann@example.com"])
        received = await events.wait_for(2)
    by_type = {type(e): e for e in received}
    assert len(received) == 2 and set(by_type) == {StoreCreated, AgentAdded}
    created, added = by_type[StoreCreated], by_type[AgentAdded]
    assert isinstance(created, StoreCreated) and isinstance(added, AgentAdded)
    assert (created.appid, created.store_id, created.name) == (app.appid, store_id, "desk")
    assert (added.appid, added.store_id, added.seller_id, added.name) == (
        app.appid,
        store_id,
        ann,
        "ann@example.com",
    )
    # Another app names the store in vain: nothing is added.
    customer = CustomerAdmin(stack.db, stack.settings)
    with pytest.raises(ParleyError, match=f"no store {store_id} of app {other.appid}"):
        await customer.add_agent(other.appid, store_id, "eve")
    store = await customer.store(app.appid, store_id)
    assert store is not None and [a.seller_id for a in store.agents] == [ann]
    assert await customer.store(other.appid, store_id) is None


async def test_register_a_visitor(stack: Stack) -> None:
    app = await stack.new_app()
    store_id, _ = await desk(stack, app, ["ann@example.com"])
    async with stack.recorder(app.appid, "customer.registered") as events:
        status, reply = await register(
            stack, app, {"appid": app.appid, "customer_id": "c-1", "name": "Vi", "avatar": "v.png"}
        )
        assert status == 200
        data = reply["data"]
        assert set(data) == {"token", "store_id", "client_id"}
        assert data["store_id"] == store_id
        assert data["client_id"] > stack.settings.customer_client_id_base  # never an app uid
        (event,) = await events.wait_for(1)
    assert isinstance(event, CustomerRegistered)
    assert (event.customer_id, event.client_id, event.store_id) == (
        "c-1",
        data["client_id"],
        store_id,
    )
    # The same customer id: the same client id and token; name and avatar are replaced.
    status, again = await register(stack, app, {"appid": str(app.appid), "customer_id": "c-1"})
    assert again == reply
    user = await AuthAdmin(stack.db, stack.settings).user(app.appid, data["client_id"])
    assert user is not None and (user.name, user.avatar, user.customer) == ("", "", True)
    # An integer customer id is its decimal string.
    _, seven = await register(stack, app, {"appid": app.appid, "customer_id": 7})
    _, seven_again = await register(stack, app, {"appid": app.appid, "customer_id": "7"})
    assert seven == seven_again
    # No customer id: a new anonymous visitor every time.
    _, first = await register(stack, app, {"appid": app.appid})
    _, second = await register(stack, app, {"appid": app.appid})
    assert first["data"]["client_id"] != second["data"]["client_id"]
    # The visitor's token works on client routes.
    status, _, _ = await stack.request(
        "GET", "/messages", headers={"Authorization": f"Bearer {data['token']}"}
    )
    assert status == 200


async def test_register_refusals(stack: Stack) -> None:
    app, other = await stack.new_app(), await stack.new_app()
    await desk(stack, app, ["ann"])
    cases: list[tuple[dict[str, str], Any, dict[str, Any]]] = [
        ({}, {"appid": app.appid}, INVALID_APPID),
        (app_key(app, md5_hex(app.key)), {"appid": app.appid}, INVALID_APPID),  # the raw key
        (app_key(app), {"appid": other.appid}, INVALID_APPID),  # one app's key, another app
        (
            app_key(other),
            {"appid": other.appid},
            {"meta": {"code": 400, "message": "app do not support customer"}},
        ),
        (app_key(app), {"customer_id": "x"}, {"meta": {"code": 400, "message": "invalid param"}}),
        (
            app_key(app),
            {"appid": app.appid, "name": 5},
            {"meta": {"code": 400, "message": "invalid param"}},
        ),
        (app_key(app), "nope", {"meta": {"code": 400, "message": "invalid param"}}),
    ]
    for headers, body, expected in cases:
        status, reply, _ = await stack.request(
            "POST", "/customer/register", json=body, headers=headers
        )
        assert (status, reply) == (400, expected), body
    status, reply, _ = await stack.request(
        "POST", "/customer/register", data=b"{", headers=app_key(app)
    )
    assert (status, reply) == (400, {"meta": {"code": 400, "message": "json decode error"}})
    assert await CustomerAdmin(stack.db, stack.settings).visitor_count(app.appid) == 0


async def test_auth_customer_without_and_with_credentials(stack: Stack) -> None:
    app = await stack.new_app()
    store_id, _ = await desk(stack, app, ["ann"])
    body = {"appid": app.appid, "customer_id": "web-1"}
    status, reply, _ = await stack.request("POST", "/auth/customer", json=body)
    assert status == 200 and reply["data"]["store_id"] == store_id
    status, again, _ = await stack.request(
        "POST", "/auth/customer", json=body, headers=app_key(app)
    )
    assert again == reply  # the same visitor through either path
    status, _, _ = await stack.request(
        "POST", "/v2/customer/register", json=body, headers=app_key(app)
    )
    assert status == 200
    for headers, payload, expected in (
        (app_key(app, "wrong"), body, INVALID_APPID),
        (app_key(app), {"appid": app.appid + 1000, "customer_id": "x"}, INVALID_APPID),
        ({}, {"appid": 0}, {"meta": {"code": 400, "message": "invalid param"}}),
    ):
        status, reply, _ = await stack.request(
            "POST", "/auth/customer", json=payload, headers=headers
        )
        assert (status, reply) == (400, expected)
    for path in ("/auth/customer", "/customer/register", "/v2/customer/register", "/supporters"):
        status, _, resp = await stack.request("OPTIONS", path)
        assert status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_visitors_and_users_never_share_a_token(stack: Stack) -> None:
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    base = stack.settings.customer_client_id_base
    # An app user already holds the next client id: the visitor gets another one.
    user_token = await stack.token(app, base + 1)
    _, reply = await register(stack, app, {"appid": app.appid, "customer_id": "v"})
    visitor = reply["data"]
    assert visitor["client_id"] != base + 1 and visitor["token"] != user_token
    # And /auth/grant never hands out a visitor's token.
    status, body, _ = await stack.request(
        "POST", "/auth/grant", json={"uid": visitor["client_id"]}, headers=app.server_auth
    )
    assert (status, body) == (400, {"meta": {"code": 400, "message": "invalid param"}})


async def test_concurrent_first_registrations_agree(stack: Stack) -> None:
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    replies = await asyncio.gather(
        *(register(stack, app, {"appid": app.appid, "customer_id": "same"}) for _ in range(10))
    )
    assert {status for status, _ in replies} == {200}
    assert len({(r["data"]["client_id"], r["data"]["token"]) for _, r in replies}) == 1


async def supporter(stack: Stack, token: str, query: str) -> tuple[int, Any]:
    status, reply, _ = await stack.request(
        "GET", f"/supporters?{query}", headers={"Authorization": f"Bearer {token}"}
    )
    return status, reply


async def test_choosing_an_agent(stack: Stack) -> None:
    app, other = await stack.new_app(), await stack.new_app()
    store_id, (ann, bob, cid) = await desk(stack, app, ["ann@example.com", "bob", "cid"])
    other_store, _ = await desk(stack, other, ["zed"])
    _, reply = await register(stack, app, {"appid": app.appid, "customer_id": "v1"})
    token = reply["data"]["token"]
    # Nobody online: the store's first agent; then sticky.
    status, reply = await supporter(stack, token, f"store_id={store_id}")
    assert (status, reply) == (
        200,
        {"data": {"seller_id": ann, "name": "ann", "status": "offline", "avatar": ""}},
    )
    # Presence arrives as agent.presence events (from a delivery server).
    for seller, state in ((bob, "online"), (cid, "online")):
        await stack.bus.publish_event(
            AgentPresence(appid=app.appid, seller_id=seller, status=state)
        )
    customer = CustomerAdmin(stack.db, stack.settings)
    async with asyncio.timeout(10):
        while True:
            store = await customer.store(app.appid, store_id)
            assert store is not None
            if {a.seller_id for a in store.agents if a.status == "online"} >= {bob, cid}:
                break
            await asyncio.sleep(0.05)
    status, reply = await supporter(stack, token, f"store={store_id}")  # `store` is an alias
    assert reply["data"]["seller_id"] == ann  # still the previous agent, though offline
    # A new visitor gets one of the online agents, at random.
    chosen = set()
    for n in range(24):  # both online agents get chosen (all but certainly: 1 - 2**-23)
        _, visitor = await register(stack, app, {"appid": app.appid, "customer_id": f"n{n}"})
        _, reply = await supporter(stack, visitor["data"]["token"], f"store_id={store_id}")
        assert reply["data"]["status"] == "online"
        chosen.add(reply["data"]["seller_id"])
    assert chosen <= {bob, cid} and len(chosen) == 2
    for query, expected in (
        ("", "require store_id param"),
        ("store_id=0", "require store_id param"),
        ("store_id=abc", "require store_id param"),
        (f"store_id={other_store}", "store no supporter"),  # another app's store
        ("store_id=99999999", "store no supporter"),
    ):
        status, reply = await supporter(stack, token, query)
        assert (status, reply) == (400, {"meta": {"code": 400, "message": expected}}), query
    status, reply, resp = await stack.request("GET", f"/v2/supporters?store_id={store_id}")
    assert status == 400 and resp.headers["Access-Control-Allow-Origin"] == "*"


async def agent_status(stack: Stack, app: App, store_id: int, seller: int) -> str:
    store = await CustomerAdmin(stack.db, stack.settings).store(app.appid, store_id)
    assert store is not None
    return next(a.status for a in store.agents if a.seller_id == seller)


async def until_status(stack: Stack, app: App, store_id: int, seller: int, expected: str) -> None:
    async with asyncio.timeout(10):
        while await agent_status(stack, app, store_id, seller) != expected:
            await asyncio.sleep(0.05)


async def test_presence_from_several_delivery_servers(stack: Stack) -> None:
    """Each delivery server reports the agent's connections it holds: the agent is online
    while one of them says so, and a server that stops reporting (crashed) lapses."""
    app, kefu = await stack.new_app(), await stack.new_app("kefu")
    store_id, (ann, bob) = await desk(stack, app, ["ann", "bob"])

    async def report(seller: int, status: str, replica: str, ttl: float = 60.0) -> None:
        await stack.bus.publish_event(
            AgentPresence(
                appid=kefu.appid, seller_id=seller, status=status, replica=replica, ttl=ttl
            )
        )

    await report(ann, "online", "replica-a")
    await report(ann, "online", "replica-b")
    await until_status(stack, app, store_id, ann, "online")
    await report(ann, "offline", "replica-a")
    customer = CustomerAdmin(stack.db, stack.settings)
    async with asyncio.timeout(10):  # until replica-a's offline is recorded
        while True:
            store = await customer.store(app.appid, store_id)
            assert store is not None
            if store.agents[0].replicas.get("replica-a", (None, True))[1] is False:
                break
            await asyncio.sleep(0.05)
    assert store.agents[0].status == "online"  # replica-b still says so
    await report(ann, "offline", "replica-b")
    await until_status(stack, app, store_id, ann, "offline")
    # A report older than what the same server said last changes nothing.
    stale = AgentPresence(
        appid=kefu.appid,
        seller_id=ann,
        status="online",
        replica="replica-b",
        ttl=60.0,
        occurred_at=utcnow() - timedelta(seconds=5),
    )
    await stack.bus.publish_event(stale)
    await report(bob, "online", "replica-a")
    await until_status(stack, app, store_id, bob, "online")
    await asyncio.sleep(0.5)  # the stale report, published before bob's, has been consumed
    assert await agent_status(stack, app, store_id, ann) == "offline"
    # A server that stops re-announcing: its reports lapse after their ttl.
    await report(ann, "online", "replica-c", ttl=4.0)
    await until_status(stack, app, store_id, ann, "online")
    await until_status(stack, app, store_id, ann, "offline")
    await report(bob, "offline", "replica-a")
    await until_status(stack, app, store_id, bob, "offline")
    # Nobody online: the store's first agent, ann, whose lapsed status S18 reports too.
    _, reply = await register(stack, app, {"appid": app.appid, "customer_id": "v-lapse"})
    _, chosen = await supporter(stack, reply["data"]["token"], f"store_id={store_id}")
    assert (chosen["data"]["seller_id"], chosen["data"]["status"]) == (ann, "offline")


async def test_offline_count_by_customer_id(stack: Stack) -> None:
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    _, reply = await register(stack, app, {"appid": app.appid, "customer_id": "vip"})
    client_id = reply["data"]["client_id"]
    await stack.request(
        "POST",
        "/messages/systems",
        json={"receiver": client_id, "content": "welcome"},
        headers=app.server_auth,
    )
    for query, expected in (
        ("customer_id=vip", {"data": {"count": 1, "new": 1}}),
        ("customer_id=nobody", {"meta": {"code": 400, "message": "invalid uid"}}),
    ):
        status, reply, _ = await stack.request(
            "GET", f"/messages/offline?{query}", headers=app.server_auth
        )
        assert reply == expected, query
    token = (await register(stack, app, {"appid": app.appid, "customer_id": "vip"}))[1]["data"][
        "token"
    ]
    # The visitor's own badge, with no parameters.
    status, reply, _ = await stack.request(
        "GET", "/messages/offline", headers={"Authorization": f"Bearer {token}"}
    )
    assert (status, reply) == (
        200,
        {"data": {"count": 1, "new": 1}},
    )  # the visitor's own badge, no parameters


async def test_history_of_a_store(local_stack: Stack) -> None:
    """``GET /messages?store=`` keeps the customer-service messages (cmd 64) exchanged with
    that store's agents; they are stored as a delivery server posts them."""
    stack = local_stack
    host, kefu = await stack.new_app("host"), await stack.new_app("kefu")
    store_id, (ann,) = await desk(stack, host, ["ann"])
    other_store, (zed,) = await desk(stack, await stack.new_app("other"), ["zed"])
    _, reply = await register(stack, host, {"appid": host.appid, "customer_id": "v"})
    visitor, token = reply["data"]["client_id"], reply["data"]["token"]
    messages = MessagesAdmin(stack.db, stack.settings, stack.bus)
    await messages.post_customer(host.appid, visitor, kefu.appid, ann, "hello ann")
    await messages.post_customer(kefu.appid, ann, host.appid, visitor, "hi, ann here")
    await messages.post_customer(host.appid, visitor, kefu.appid, zed, "to zed")
    await messages.post_peer(host.appid, 1, visitor, "a peer message")
    async with parley_with(stack, kefu_appid=kefu.appid) as base, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{base}/messages?store={store_id}", headers=headers) as resp:
            items = (await resp.json())["data"]
        assert [(i["command"], i["content"]) for i in items] == [
            (64, "hello ann"),
            (64, "hi, ann here"),
        ]
        assert (items[0]["sender_appid"], items[0]["receiver_appid"]) == (host.appid, kefu.appid)
        async with http.get(f"{base}/messages", headers=headers) as resp:
            everything = (await resp.json())["data"]
        assert len(everything) == 4
    # The agent's side is stored in the customer-service app's inbox.
    agent_inbox = await stack.inbox(kefu.appid, f"u:{ann}")
    assert [e["content"] for e in agent_inbox] == ["hello ann", "hi, ann here"]
    assert other_store != store_id
