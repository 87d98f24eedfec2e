"""Data written by the previous storage of the auth and customer services (int-keyed apps,
user and visitor documents updated in place with embedded outboxes, ``$inc`` counters) keeps
working: the services rewrite it at start, once, and serve it."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from typing import Any

from services.auth.admin import AuthAdmin
from services.customer.admin import CustomerAdmin
from shared.bus import LocalBus
from shared.events import AppCreated, TokenGranted
from shared.mongo import Database, make_client

from .conftest import allinone_stack, basic, md5_hex, stack_settings, unique

OLD_TOKEN = "OldToken0123456789abcdefghijAB"
OLD_VISITOR_TOKEN = "OldVisitor0123456789abcdefghij"


def outbox(event: Any) -> dict[str, Any]:
    entry = {"rk": event.routing_key, "body": event.to_json().decode(), "at": event.occurred_at}
    return {"outbox": {event.event_id: {**entry, "rid": ""}}, "outbox_n": 1}


async def write_previous_shape(db: Database, base: int) -> dict[str, Any]:
    """What the previous version stored, field for field."""
    now = datetime.now(UTC)
    announced = AppCreated(appid=2, name="announced-late")
    granted = TokenGranted(appid=1, uid=5, user_name="olduser")
    await db["auth_counters"].insert_one({"_id": "appid", "seq": 2})
    await db["auth_apps"].insert_many(
        [
            {"_id": 1, "name": "old", "key": "k" * 32, "secret": "s" * 32, "store_id": 0,
             "created_at": now, "outbox": {}, "outbox_n": 0},
            {"_id": 2, "name": "announced-late", "key": "K" * 32, "secret": "S" * 32,
             "store_id": 0, "created_at": now, **outbox(announced)},
        ]
    )  # fmt: skip
    await db["auth_users"].insert_many(
        [
            {"_id": "1:5", "appid": 1, "uid": 5, "token": OLD_TOKEN, "name": "olduser",
             "mute": True, "notification_on": False, "dnd_peers": {"9": True}, **outbox(granted)},
            {"_id": f"1:{base + 1}", "appid": 1, "uid": base + 1, "token": OLD_VISITOR_TOKEN,
             "customer": True, "name": "vi", "avatar": "", "outbox": {}, "outbox_n": 0},
        ]
    )  # fmt: skip
    await db["customer_counters"].insert_many(
        [{"_id": "store", "seq": 1}, {"_id": "seller", "seq": 1}, {"_id": "client:1", "seq": 1}]
    )
    await db["customer_stores"].insert_one({"_id": 1, "appid": 1, "name": "desk"})
    await db["customer_agents"].insert_one(
        {"_id": 1, "store_id": 1, "appid": 1, "name": "ann", "status": "online", "status_at": now}
    )
    await db["customer_clients"].insert_one(
        {"_id": "1:old-visitor", "appid": 1, "customer_id": "old-visitor", "client_id": base + 1,
         "outbox": {}, "outbox_n": 0}
    )  # fmt: skip
    await db["customer_assignments"].insert_one(
        {"_id": f"1:{base + 1}", "store_id": 1, "seller_id": 1, "outbox": {}, "outbox_n": 0}
    )
    return {"announced": announced.event_id, "granted": granted.event_id}


def app_key(appid: int, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{appid}:{key}".encode()).decode()}


async def test_data_of_the_previous_shape_keeps_working(mongo_url: str) -> None:
    settings = stack_settings(mongo_url, None).model_copy(update={"outbox_grace": 2.0})
    base = settings.customer_client_id_base
    client = make_client(settings.mongo_url)
    db = client[settings.mongo_db]
    try:
        ids = await write_previous_shape(db, base)
        seen: list[Any] = []
        async with allinone_stack("local", settings) as stack:
            assert isinstance(stack.bus, LocalBus)
            subscription = await stack.bus.subscribe(unique("audit."), ["#"], _append(seen))
            server = {"Authorization": basic(1, md5_hex("s" * 32))}
            # The old user's token is returned (nothing changed: no event) and authenticates.
            status, body, _ = await stack.request(
                "POST", "/auth/grant", json={"uid": 5, "user_name": "olduser"}, headers=server
            )
            assert (status, body) == (200, {"data": {"token": OLD_TOKEN}})
            status, _, _ = await stack.request(
                "GET", "/messages", headers={"Authorization": f"Bearer {OLD_TOKEN}"}
            )
            assert status == 200
            user = await AuthAdmin(stack.db, stack.settings).user(1, 5)
            assert user is not None
            assert (user.name, user.mute, user.notification_on, user.dnd_peers) == (
                "olduser",
                True,
                False,
                frozenset({9}),
            )
            # The other old app's credentials verify too.
            status, _, _ = await stack.request(
                "POST",
                "/auth/grant",
                json={"uid": 6},
                headers={"Authorization": basic(2, md5_hex("S" * 32))},
            )
            assert status == 200
            # The old visitor keeps its client id and token, and its agent.
            status, body, _ = await stack.request(
                "POST",
                "/customer/register",
                json={"appid": 1, "customer_id": "old-visitor", "name": "vi"},
                headers=app_key(1, "k" * 32),
            )
            assert status == 200
            visitor = {"token": OLD_VISITOR_TOKEN, "store_id": 1, "client_id": base + 1}
            assert body["data"] == visitor
            status, body, _ = await stack.request(
                "GET",
                "/supporters?store_id=1",
                headers={"Authorization": f"Bearer {OLD_VISITOR_TOKEN}"},
            )
            agent = {"seller_id": 1, "name": "ann", "status": "online", "avatar": ""}
            assert body == {"data": agent}
            # New ids continue above the old counters.
            status, body, _ = await stack.request(
                "POST",
                "/customer/register",
                json={"appid": 1, "customer_id": "new-visitor"},
                headers=app_key(1, "k" * 32),
            )
            assert status == 200 and body["data"]["client_id"] > base + 1
            customer = CustomerAdmin(stack.db, stack.settings)
            assert await customer.add_agent(1, 1, "bob") > 1
            new_app = await stack.new_app()
            assert new_app.appid > 2
            # Events left in the old outboxes are published by the relay, with their ids.
            async with asyncio.timeout(15):
                while not {ids["announced"], ids["granted"]} <= {e.event_id for e in seen}:
                    await asyncio.sleep(0.1)
            await subscription.cancel()
        # A second start finds the marker and reads nothing old; everything still works.
        assert await AuthAdmin(db, settings).migrate() == {}
        assert await CustomerAdmin(db, settings).migrate() == {}
        async with allinone_stack("local", settings) as stack:
            status, body, _ = await stack.request(
                "POST", "/auth/grant", json={"uid": 5, "user_name": "olduser"}, headers=server
            )
            assert (status, body) == (200, {"data": {"token": OLD_TOKEN}})
    finally:
        await client.drop_database(settings.mongo_db)
        await client.close()


def _append(seen: list[Any]) -> Any:
    async def handle(event: Any) -> None:
        seen.append(event)

    return handle
