"""The auth service's management interface: what ``parley app ...``, ``parley run``'s welcome
and the test harness do to the service's data without going through HTTP. It is the only way
in from outside the service: callers import this module, never ``domain.py`` or
``repository.py``.

Writes go through the domain, so they are revisions with their events like any request's; with
no bus (a management command has no broker connection) the events wait in the outbox until a
running service's relay publishes them.
"""

from __future__ import annotations

from shared.bus import Bus
from shared.mongo import Database, ensure_indexes
from shared.revlog import RevLog
from shared.settings import Settings

from .domain import AppCredentials, AuthDomain
from .repository import INDEXES, AuthRepository, User

__all__ = ["AppCredentials", "AuthAdmin", "User"]


class AuthAdmin:
    """One database's apps and users. ``bus`` publishes the events of the writes made here
    (None: the outbox relay of a running service publishes them)."""

    def __init__(self, db: Database, settings: Settings, bus: Bus | None = None) -> None:
        self._repo = AuthRepository(db)
        self._domain = AuthDomain(self._repo, bus, settings)

    # ---- schema ----

    async def ensure_indexes(self) -> None:
        await ensure_indexes(self._repo.db, INDEXES)

    async def migrate(self) -> dict[str, int]:
        """Rewrite data of the previous storage shape, once (see ``AuthRepository.migrate``):
        what was migrated, empty when it had been done before."""
        return await self._repo.migrate()

    async def prepare(self) -> None:
        """Indexes and migration: what a management command does before it reads or writes."""
        await self.ensure_indexes()
        await self.migrate()

    # ---- apps ----

    async def create_app(self, name: str) -> AppCredentials:
        return await self._domain.create_app(name)

    async def list_apps(self) -> list[AppCredentials]:
        return await self._domain.list_apps()

    async def has_app(self, appid: int) -> bool:
        return await self._repo.get_app(appid) is not None

    # ---- users ----

    async def grant(self, appid: int, uid: int, user_name: str) -> str:
        """The user's token, as ``POST /auth/grant`` gives it (events on this admin's bus)."""
        return await self._domain.grant(appid, uid, user_name)

    async def user(self, appid: int, uid: int) -> User | None:
        """The user as of its latest revision (None: never granted nor changed)."""
        return await self._repo.user(appid, uid)

    async def uids(self, appid: int) -> list[int]:
        """Every uid of the app that has a state (reads the whole user log)."""
        return await self._repo.uids(appid)

    async def unannounced(self, appid: int, uid: int) -> list[int]:
        """Revisions of the user whose events are not confirmed published yet."""
        return await self._repo.unannounced(appid, uid)

    def revlogs(self) -> list[RevLog]:
        """The logs whose unfinished changes an outbox relay settles."""
        return self._repo.revlogs()
