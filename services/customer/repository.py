"""The customer service's storage: every read and write is a lookup or an insert by a string
``_id`` (``shared/revlog.py``, ``shared/idblocks.py``).

* ``customer_desk_revs|heads|pending``: each store is a log keyed ``"<store_id>"``; deltas
  ``{op: "create", s}``, ``{op: "agent", id, name}`` (an agent joins),
  ``{op: "presence", id, status, at, r}``, ``{op: "drop"}``, ``{op: "claimed"}`` (the app's
  claim is held: the revision that announces the store); the state is ``{appid, name,
  agents: {"<seller_id>": [name, status, status_at, replicas]}}``, ``replicas`` the latest
  report of each delivery server about the agent, ``{"<replica>": [at, online]}`` (``r``; left
  out by a presence call, which clears them).
* ``customer_replicas``: ``{_id: "<replica>", until}``, when a delivery server's reports
  lapse (it re-announces before then while it runs).
* ``customer_keys``: insert-only claims: ``{_id: "app:<appid>", store_id}`` (one store per
  app: the first insert wins) and ``{_id: "seller:<seller_id>", store_id}``. They never
  change, so a process keeps what it has read.
* ``customer_visitor_revs|heads|pending``: each visitor is a log keyed
  ``"<appid>:<customer_id>"`` (``"<appid>#<first client id>"`` for an anonymous one); its
  state ``{client_id, customer_id}``. Revision 1 carries ``customer.registered``; a later
  revision moves the visitor to another client id when the number is an app user's uid.
* ``customer_assign_revs|heads|pending``: the sticky agent of each visitor, keyed
  ``"<appid>:<uid>"``, state ``{store_id, seller_id}``, each choice carrying
  ``customer.supporter.assigned``.
* ``customer_counters``: id blocks for stores, sellers and each app's client ids (its
  ``{_id: <name>, seq}`` documents are the previous ``$inc`` counters); ``{_id:
  "migrated:customer"}`` marks the migration below as done.
* ``customer_stores``, ``customer_agents``, ``customer_clients``, ``customer_assignments``: the
  previous shape, read once by ``migrate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pymongo import IndexModel
from pymongo.errors import DuplicateKeyError

from shared.bus import Bus
from shared.events import Event, utcnow
from shared.idblocks import IdBlocks
from shared.legacy import insert_new, outbox_events, write_first_revisions
from shared.mongo import Collection, Database, Document, by_ids
from shared.revlog import Compute, RevLog, Versioned

DESKS = "customer_desk"
VISITORS = "customer_visitor"
ASSIGNMENTS = "customer_assign"
KEYS = "customer_keys"
REPLICAS = "customer_replicas"
COUNTERS = "customer_counters"
LEGACY_STORES = "customer_stores"
LEGACY_AGENTS = "customer_agents"
LEGACY_CLIENTS = "customer_clients"
LEGACY_ASSIGNMENTS = "customer_assignments"
MIGRATED = "migrated:customer"
CLIENT_ID_BLOCK = 32

INDEXES: dict[str, list[IndexModel]] = {}


class Agent(BaseModel):
    model_config = ConfigDict(frozen=True)

    seller_id: int
    name: str
    status: str = "offline"
    status_at: datetime | None = None
    # The latest report of each delivery server: its time, and whether the agent is connected.
    replicas: dict[str, tuple[datetime, bool]] = {}


class Store(BaseModel):
    model_config = ConfigDict(frozen=True)

    store_id: int
    appid: int
    name: str
    agents: list[Agent]  # by seller id


class Visitor(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    client_id: int
    customer_id: str | None


class Assignment(BaseModel):
    model_config = ConfigDict(frozen=True)

    store_id: int
    seller_id: int


def fold_desk(state: Document | None, delta: Document) -> Document | None:
    op = delta["op"]
    if op == "create":
        return dict(delta["s"])
    if state is None or op == "drop":
        return None
    if op == "claimed":
        return state
    agents = dict(state["agents"])
    key = str(delta["id"])
    if op == "agent":
        agents.setdefault(key, [delta["name"], "offline", None])
    elif op == "presence" and key in agents:
        agents[key] = [agents[key][0], delta["status"], delta["at"], delta.get("r", {})]
    return {**state, "agents": agents}


def fold_fields(state: Document | None, delta: Document) -> Document:
    return {**(state or {}), **delta["f"]}


def to_store(store_id: int, state: Document | None) -> Store | None:
    if state is None:
        return None
    agents = [
        Agent(
            seller_id=int(sid),
            name=entry[0],
            status=entry[1],
            status_at=entry[2],
            replicas={r: (at, online) for r, (at, online) in (entry[3:4] or [{}])[0].items()},
        )
        for sid, entry in state["agents"].items()
    ]
    return Store(
        store_id=store_id,
        appid=state["appid"],
        name=state.get("name", ""),
        agents=sorted(agents, key=lambda a: a.seller_id),
    )


def visitor_key(appid: int, customer_id: str | None, client_id: int = 0) -> str:
    return f"{appid}:{customer_id}" if customer_id else f"{appid}#{client_id}"


class CustomerRepository:
    def __init__(self, db: Database, client_id_base: int) -> None:
        self.db = db
        self.desks = RevLog(db, DESKS, fold_desk)
        self.visitors = RevLog(db, VISITORS, fold_fields)
        self.assignments = RevLog(db, ASSIGNMENTS, fold_fields)
        self.keys: Collection = db[KEYS]
        self.counters: Collection = db[COUNTERS]
        self.replicas: Collection = db[REPLICAS]
        self._client_id_base = client_id_base
        self._store_ids = IdBlocks(self.counters, "store", size=1)
        self._seller_ids = IdBlocks(self.counters, "seller", size=1)
        self._client_ids: dict[int, IdBlocks] = {}
        self._claims: dict[str, int] = {}

    def revlogs(self) -> list[RevLog]:
        return [self.desks, self.visitors, self.assignments]

    # ---- ids ----

    async def next_store_id(self) -> int:
        return await self._store_ids.next_id()

    async def next_seller_id(self) -> int:
        return await self._seller_ids.next_id()

    async def next_client_id(self, appid: int) -> int:
        """A client id no other visitor of the app gets (above ``client_id_base``)."""
        blocks = self._client_ids.get(appid)
        if blocks is None:
            blocks = IdBlocks(
                self.counters, f"client:{appid}", size=CLIENT_ID_BLOCK, start=self._client_id_base
            )
            self._client_ids[appid] = blocks
        return await blocks.next_id()

    # ---- claims (insert-only: a process keeps what it has read) ----

    async def _claim(self, name: str, store_id: int) -> bool:
        """Insert the claim ``name`` -> ``store_id``; False when someone holds it."""
        try:
            await self.keys.insert_one({"_id": name, "store_id": store_id})
        except DuplicateKeyError:
            return False
        self._claims[name] = store_id
        return True

    async def _claimed(self, name: str) -> int | None:
        """The store a claim names (a lookup the first time this process asks)."""
        known = self._claims.get(name)
        if known is not None:
            return known
        doc = await self.keys.find_one({"_id": name})
        if doc is None:
            return None
        self._claims[name] = int(doc["store_id"])
        return self._claims[name]

    async def claim_app_store(self, appid: int, store_id: int) -> bool:
        """Make ``store_id`` the app's store; False when the app has one (the first wins)."""
        return await self._claim(f"app:{appid}", store_id)

    async def app_store(self, appid: int) -> int | None:
        return await self._claimed(f"app:{appid}")

    async def claim_seller(self, seller_id: int, store_id: int) -> bool:
        """Record the store of a new seller (seller ids, like store ids, are global numbers:
        a seller is a user of the customer-service app)."""
        return await self._claim(f"seller:{seller_id}", store_id)

    async def seller_store(self, seller_id: int) -> int | None:
        return await self._claimed(f"seller:{seller_id}")

    # ---- stores ----

    async def store(self, appid: int, store_id: int) -> Store | None:
        """The app's store as of its latest revision (one lookup when this process knows
        it); None when there is none, or it is another app's."""
        store = to_store(store_id, (await self.desks.read(str(store_id))).state)
        return store if store is not None and store.appid == appid else None

    async def store_app(self, store_id: int) -> int | None:
        """The app a store belongs to (None: no such store), for callers that know only the
        store's number: a management command, an agent's presence."""
        state = (await self.desks.read(str(store_id))).state
        return int(state["appid"]) if state is not None else None

    async def change_store(
        self, appid: int, store_id: int, compute: Compute, bus: Bus | None, *, new: bool = False
    ) -> Store | None:
        """The next revision of the app's store from ``compute``; a store of another app is
        left alone (and None returned)."""

        def scoped(current: Versioned) -> tuple[Document, Sequence[Event]] | None:
            if current.state is not None and current.state["appid"] != appid:
                return None
            return compute(current)

        after, _ = await self.desks.change(str(store_id), scoped, bus=bus, new=new)
        store = to_store(store_id, after.state)
        return store if store is not None and store.appid == appid else None

    # ---- delivery servers ----

    async def replica_reported(self, replica: str, until: datetime) -> None:
        """A delivery server's reports hold until ``until``."""
        await self.replicas.replace_one({"_id": replica}, {"until": until}, upsert=True)

    async def replicas_until(self, replicas: Sequence[str]) -> dict[str, datetime]:
        """When each delivery server's reports lapse (absent: unknown, lapsed)."""
        found = await by_ids(self.replicas, replicas)
        return {rid: doc["until"] for rid, doc in found.items()}

    # ---- visitors ----

    async def visitor(self, appid: int, customer_id: str) -> Visitor | None:
        """The app's visitor ``customer_id`` as this process last saw it (a lookup if it has
        not): its client id changes only when the number turns out to be an app user's,
        which the caller learns from the auth service and corrects with ``change_visitor``."""
        key = visitor_key(appid, customer_id)
        current = self.visitors.cached(key)
        if current is None or current.state is None:
            current = await self.visitors.read(key)
        return _visitor(current)

    async def change_visitor(
        self,
        appid: int,
        key: str,
        compute: Compute,
        bus: Bus | None,
        request_id: str,
        *,
        new: bool = False,
    ) -> Visitor | None:
        """The next revision of the visitor logged under ``key`` (``visitor_key``: of this
        app)."""
        if not key.startswith((f"{appid}:", f"{appid}#")):
            raise ValueError(f"visitor {key!r} is not of app {appid}")
        after, _ = await self.visitors.change(key, compute, bus=bus, request_id=request_id, new=new)
        return _visitor(after)

    async def visitor_count(self, appid: int) -> int:
        """How many visitors the app has (a management read of the whole visitor log)."""
        count = 0
        async for doc in self.visitors.revs.find({}, {"_id": 1}):
            key = str(doc["_id"])
            if key.endswith(":1") and (key.startswith(f"{appid}:") or key.startswith(f"{appid}#")):
                count += 1
        return count

    # ---- assignments ----

    async def assignment(self, appid: int, uid: int) -> Assignment | None:
        state = (await self.assignments.read(f"{appid}:{uid}")).state
        return Assignment(**state) if state else None

    async def change_assignment(
        self, appid: int, uid: int, compute: Compute, bus: Bus | None, request_id: str
    ) -> Assignment | None:
        """The next assignment from ``compute`` run on the latest one (read first, so that
        keeping the current assignment is decided on what is stored)."""
        await self.assignments.read(f"{appid}:{uid}")
        after, _ = await self.assignments.change(
            f"{appid}:{uid}", compute, bus=bus, request_id=request_id
        )
        return Assignment(**after.state) if after.state else None

    # ---- migration from the previous shape ----

    async def migrate(self) -> dict[str, int]:
        """Rewrite stores, agents, visitors and assignments of the previous shape as logs and
        claims, once (see ``shared/legacy.py``); a marker spares later starts the reads."""
        if await self.counters.find_one({"_id": MIGRATED}) is not None:
            return {}
        stores: dict[int, Document] = {}
        events: dict[int, list[Document]] = {}
        async for doc in self.db[LEGACY_STORES].find({}):
            stores[int(doc["_id"])] = {"appid": doc["appid"], "name": doc.get("name", "")}
            stores[int(doc["_id"])]["agents"] = {}
            events[int(doc["_id"])] = outbox_events(doc)
        claims: list[Document] = [
            {"_id": f"app:{s['appid']}", "store_id": sid} for sid, s in stores.items()
        ]
        async for doc in self.db[LEGACY_AGENTS].find({}):
            store = stores.get(int(doc["store_id"]))
            if store is None:
                continue
            store["agents"][str(doc["_id"])] = [
                doc.get("name", ""),
                doc.get("status", "offline"),
                doc.get("status_at"),
            ]
            claims.append({"_id": f"seller:{doc['_id']}", "store_id": int(doc["store_id"])})
            events[int(doc["store_id"])] += outbox_events(doc)  # presence not yet announced
        await insert_new(self.keys, claims)
        migrated = {
            "stores": await write_first_revisions(
                self.desks,
                [(str(sid), {"op": "create", "s": s}, events[sid]) for sid, s in stores.items()],
            )
        }
        visitors = [
            (
                str(doc["_id"]),
                {"f": {"client_id": doc["client_id"], "customer_id": doc.get("customer_id")}},
                outbox_events(doc),
            )
            async for doc in self.db[LEGACY_CLIENTS].find({})
        ]
        migrated["visitors"] = await write_first_revisions(self.visitors, visitors)
        assignments = [
            (
                str(doc["_id"]),
                {"f": {"store_id": doc["store_id"], "seller_id": doc["seller_id"]}},
                outbox_events(doc),
            )
            async for doc in self.db[LEGACY_ASSIGNMENTS].find({})
        ]
        migrated["assignments"] = await write_first_revisions(self.assignments, assignments)
        with contextlib.suppress(DuplicateKeyError):
            await self.counters.insert_one({"_id": MIGRATED, **migrated, "at": utcnow()})
        return migrated


def _visitor(versioned: Versioned) -> Visitor | None:
    state = versioned.state
    if state is None:
        return None
    return Visitor(
        key=versioned.key, client_id=int(state["client_id"]), customer_id=state.get("customer_id")
    )
