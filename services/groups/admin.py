"""The groups service's management interface: what the test harness (and an operator's
script) reads of the service's data without going through HTTP. Callers import this module,
never ``domain.py`` or ``repository.py``.
"""

from __future__ import annotations

from shared.mongo import Database, ensure_indexes
from shared.revlog import Versioned

from .model import Group, Member
from .repository import INDEXES, GroupsRepository

__all__ = ["Group", "GroupsAdmin", "Member"]


class GroupsAdmin:
    """One database's groups, read by a repository of this admin's own (a fresh admin has
    nothing cached: it reads what is stored)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._repo = GroupsRepository(db)

    async def ensure_indexes(self) -> None:
        await ensure_indexes(self._db, INDEXES)

    async def migrate(self) -> int:
        """Rewrite groups of the previous storage shape, once: how many were migrated."""
        return await self._repo.migrate()

    async def group(self, appid: int, gid: int) -> Group | None:
        """The live group as of its latest revision (None: never created, or disbanded)."""
        return await self._repo.get(appid, gid)

    async def stored(self, appid: int, gid: int) -> Versioned:
        """The group's latest revision number and stored state, as the log folds it (for
        checks of what is stored, such as lengths kept as given)."""
        return await self._repo.read(appid, gid)
