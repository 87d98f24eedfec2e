"""Concurrency loses nothing in the auth and customer services on the local store, which has
no atomic update: concurrent first grants, setting changes and grants on one user, visitor
registrations and app creations, all-in-one and with two replicas of auth and customer."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from services.auth.admin import AuthAdmin
from services.customer.admin import CustomerAdmin
from shared.events import CustomerRegistered, TokenGranted, UserSettingsChanged

from .conftest import App, Stack, md5_hex

REGISTRATIONS = 400
CLIENTS = 32
CHANGES = 40


@pytest.fixture(params=["local", "two-replicas"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    name = "local_stack" if request.param == "local" else "two_replicas"
    stack: Stack = request.getfixturevalue(name)
    return stack


async def post(stack: Stack, app: App, path: str, body: Any) -> tuple[int, Any]:
    status, reply, _ = await stack.request("POST", path, json=body, headers=app.server_auth)
    return status, reply


async def test_concurrent_first_grants_return_one_token(any_stack: Stack) -> None:
    stack = any_stack
    app = await stack.new_app()
    async with stack.recorder(app.appid, "token.granted") as events:
        answers = await asyncio.gather(
            *(post(stack, app, "/auth/grant", {"uid": 42, "user_name": "x"}) for _ in range(20))
        )
        assert {status for status, _ in answers} == {200}
        tokens = {reply["data"]["token"] for _, reply in answers}
        assert len(tokens) == 1
        # Every returned token authenticates at once.
        (token,) = tokens
        status, _, _ = await stack.request(
            "GET", "/messages", headers={"Authorization": f"Bearer {token}"}
        )
        assert status == 200
        # One grant created the token; the others changed nothing and published nothing.
        assert len({e.event_id for e in await events.published()}) == 1
    user = await AuthAdmin(stack.db, stack.settings).user(app.appid, 42)
    assert user is not None and user.token == token


async def test_concurrent_changes_of_one_user_lose_nothing(any_stack: Stack) -> None:
    """Grants with names, mute, forbidden and do-not-disturb peers, all at once on one user:
    every peer added stays, each field ends at a value a request set, a field no request
    touched keeps its value, and every acknowledged change has its event."""
    stack = any_stack
    app = await stack.new_app()
    uid = 7
    token = await stack.token(app, uid, "start")
    status, _ = await post(stack, app, f"/users/{uid}", {"forbidden": True})
    assert status == 200
    names = [f"n{i}" for i in range(CHANGES // 4)]
    peers = list(range(1000, 1000 + CHANGES // 2))
    mutes = [i % 2 == 0 for i in range(CHANGES // 4)]
    requests = (
        [post(stack, app, "/auth/grant", {"uid": uid, "user_name": n}) for n in names]
        + [
            post(stack, app, f"/users/{uid}", {"do_not_disturb": {"peer_uid": p, "on": True}})
            for p in peers
        ]
        + [post(stack, app, f"/users/{uid}", {"mute": m}) for m in mutes]
    )
    async with stack.recorder(app.appid) as events:
        answers = await asyncio.gather(*requests)
        assert [status for status, _ in answers] == [200] * len(requests)
        assert {r["data"]["token"] for _, r in answers[: len(names)]} == {token}
        expected = len(names) + len(peers) + len(mutes)
        await events.wait_for(expected, timeout=30)
        # The relay may publish a change again, the earlier ``forbidden`` one included
        # (consumers deduplicate by event id).
        received = [
            e
            for e in {e.event_id: e for e in await events.published()}.values()
            if not (isinstance(e, UserSettingsChanged) and e.forbidden is not None)
        ]
        assert len(received) == expected, [e.model_dump(mode="json") for e in received]
    granted = [e for e in received if isinstance(e, TokenGranted)]
    changed = [e for e in received if isinstance(e, UserSettingsChanged)]
    assert sorted(e.user_name for e in granted) == sorted(names)
    assert sorted(e.do_not_disturb.peer_uid for e in changed if e.do_not_disturb) == peers
    assert sorted(e.mute for e in changed if e.mute is not None) == sorted(mutes)
    user = await AuthAdmin(stack.db, stack.settings).user(app.appid, uid)
    assert user is not None
    assert user.dnd_peers == set(peers)  # no concurrent addition lost
    assert user.name in names and user.mute in mutes
    assert user.notification_on is (not user.mute)
    assert user.forbidden is True and user.token == token  # untouched fields never revert
    status, _, _ = await stack.request(
        "GET", "/messages", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200


def app_key(app: App) -> dict[str, str]:
    raw = f"{app.appid}:{app.key}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def test_concurrent_registrations_get_distinct_client_ids(any_stack: Stack) -> None:
    stack = any_stack
    app = await stack.new_app()
    customer = CustomerAdmin(stack.db, stack.settings)
    store_id = await customer.create_store(app.appid, "desk")
    await customer.add_agent(app.appid, store_id, "ann")
    pending = list(range(REGISTRATIONS))
    answers: list[tuple[int, Any]] = []

    async def client() -> None:
        while pending:
            n = pending.pop()
            body: dict[str, Any] = {"appid": app.appid}
            if n % 2:
                body["customer_id"] = f"c{n}"  # half named, half anonymous
            status, reply, _ = await stack.request(
                "POST", "/customer/register", json=body, headers=app_key(app)
            )
            answers.append((status, reply))

    async with stack.recorder(app.appid, "customer.registered") as events:
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        await events.wait_for(REGISTRATIONS, timeout=60)
        registered = list({e.event_id: e for e in await events.published()}.values())
    refused = [(status, reply) for status, reply in answers if status != 200]
    assert not refused, refused
    client_ids = [reply["data"]["client_id"] for _, reply in answers]
    assert len(set(client_ids)) == REGISTRATIONS
    assert len({reply["data"]["token"] for _, reply in answers}) == REGISTRATIONS
    assert min(client_ids) > stack.settings.customer_client_id_base
    assert sorted(e.client_id for e in registered if isinstance(e, CustomerRegistered)) == sorted(
        client_ids
    )


async def test_concurrent_app_creations_get_distinct_appids(any_stack: Stack) -> None:
    """Apps are created by management commands; several at once, as from several processes
    (each with its own repository), get distinct appids whose credentials verify."""
    stack = any_stack
    domains = [AuthAdmin(stack.db, stack.settings) for _ in range(4)]
    created = await asyncio.gather(*(d.create_app(f"a{n}") for n in range(5) for d in domains))
    appids = [c.appid for c in created]
    assert len(set(appids)) == len(created)
    for creds in created[:3]:
        status, body, _ = await stack.request(
            "POST",
            "/auth/grant",
            json={"uid": 1},
            headers={"Authorization": f"Basic {_basic(creds.appid, md5_hex(creds.secret))}"},
        )
        assert status == 200, body


def _basic(appid: int, credential: str) -> str:
    return base64.b64encode(f"{appid}:{credential}".encode()).decode()
