"""The messages service's management interface: what the test harness (and an operator's
script) does to the message store without going through HTTP. Callers import this module,
never ``domain.py`` or ``repository.py``.

``MessagesAdmin`` is the store as one process sees it: a fresh one has nothing cached (a
restart, or another replica), two of them race as two replicas do. Its posts are stored and
announced as the service's own (``post_customer`` is how a delivery server hands over a
customer-service message), and ``on_group_event`` is the service's ``group.*`` consumer.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.bus import Bus
from shared.events import Event
from shared.internal import GroupDirectory, GroupSnapshot
from shared.mongo import Database, Document, ensure_indexes
from shared.settings import Settings

from .domain import MessagesDomain
from .repository import (
    CHUNKS,
    COUNTERS,
    ENTRIES,
    INDEXES,
    PENDING,
    POSTS,
    PROBE_COLD,
    SCHEMA_ID,
    SYNC_KEYS,
    Entry,
    MessagesRepository,
    Post,
)

__all__ = [
    "CHUNKS",
    "COUNTERS",
    "ENTRIES",
    "PENDING",
    "POSTS",
    "PROBE_COLD",
    "SCHEMA_ID",
    "SYNC_KEYS",
    "Entry",
    "MessagesAdmin",
    "Post",
]


class NoGroups(GroupDirectory):
    """For an admin with no groups service to ask: every group is unknown."""

    async def get_group(
        self, appid: int, gid: int, revision: int | None = None
    ) -> GroupSnapshot | None:
        return None


class MessagesAdmin:
    """One database's message store. ``bus`` announces the posts made here (None: a running
    service's recovery finishes them); ``groups`` answers the membership questions of group
    events that list only the changed members."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        bus: Bus | None = None,
        groups: GroupDirectory | None = None,
    ) -> None:
        self._db = db
        self._repo = MessagesRepository(db)
        self._domain = MessagesDomain(self._repo, bus, settings, groups or NoGroups())

    # ---- schema ----

    async def ensure_indexes(self) -> None:
        await ensure_indexes(self._db, INDEXES)

    async def migrate(self) -> None:
        """Rewrite data of the previous storage shape, once (idempotent)."""
        await self._repo.migrate()

    # ---- inboxes ----

    async def page(self, appid: int, owner: str, after: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries of an inbox (``u:<uid>``) or group queue (``g:<gid>``)
        after key ``after``, by key."""
        return await self._repo.page(appid, owner, after, limit)

    async def latest(self, appid: int, owner: str, cmds: Sequence[int], limit: int) -> list[Entry]:
        """The last ``limit`` entries of the inbox among the commands ``cmds``, by key."""
        return await self._repo.latest(appid, owner, cmds, limit)

    async def set_sync_key(self, appid: int, owner: str, key: int) -> None:
        """Record what a delivery server acknowledged (the offline count starts after it)."""
        await self._repo.set_sync_key(appid, owner, key)

    async def append(
        self, appid: int, owners: Sequence[str], msg_id: str, fields: Document
    ) -> dict[str, int]:
        """Store one message in each inbox of ``owners`` (once: a replay keeps its keys)."""
        return await self._repo.append(appid, owners, msg_id, fields)

    async def append_batch(
        self, appid: int, items: Sequence[tuple[Sequence[str], str, Document]], plan: dict[str, int]
    ) -> dict[str, dict[str, int]]:
        """Store several messages in order, each in its inboxes (``(owners, msg_id, fields)``),
        each inbox read from its key in ``plan``; returns each message's keys."""
        return await self._repo.append_batch(appid, items, plan)

    # ---- what the service does on its own ----

    async def post_peer(self, appid: int, sender: int, receiver: int, content: str) -> Post:
        return await self._domain.post_peer(appid, sender, receiver, content)

    async def post_customer(
        self, sender_appid: int, sender: int, receiver_appid: int, receiver: int, content: str
    ) -> Post:
        """A customer-service message (cmd 64) between two apps, as a delivery server posts it."""
        return await self._domain.post_customer(
            sender_appid, sender, receiver_appid, receiver, content
        )

    async def on_group_event(self, event: Event) -> None:
        """The service's ``group.*`` consumer: the group notification the event calls for."""
        await self._domain.on_group_event(event)
