"""The customer-service desk: stores, agents (sellers), visitors' client ids, agent presence,
and choosing an agent for a visitor (spec §7). Storage: ``repository.py``; every change is one
revision of a store's, visitor's or assignment's log, computed on the state it follows.

Client ids are ``PARLEY_CUSTOMER_CLIENT_ID_BASE`` + a per-app number from id blocks, and the
auth service refuses to make a customer of a uid that is an ordinary user, so a visitor never
receives an app user's token and ``/auth/grant`` never returns a visitor's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import structlog

from shared.bus import Bus
from shared.errors import APP_NO_CUSTOMER, STORE_NO_SUPPORTER, ParleyError
from shared.events import (
    AgentAdded,
    AgentPresence,
    CustomerRegistered,
    Event,
    StoreCreated,
    SupporterAssigned,
    utcnow,
)
from shared.internal import CustomerDirectory, TokenIssuer, UidTaken
from shared.mongo import Database, Document
from shared.revlog import Conflict, Versioned

from .repository import Agent, CustomerRepository, Store, Visitor, to_store, visitor_key
from .rules import CustomerPolicy, check_profile, check_same_app

log = structlog.get_logger("parley.customer")

TOKEN_ATTEMPTS = 3
# A delivery server's report of an agent whose ``ttl`` is missing holds this long (seconds).
DEFAULT_REPORT_TTL = 90.0
# A delivery server's "offline" about an agent is kept this long, so that an older "online"
# from that server that arrives late is recognised as older.
OFFLINE_REPORTS_KEPT = timedelta(days=1)


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


class _Taken(Exception):
    pass


class CustomerDomain:
    def __init__(
        self, db: Database, bus: Bus | None, policy: CustomerPolicy, tokens: TokenIssuer | None
    ) -> None:
        self.repo = CustomerRepository(db, policy.customer_client_id_base)
        self.bus = bus
        self.policy = policy
        self.tokens = tokens
        self._reported: dict[str, datetime] = {}  # delivery server -> until, as last written

    # ---- stores and agents (management) ----

    async def create_store(self, appid: int, name: str) -> int:
        """The app's store (one per app), announced by ``customer.store.created`` once the app's
        claim is held: a store that loses the claim to a concurrent one is dropped unannounced."""
        store_id = await self.repo.next_store_id()
        state: Document = {"appid": appid, "name": name, "agents": {}}

        def create(current: Versioned) -> tuple[Document, list[Event]]:
            if current.rev > 0:
                raise _Taken()
            return {"op": "create", "s": state}, []

        try:
            await self.repo.change_store(appid, store_id, create, self.bus, new=True)
        except _Taken:
            raise ParleyError(f"store id {store_id} is taken") from None
        if not await self.repo.claim_app_store(appid, store_id):
            await self.repo.change_store(appid, store_id, lambda _: ({"op": "drop"}, []), self.bus)
            raise ParleyError(f"app {appid} already has a store")
        event = StoreCreated(appid=appid, store_id=store_id, name=name)
        await self.repo.change_store(
            appid, store_id, lambda _: ({"op": "claimed"}, [event]), self.bus
        )
        return store_id

    async def app_of_store(self, store_id: int) -> int:
        """The app a store belongs to (for management commands that name only the store)."""
        appid = await self.repo.store_app(store_id)
        if appid is None:
            raise ParleyError(f"no store {store_id}")
        return appid

    async def add_agent(self, appid: int, store_id: int, name: str) -> int:
        """A new agent (seller) of the app's store, announced by ``customer.agent.added``."""
        if await self.repo.store(appid, store_id) is None:
            raise ParleyError(f"no store {store_id} of app {appid}")
        seller_id = await self.repo.next_seller_id()
        await self.repo.claim_seller(seller_id, store_id)
        event = AgentAdded(appid=appid, store_id=store_id, seller_id=seller_id, name=name)
        known = False

        def join(current: Versioned) -> tuple[Document, list[Event]] | None:
            nonlocal known
            if current.state is None:
                return None
            known = True
            return {"op": "agent", "id": seller_id, "name": name}, [event]

        await self.repo.change_store(appid, store_id, join, self.bus)
        if not known:
            raise ParleyError(f"no store {store_id} of app {appid}")
        return seller_id

    async def _presence(
        self, appid: int | None, seller_id: int, status: str, at: datetime, announce: bool
    ) -> bool:
        """Record an agent's status unless a newer one is known; False for an unknown agent
        (or one of another app than ``appid``; None: the agent's own app)."""
        store_id = await self.repo.seller_store(seller_id)
        if store_id is None:
            return False
        owner = appid if appid is not None else await self.repo.store_app(store_id)
        if owner is None:
            return False
        known = True

        def compute(current: Versioned) -> tuple[Document, list[Event]] | None:
            nonlocal known
            store = to_store(store_id, current.state)
            agent = _agent(store, seller_id)
            if store is None or agent is None:
                known = False
                return None
            if agent.status_at is not None and agent.status_at >= at:
                return None  # a newer status is known (or this one, replayed)
            events: list[Event] = []
            if announce:
                events.append(AgentPresence(appid=store.appid, seller_id=seller_id, status=status))
            # A presence call states the agent's status outright: the delivery servers'
            # reports are cleared (each re-announces its connected agents periodically).
            return {"op": "presence", "id": seller_id, "status": status, "at": at}, events

        try:
            store = await self.repo.change_store(owner, store_id, compute, self.bus)
        except Conflict:
            raise ParleyError("store busy, retry", status=503) from None
        return known and store is not None

    async def set_presence(
        self,
        appid: int | None,
        seller_id: int,
        status: Literal["online", "offline"],
        at: datetime | None = None,
    ) -> bool:
        """Record an agent's status unless a newer one is known; False for an unknown agent
        (or, with ``appid``, an agent of another app)."""
        return await self._presence(appid, seller_id, status, at or utcnow(), announce=True)

    async def on_presence_event(self, event: Event) -> None:
        """``agent.presence`` from a delivery server or the presence API (replays and stale
        ones change nothing)."""
        if not isinstance(event, AgentPresence):
            return
        if event.replica is None:
            await self._presence(
                event.appid, event.seller_id, event.status, event.occurred_at, announce=False
            )
            return
        await self._replica_report(event, event.replica)

    async def _replica_report(self, event: AgentPresence, replica: str) -> None:
        """One delivery server's view of an agent's connections: the agent is online while
        some server whose reports have not lapsed last said so."""
        at = event.occurred_at
        ttl = timedelta(seconds=event.ttl or DEFAULT_REPORT_TTL)
        until = at + ttl
        written = self._reported.get(replica)
        if written is None or until > written + ttl / 3:  # a write per server per ttl / 3
            await self.repo.replica_reported(replica, until)
            self._reported[replica] = until
        store_id = await self.repo.seller_store(event.seller_id)
        owner = await self.repo.store_app(store_id) if store_id is not None else None
        if store_id is None or owner is None:
            return
        online = event.status == "online"

        def compute(current: Versioned) -> tuple[Document, list[Event]] | None:
            agent = _agent(to_store(store_id, current.state), event.seller_id)
            if agent is None:
                return None
            previous = agent.replicas.get(replica)
            if previous is not None and previous[0] >= at:
                return None  # this server has said something newer (or this, replayed)
            if previous is not None and previous[1] == online and agent.status == event.status:
                return None  # a re-announcement: nothing changes
            if agent.status_at is not None and agent.status_at >= at and not agent.replicas:
                return None  # older than a presence call
            reports = {
                rid: (rat, on)
                for rid, (rat, on) in agent.replicas.items()
                if on or rat > at - OFFLINE_REPORTS_KEPT
            }
            reports[replica] = (at, online)
            status = "online" if any(on for _, on in reports.values()) else "offline"
            delta = {
                "op": "presence",
                "id": event.seller_id,
                "status": status,
                "at": at,
                "r": {rid: [rat, on] for rid, (rat, on) in reports.items()},
            }
            return delta, []

        try:
            await self.repo.change_store(owner, store_id, compute, self.bus)
        except Conflict:
            raise ParleyError("store busy, retry", status=503) from None

    async def _live(self, store: Store) -> Store:
        """The store with each agent's status as of now: an agent that only delivery servers
        whose reports have lapsed (a crashed server) said was online is offline."""
        reporting = {
            rid
            for agent in store.agents
            if agent.status == "online"
            for rid, (_, on) in agent.replicas.items()
            if on
        }
        if not reporting:
            return store
        until = await self.repo.replicas_until(sorted(reporting))
        now = utcnow()
        agents = []
        for agent in store.agents:
            live = [rid for rid, (_, on) in agent.replicas.items() if on]
            if agent.status == "online" and live and all(until.get(r, now) <= now for r in live):
                agent = agent.model_copy(update={"status": "offline"})
            agents.append(agent)
        return store.model_copy(update={"agents": agents})

    # ---- visitors ----

    def needs_app_key(self, credentials_sent: bool) -> bool:
        """S17: app-key credentials are checked when sent, or always when
        ``customer_auth_requires_appkey``."""
        return credentials_sent or self.policy.customer_auth_requires_appkey

    async def do_register(
        self,
        appid: int,
        customer_id: str | None,
        name: str | None,
        avatar: str | None,
        *,
        authenticated: int | None,
        keep_profile: bool,
        rid: str = "",
    ) -> Registration:
        """X2/S17 as asked: the profile within its limits, the app the one authenticated (if
        any). The visitor's name and avatar are replaced (with "" when left out), except with
        ``keep_profile``, where a field left out keeps its stored value."""
        check_profile(self.policy, customer_id, name, avatar)
        check_same_app(appid, authenticated)
        if not keep_profile:
            name, avatar = name or "", avatar or ""
        return await self.register(appid, customer_id, name, avatar, rid)

    async def store_of(self, appid: int) -> int:
        store_id = await self.repo.app_store(appid)
        if store_id is None:
            raise ParleyError(APP_NO_CUSTOMER)
        return store_id

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
        visitor = await self._visitor_for(appid, customer_id, store_id, rid)
        for _ in range(10):
            try:
                token = await self._customer_token(appid, visitor.client_id, name, avatar)
            except UidTaken:
                # The number is an app user's uid: move this visitor to a fresh id.
                fresh = await self.repo.next_client_id(appid)
                visitor = await self._move(appid, visitor, fresh, rid)
                continue
            return Registration(token, store_id, visitor.client_id)
        raise ParleyError("no client id available", status=503)

    async def _customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None
    ) -> str:
        """The visitor's token from the auth service, asked again when the call failed (it is
        idempotent: the same uid always gets the same token)."""
        assert self.tokens is not None
        for attempt in range(TOKEN_ATTEMPTS):
            try:
                return await self.tokens.customer_token(appid, uid, name, avatar)
            except ParleyError as exc:
                if exc.status != 503 or attempt == TOKEN_ATTEMPTS - 1:
                    raise
                log.warning("customer token call failed; asking again", uid=uid, error=exc.message)
        raise AssertionError("unreachable")

    async def _visitor_for(
        self, appid: int, customer_id: str | None, store_id: int, rid: str
    ) -> Visitor:
        if customer_id:
            known = await self.repo.visitor(appid, customer_id)
            if known is not None:
                return known
        client_id = await self.repo.next_client_id(appid)
        event = CustomerRegistered(
            appid=appid, customer_id=customer_id or None, client_id=client_id, store_id=store_id
        )

        def create(current: Versioned) -> tuple[Document, list[Event]] | None:
            if current.state is not None:
                return None  # a concurrent first registration won: use its id
            fields = {"client_id": client_id, "customer_id": customer_id or None}
            return {"f": fields}, [event]

        visitor = await self.repo.change_visitor(
            appid,
            visitor_key(appid, customer_id, client_id),
            create,
            self.bus,
            rid,
            new=not customer_id,  # an anonymous visitor's key holds a fresh number
        )
        assert visitor is not None
        return visitor

    async def _move(self, appid: int, visitor: Visitor, fresh: int, rid: str) -> Visitor:
        def move(current: Versioned) -> tuple[Document, list[Event]] | None:
            if current.state is None or current.state["client_id"] != visitor.client_id:
                return None  # already moved by a concurrent registration
            return {"f": {"client_id": fresh}}, []

        moved = await self.repo.change_visitor(appid, visitor.key, move, self.bus, rid)
        assert moved is not None
        return moved

    async def client_id(self, appid: int, customer_id: str) -> int | None:
        visitor = await self.repo.visitor(appid, customer_id)
        return visitor.client_id if visitor else None

    # ---- choosing an agent ----

    async def store(self, appid: int, store_id: int) -> Store | None:
        """The app's store ``store_id`` as of now (None: not this app's)."""
        store = await self.repo.store(appid, store_id)
        return await self._live(store) if store is not None else None

    async def store_sellers(self, appid: int, store_id: int) -> list[int]:
        """The seller ids of the app's store ``store_id`` ([]: not this app's)."""
        store = await self.store(appid, store_id)
        return [a.seller_id for a in store.agents] if store else []

    async def supporter(self, appid: int, uid: int, store_id: int, rid: str = "") -> Supporter:
        """S18: the visitor's previous agent of this store if still there (even offline), else
        a random online agent, else the store's first agent; the choice is remembered."""
        store = await self.store(appid, store_id)
        if store is None or not store.agents:
            raise ParleyError(STORE_NO_SUPPORTER)
        by_id = {a.seller_id: a for a in store.agents}
        online = [a for a in store.agents if a.status == "online"]
        pick = random.choice(online) if online else store.agents[0]

        def choose(current: Versioned) -> tuple[Document, list[Event]] | None:
            previous = current.state
            if previous and previous["store_id"] == store_id and previous["seller_id"] in by_id:
                return None
            event = SupporterAssigned(
                appid=appid, uid=uid, store_id=store_id, seller_id=pick.seller_id
            )
            return {"f": {"store_id": store_id, "seller_id": pick.seller_id}}, [event]

        try:
            chosen = await self.repo.change_assignment(appid, uid, choose, self.bus, rid)
        except Conflict:
            raise ParleyError("busy, retry", status=503) from None
        assert chosen is not None
        agent = by_id[chosen.seller_id]
        return Supporter(agent.seller_id, agent.name.split("@", 1)[0], agent.status)


def _agent(store: Store | None, seller_id: int) -> Agent | None:
    if store is None:
        return None
    return next((a for a in store.agents if a.seller_id == seller_id), None)


class LocalCustomerDirectory(CustomerDirectory):
    def __init__(self, domain: CustomerDomain) -> None:
        self._domain = domain

    async def client_id(self, appid: int, customer_id: str) -> int | None:
        return await self._domain.client_id(appid, customer_id)

    async def store_sellers(self, appid: int, store_id: int) -> list[int]:
        return await self._domain.store_sellers(appid, store_id)
