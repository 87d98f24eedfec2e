"""The customer-service desk: stores, agents (sellers), visitors' client ids, agent presence,
and choosing an agent for a visitor (spec §7). Collections:

* ``customer_stores``: ``{_id: store_id, appid, name}``, at most one store per app;
* ``customer_agents``: ``{_id: seller_id, store_id, appid, name, status, status_at}``;
* ``customer_clients``: ``{_id: "<appid>:<customer_id>", client_id}`` (and one document per
  anonymous visitor), the stable mapping from a host app's customer id to an IM uid;
* ``customer_assignments``: ``{_id: "<appid>:<uid>", store_id, seller_id}``, the sticky agent;
* ``customer_counters``: ids.

Client ids are ``PARLEY_CUSTOMER_CLIENT_ID_BASE`` + a per-app counter, and the auth service
refuses to make a customer of a uid that is an ordinary user, so a visitor never receives an
app user's token and ``/auth/grant`` never returns a visitor's.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pymongo import IndexModel
from pymongo.errors import DuplicateKeyError

from shared.bus import Bus
from shared.errors import APP_NO_CUSTOMER, STORE_NO_SUPPORTER, ParleyError
from shared.events import AgentPresence, CustomerRegistered, Event, SupporterAssigned, utcnow
from shared.internal import CustomerDirectory, TokenIssuer, UidTaken
from shared.mongo import Collection, Database, Document, next_sequence
from shared.outbox import OUTBOX_INDEX, deliver, new_with_outbox, with_outbox
from shared.settings import Settings

STORES = "customer_stores"
AGENTS = "customer_agents"
CLIENTS = "customer_clients"
ASSIGNMENTS = "customer_assignments"
COUNTERS = "customer_counters"

INDEXES: dict[str, list[IndexModel]] = {
    STORES: [IndexModel([("appid", 1)], unique=True, name="one_store_per_app"), OUTBOX_INDEX],
    AGENTS: [IndexModel([("store_id", 1)], name="store"), OUTBOX_INDEX],
    CLIENTS: [OUTBOX_INDEX],
    ASSIGNMENTS: [OUTBOX_INDEX],
    COUNTERS: [],
}


@dataclass(frozen=True)
class Registration:
    token: str
    store_id: int
    client_id: int


@dataclass(frozen=True)
class Supporter:
    seller_id: int
    name: str
    status: str


class CustomerDomain:
    def __init__(
        self, db: Database, bus: Bus | None, settings: Settings, tokens: TokenIssuer | None
    ) -> None:
        self.stores: Collection = db[STORES]
        self.agents: Collection = db[AGENTS]
        self.clients: Collection = db[CLIENTS]
        self.assignments: Collection = db[ASSIGNMENTS]
        self.counters: Collection = db[COUNTERS]
        self.bus = bus
        self.settings = settings
        self.tokens = tokens

    def outbox_collections(self) -> list[Collection]:
        return [self.stores, self.agents, self.clients, self.assignments]

    async def _next(self, name: str) -> int:
        return await next_sequence(self.counters, name)

    # ---- stores and agents (management) ----

    async def create_store(self, appid: int, name: str) -> int:
        store_id = await self._next("store")
        try:
            await self.stores.insert_one(
                {"_id": store_id, "appid": appid, "name": name, "created_at": utcnow()}
            )
        except DuplicateKeyError:
            raise ParleyError(f"app {appid} already has a store") from None
        return store_id

    async def add_agent(self, store_id: int, name: str) -> int:
        store = await self.stores.find_one({"_id": store_id})
        if store is None:
            raise ParleyError(f"no store {store_id}")
        seller_id = await self._next("seller")
        await self.agents.insert_one(
            {
                "_id": seller_id,
                "store_id": store_id,
                "appid": store["appid"],
                "name": name,
                "status": "offline",
            }
        )
        return seller_id

    async def set_presence(
        self, seller_id: int, status: Literal["online", "offline"], at: datetime | None = None
    ) -> bool:
        """Record an agent's status unless a newer one is known; False for an unknown agent."""
        agent = await self.agents.find_one({"_id": seller_id}, {"appid": 1})
        if agent is None:
            return False
        at = at or utcnow()
        event = AgentPresence(appid=agent["appid"], seller_id=seller_id, status=status)
        result = await self.agents.update_one(
            {
                "_id": seller_id,
                "$or": [{"status_at": {"$lt": at}}, {"status_at": {"$exists": False}}],
            },
            with_outbox({"$set": {"status": status, "status_at": at}}, [event]),
        )
        if result.modified_count:
            await deliver(self.agents, seller_id, [event], self.bus)
        return True

    async def on_presence_event(self, event: Event) -> None:
        """``agent.presence`` from a delivery server (replays and stale ones change nothing)."""
        if isinstance(event, AgentPresence):
            agent = await self.agents.find_one({"_id": event.seller_id}, {"appid": 1})
            if agent is not None and agent["appid"] == event.appid:
                await self.agents.update_one(
                    {
                        "_id": event.seller_id,
                        "$or": [
                            {"status_at": {"$lt": event.occurred_at}},
                            {"status_at": {"$exists": False}},
                        ],
                    },
                    {"$set": {"status": event.status, "status_at": event.occurred_at}},
                )

    # ---- visitors ----

    async def store_of(self, appid: int) -> int:
        store = await self.stores.find_one({"appid": appid}, {"_id": 1})
        if store is None:
            raise ParleyError(APP_NO_CUSTOMER)
        return int(store["_id"])

    async def _new_client_id(self, appid: int) -> int:
        return self.settings.customer_client_id_base + await self._next(f"client:{appid}")

    async def register(
        self,
        appid: int,
        customer_id: str | None,
        name: str | None,
        avatar: str | None,
        rid: str = "",
    ) -> Registration:
        """S17/X2: the same ``customer_id`` always gets the same client id and token; no
        ``customer_id`` is a new anonymous visitor every time. A name or avatar of None keeps
        the stored one."""
        if self.tokens is None:
            raise RuntimeError("customer registration needs the auth service")
        store_id = await self.store_of(appid)
        for _ in range(10):
            client_id, doc_id = await self._client_for(appid, customer_id, store_id, rid)
            try:
                token = await self.tokens.customer_token(appid, client_id, name, avatar)
            except UidTaken:
                # The number is an app user's uid: move this visitor to a fresh id.
                fresh = await self._new_client_id(appid)
                await self.clients.update_one(
                    {"_id": doc_id, "client_id": client_id}, {"$set": {"client_id": fresh}}
                )
                continue
            return Registration(token, store_id, client_id)
        raise ParleyError("no client id available", status=503)

    async def _client_for(
        self, appid: int, customer_id: str | None, store_id: int, rid: str
    ) -> tuple[int, str]:
        if customer_id:
            doc_id = f"{appid}:{customer_id}"
            existing = await self.clients.find_one({"_id": doc_id}, {"client_id": 1})
            if existing is not None:
                return int(existing["client_id"]), doc_id
        client_id = await self._new_client_id(appid)
        doc_id = f"{appid}:{customer_id}" if customer_id else f"{appid}#{client_id}"
        event = CustomerRegistered(
            appid=appid, customer_id=customer_id or None, client_id=client_id, store_id=store_id
        )
        doc = {"appid": appid, "customer_id": customer_id or None, "client_id": client_id}
        try:
            await self.clients.insert_one(new_with_outbox({"_id": doc_id, **doc}, [event], rid))
        except DuplicateKeyError:  # a concurrent first registration won: use its id
            winner = await self.clients.find_one({"_id": doc_id}, {"client_id": 1})
            assert winner is not None
            return int(winner["client_id"]), doc_id
        await deliver(self.clients, doc_id, [event], self.bus, rid)
        return client_id, doc_id

    # ---- choosing an agent ----

    async def sellers(self, appid: int, store_id: int) -> list[Document]:
        store = await self.stores.find_one({"_id": store_id, "appid": appid}, {"_id": 1})
        if store is None:
            return []
        return (
            await self.agents.find({"store_id": store_id}, {"outbox": 0}).sort("_id", 1).to_list()
        )

    async def supporter(self, appid: int, uid: int, store_id: int, rid: str = "") -> Supporter:
        """S18: the visitor's previous agent of this store if still there (even offline), else
        a random online agent, else the store's first agent; the choice is remembered."""
        sellers = await self.sellers(appid, store_id)
        if not sellers:
            raise ParleyError(STORE_NO_SUPPORTER)
        by_id = {int(s["_id"]): s for s in sellers}
        key = f"{appid}:{uid}"
        previous = await self.assignments.find_one({"_id": key}, {"outbox": 0})
        if previous and previous["store_id"] == store_id and previous["seller_id"] in by_id:
            chosen = by_id[previous["seller_id"]]
        else:
            online = [s for s in sellers if s.get("status") == "online"]
            chosen = random.choice(online) if online else sellers[0]
            event = SupporterAssigned(
                appid=appid, uid=uid, store_id=store_id, seller_id=int(chosen["_id"])
            )
            with contextlib.suppress(DuplicateKeyError):  # concurrent choice: last one wins
                await self.assignments.update_one(
                    {"_id": key},
                    with_outbox(
                        {"$set": {"store_id": store_id, "seller_id": int(chosen["_id"])}},
                        [event],
                        rid,
                    ),
                    upsert=True,
                )
                await deliver(self.assignments, key, [event], self.bus, rid)
        return Supporter(
            int(chosen["_id"]),
            str(chosen.get("name", "")).split("@", 1)[0],
            str(chosen.get("status", "offline")),
        )


class LocalCustomerDirectory(CustomerDirectory):
    def __init__(self, domain: CustomerDomain) -> None:
        self._domain = domain

    async def client_id(self, appid: int, customer_id: str) -> int | None:
        doc = await self._domain.clients.find_one({"_id": f"{appid}:{customer_id}"})
        return int(doc["client_id"]) if doc else None

    async def store_sellers(self, appid: int, store_id: int) -> list[int]:
        return [int(s["_id"]) for s in await self._domain.sellers(appid, store_id)]
