"""The customer service's management interface: what ``parley store ...`` and the test harness
do to the service's data without going through HTTP (stores and their agents are made here,
spec §7 has no route for them). Callers import this module, never ``domain.py`` or
``repository.py``.
"""

from __future__ import annotations

from shared.bus import Bus
from shared.mongo import Database, ensure_indexes
from shared.settings import Settings

from .domain import CustomerDomain
from .repository import INDEXES, Agent, Store

__all__ = ["Agent", "CustomerAdmin", "Store"]


class CustomerAdmin:
    """One database's stores, agents and visitors. ``bus`` publishes the events of the writes
    made here (None: the outbox relay of a running service publishes them)."""

    def __init__(self, db: Database, settings: Settings, bus: Bus | None = None) -> None:
        self._db = db
        self._domain = CustomerDomain(db, bus, settings, None)

    # ---- schema ----

    async def ensure_indexes(self) -> None:
        await ensure_indexes(self._db, INDEXES)

    async def migrate(self) -> dict[str, int]:
        """Rewrite data of the previous storage shape, once: what was migrated, empty when it
        had been done before."""
        return await self._domain.repo.migrate()

    async def prepare(self) -> None:
        """Indexes and migration: what a management command does before it reads or writes."""
        await self.ensure_indexes()
        await self.migrate()

    # ---- stores and agents ----

    async def create_store(self, appid: int, name: str) -> int:
        """The app's store (one per app; a second is refused with a ``ParleyError``)."""
        return await self._domain.create_store(appid, name)

    async def app_of_store(self, store_id: int) -> int:
        """The app a store belongs to (``ParleyError`` for an unknown store)."""
        return await self._domain.app_of_store(store_id)

    async def add_agent(self, appid: int, store_id: int, name: str) -> int:
        """A new agent of the app's store: its seller id (``ParleyError`` for a store that is
        not the app's)."""
        return await self._domain.add_agent(appid, store_id, name)

    async def store(self, appid: int, store_id: int) -> Store | None:
        """The app's store with its agents and their presence, as of its latest revision."""
        return await self._domain.store(appid, store_id)

    # ---- visitors ----

    async def visitor_count(self, appid: int) -> int:
        """How many visitors the app has (reads the whole visitor log)."""
        return await self._domain.repo.visitor_count(appid)
