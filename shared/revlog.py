"""Entities whose every change is one insert: an append-only log of revisions per entity.

Why: the local store (FerretDB 1.24) has no atomic update. It applies ``$set``, ``$push`` or a
compare-and-set filter by reading the document and writing it back, so concurrent changes of one
document are lost while each is acknowledged. Inserting a document with a unique ``_id`` is
atomic on every store, and a lookup by a string ``_id`` is the one query it answers without
reading the whole collection. So an entity (a group, a user's settings, ...) is kept as:

* ``<prefix>_revs``: ``{_id: "<key>:<rev>", d: <delta>, ev: [<events>], at}``, revisions 1, 2, 3
  ... claimed by insert. Whoever inserts revision n+1 has changed the state as of revision n:
  a compare-and-set without an atomic update. A loser re-reads and recomputes.
* ``<prefix>_heads``: ``{_id: "<key>", rev, s: <state at rev>}``, a snapshot rewritten every
  ``snapshot_every`` revisions. It is only a starting point: readers walk forward from it (and
  from what this process remembers) by ``_id`` until a revision is missing, so a stale or lost
  head write costs reads, never correctness.
* ``<prefix>_pending``: ``{_id: "<key>:<rev>", at}``, written *before* the revision it names:
  the change's events ride in the revision document itself (one atomic write), and this pointer
  lets a relay find revisions whose events may not be out yet without reading the log. After
  the events are confirmed by the broker (and ``after_commit`` ran) the pointer is deleted.
  A pointer whose revision never appeared is settled by inserting a tombstone revision under
  that ``_id``: the late writer's insert then fails and it retries, so no change is ever
  committed without its events being published.

Deltas and states are plain documents; ``fold(state, delta)`` is the entity's pure function.
State ``None`` means the entity does not exist (revision 0). Commands per change, when this
process remembers the entity: the pointer insert and the revision insert (plus, after the
answer, the pointer delete); a read that must be current costs one lookup of the next revision;
a read of an entity this process does not remember costs two: the head, then the revisions after
it in one ``{_id: {$in: [...]}}`` (answered from ``_id`` by MongoDB and by Parley's FerretDB).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import structlog
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from shared.bus import Bus
from shared.events import Event, utcnow
from shared.mongo import Collection, Database, Document, by_ids

log = structlog.get_logger("parley.revlog")

State = Document
Fold = Callable[[State | None, Document], State | None]
AfterCommit = Callable[["Revision"], Awaitable[None]]
# A change: from the current state, (delta, events), or None for nothing to change.
Compute = Callable[["Versioned"], tuple[Document, Sequence[Event]] | None]

CACHE_SIZE = 50_000
DUPLICATE_KEY = 11000
# FerretDB 1.24 stops answering an update command of 100 or more updates of existing documents.
HEAD_BATCH = 50
MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class Versioned:
    """An entity's state as of revision ``rev`` (``state`` None: it does not exist)."""

    key: str
    rev: int
    state: State | None


@dataclass(frozen=True)
class Revision:
    """One committed revision: its delta and its events (encoded), as stored."""

    key: str
    rev: int
    delta: Document
    events: list[Document]
    request_id: str = ""


class Conflict(Exception):
    """Too many concurrent writers of one entity: the caller answers 503, nothing written."""


def encode_events(events: Sequence[Event]) -> list[Document]:
    return [{"id": e.event_id, "rk": e.routing_key, "body": e.to_json().decode()} for e in events]


class RevLog:
    def __init__(
        self,
        db: Database,
        prefix: str,
        fold: Fold,
        *,
        snapshot_every: int = 16,
        after_commit: AfterCommit | None = None,
    ) -> None:
        self.revs: Collection = db[f"{prefix}_revs"]
        self.heads: Collection = db[f"{prefix}_heads"]
        self.pending: Collection = db[f"{prefix}_pending"]
        self.prefix = prefix
        self._fold = fold
        self._snapshot_every = snapshot_every
        self._cache: OrderedDict[str, Versioned] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._forgetting: set[asyncio.Task[None]] = set()
        self.after_commit = after_commit

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    # ---- reading ----

    def cached(self, key: str) -> Versioned | None:
        return self._cache.get(key)

    async def read(self, key: str) -> Versioned:
        """The entity as of its latest committed revision."""
        start = self._cache.get(key)
        if start is None:
            head = await self.heads.find_one({"_id": key})
            start = (
                Versioned(key, int(head["rev"]), head.get("s"))
                if head is not None
                else Versioned(key, 0, None)
            )
            # The head is at most a snapshot interval behind (unless its write was lost).
            return await self._forward(start, self._snapshot_every + 1)
        return await self._forward(start)

    async def read_many(self, keys: Sequence[str]) -> dict[str, Versioned]:
        """Each entity as of its latest committed revision, in two commands however many there
        are (up to the store's ``$in`` batch): the heads of those this process does not
        remember, then the revisions after each starting point."""
        keys = list(dict.fromkeys(keys))
        starts = {k: v for k in keys if (v := self._cache.get(k)) is not None}
        cold = [k for k in keys if k not in starts]
        if cold:
            heads = await by_ids(self.heads, cold)
            for key in cold:
                head = heads.get(key)
                starts[key] = (
                    Versioned(key, int(head["rev"]), head.get("s"))
                    if head is not None
                    else Versioned(key, 0, None)
                )
        # Remembered entities have seldom moved: the next revision; cold ones a snapshot's worth.
        windows = {k: 1 if k not in cold else self._snapshot_every + 1 for k in keys}
        ids = [f"{k}:{starts[k].rev + n}" for k in keys for n in range(1, windows[k] + 1)]
        found = await by_ids(self.revs, ids) if ids else {}
        result: dict[str, Versioned] = {}
        for key in keys:
            rev, state = starts[key].rev, starts[key].state
            for _ in range(windows[key]):
                doc = found.get(f"{key}:{rev + 1}")
                if doc is None:
                    break
                rev += 1
                if not doc.get("tomb"):
                    state = self._fold(state, doc["d"])
            current = Versioned(key, rev, state)
            if rev - starts[key].rev == windows[key]:  # the window was full: there may be more
                current = await self._forward(current, self._snapshot_every + 1)
            self._remember(current)
            result[key] = current
        return result

    async def read_at(self, key: str, rev: int) -> Versioned | None:
        """The entity as of revision ``rev`` (None if that revision is not committed): from the
        head snapshot when it is not newer, else from the start, forward by ``_id``."""
        cached = self._cache.get(key)
        if cached is not None and cached.rev == rev:
            return cached
        head = await self.heads.find_one({"_id": key})
        current = (
            Versioned(key, int(head["rev"]), head.get("s"))
            if head is not None and int(head["rev"]) <= rev
            else Versioned(key, 0, None)
        )
        state = current.state
        docs = await self._revisions(key, current.rev + 1, rev - current.rev)
        if len(docs) < rev - current.rev:
            return None
        for doc in docs:
            if not doc.get("tomb"):
                state = self._fold(state, doc["d"])
        return Versioned(key, rev, state)

    async def _revisions(self, key: str, first: int, count: int) -> list[Document]:
        """Revisions ``first``, ``first + 1``, ... (at most ``count``), in one command,
        stopping before the first missing one."""
        if count <= 0:
            return []
        ids = [f"{key}:{n}" for n in range(first, first + count)]
        by_id = await by_ids(self.revs, ids)
        found: list[Document] = []
        for rev_id in ids:
            doc = by_id.get(rev_id)
            if doc is None:
                break
            found.append(doc)
        return found

    async def _forward(self, current: Versioned, window: int = 1) -> Versioned:
        """From ``current``, forward to the first missing revision, ``window`` revisions per
        command (one when the caller expects at most a few new revisions; a snapshot's worth
        when starting from the head)."""
        rev, state = current.rev, current.state
        while True:
            docs = await self._revisions(current.key, rev + 1, window)
            for doc in docs:
                rev += 1
                if not doc.get("tomb"):
                    state = self._fold(state, doc["d"])
            if len(docs) < window:
                break
            window = self._snapshot_every + 1
        result = Versioned(current.key, rev, state)
        self._remember(result)
        return result

    def _remember(self, versioned: Versioned) -> None:
        known = self._cache.get(versioned.key)
        if known is not None and known.rev > versioned.rev:
            return
        self._cache[versioned.key] = versioned
        self._cache.move_to_end(versioned.key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    # ---- changing ----

    async def change(
        self,
        key: str,
        compute: Compute,
        *,
        bus: Bus | None,
        request_id: str = "",
        new: bool = False,
    ) -> tuple[Versioned, Revision | None]:
        """Apply ``compute(current) -> (delta, events)`` as the next revision, retrying against
        the newer state when another writer got there first. ``compute`` may raise (a refused
        change writes nothing) or return None (nothing to change). Publishes the events.
        ``new``: the entity is expected not to exist, so it is not read first (if it does, the
        insert of revision 1 fails and ``compute`` sees the real state).

        Writers of one entity in this process take turns (and publish in revision order);
        writers in other processes are kept apart by the revision's unique ``_id`` alone."""
        async with self._lock(key):
            return await self._change(key, compute, bus, request_id, new)

    async def _change(
        self,
        key: str,
        compute: Compute,
        bus: Bus | None,
        request_id: str,
        new: bool,
    ) -> tuple[Versioned, Revision | None]:
        current = self._cache.get(key)
        if current is None:
            current = Versioned(key, 0, None) if new else await self.read(key)
        for _ in range(MAX_ATTEMPTS):
            result = compute(current)
            if result is None:
                return current, None
            delta, events = result
            revision = Revision(key, current.rev + 1, delta, encode_events(events), request_id)
            rev_id = f"{key}:{revision.rev}"
            with contextlib.suppress(DuplicateKeyError):  # another writer's intent: shared
                await self.pending.insert_one({"_id": rev_id, "at": utcnow()})
            try:
                await self.revs.insert_one(
                    {
                        "_id": rev_id,
                        "d": delta,
                        "ev": revision.events,
                        "rid": request_id,
                        "at": utcnow(),
                    }
                )
            except DuplicateKeyError:
                current = await self._forward(current)  # someone else's revision: recompute
                continue
            after = Versioned(key, revision.rev, self._fold(current.state, delta))
            self._remember(after)
            if revision.rev % self._snapshot_every == 0:
                await self._write_heads([after])
            await self.complete(revision, bus)
            return after, revision
        raise Conflict(key)

    async def append_many(self, deltas: dict[str, Document]) -> None:
        """Append one delta to each of many entities, unconditionally and without events (a
        derived index whose deltas commute, e.g. set additions). One ``insert_many`` for all
        of them; an entity another writer advanced meanwhile is retried after a re-read."""
        async with contextlib.AsyncExitStack() as held:
            for key in sorted(deltas):  # sorted: no two callers wait for each other in a cycle
                await held.enter_async_context(self._lock(key))
            await self._append_many(deltas)

    async def _append_many(self, deltas: dict[str, Document]) -> None:
        todo = dict(deltas)
        stale: list[str] = []
        for _ in range(MAX_ATTEMPTS):
            if not todo:
                return
            if stale:  # refused last round: read them (an entity not known here is first
                # assumed new, so a batch for fresh entities is a single insert)
                await asyncio.gather(*(self.read(key) for key in stale))
            currents = {key: self._cache.get(key) or Versioned(key, 0, None) for key in todo}
            keys = list(todo)
            docs = [
                {"_id": f"{key}:{currents[key].rev + 1}", "d": todo[key], "at": utcnow()}
                for key in keys
            ]
            failed: set[int] = set()
            try:
                await self.revs.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                for error in exc.details.get("writeErrors", []):
                    if error.get("code") != DUPLICATE_KEY:
                        raise
                    failed.add(int(error["index"]))
            retry: dict[str, Document] = {}
            heads: list[Versioned] = []
            stale = []
            for index, key in enumerate(keys):
                current = currents[key]
                if index in failed:
                    stale.append(key)
                    retry[key] = todo[key]
                    continue
                after = Versioned(key, current.rev + 1, self._fold(current.state, todo[key]))
                self._remember(after)
                if after.rev % self._snapshot_every == 0:
                    heads.append(after)
            await self._write_heads(heads)
            todo = retry
        raise Conflict(", ".join(sorted(todo)))

    async def _write_heads(self, snapshots: Sequence[Versioned]) -> None:
        """Rewrite head snapshots, in batches below the size that stalls the local store."""
        updates = [
            UpdateOne({"_id": v.key}, {"$set": {"rev": v.rev, "s": v.state}}, upsert=True)
            for v in snapshots
        ]
        for start in range(0, len(updates), HEAD_BATCH):
            # A concurrent first write of the same head: either snapshot will do.
            with contextlib.suppress(BulkWriteError):
                await self.heads.bulk_write(updates[start : start + HEAD_BATCH], ordered=False)

    async def complete(self, revision: Revision, bus: Bus | None) -> bool:
        """Run ``after_commit``, publish the revision's events, then drop its pending pointer.
        Never raises for a broker failure: the pointer stays and the relay retries."""
        if bus is None:
            return False  # a management command: a running service's relay publishes them
        try:
            if self.after_commit is not None:
                await self.after_commit(revision)
            headers = {"request_id": revision.request_id} if revision.request_id else {}
            for event in revision.events:
                await bus.publish(
                    event["rk"], event["body"].encode(), message_id=event["id"], headers=headers
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "publish after a change failed; the relay will retry",
                revision=f"{revision.key}:{revision.rev}",
                error=repr(exc),
            )
            return False
        # The pointer is dropped after the answer (a process that stops first leaves it, and
        # the relay publishes the events once more: duplicates, never loss).
        task = asyncio.create_task(
            self._forget(f"{revision.key}:{revision.rev}"),
            context=contextvars.Context(),  # work of no request (logged and counted as such)
        )
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)
        return True

    async def _forget(self, rev_id: str) -> None:
        try:
            await self.pending.delete_one({"_id": rev_id})
        except Exception as exc:  # the relay will find it, publish again and retry
            log.warning("dropping a pending pointer failed", revision=rev_id, error=repr(exc))

    async def drain(self) -> None:
        """Wait for the pointer deletions still under way (at shutdown)."""
        if self._forgetting:
            await asyncio.gather(*self._forgetting, return_exceptions=True)

    # ---- the relay's pass ----

    async def settle_pending(self, bus: Bus, grace: float) -> int:
        """Finish every revision whose pointer is older than ``grace`` seconds: publish its
        events, or tombstone a revision that never came. Reads only the pending pointers."""
        cutoff = utcnow() - timedelta(seconds=grace)
        settled = 0
        for pointer in await self.pending.find({}).to_list():
            if pointer["at"] > cutoff:
                continue
            rev_id = str(pointer["_id"])
            key, _, rev = rev_id.rpartition(":")
            doc = await self.revs.find_one({"_id": rev_id})
            if doc is None:
                try:
                    await self.revs.insert_one({"_id": rev_id, "tomb": True, "at": utcnow()})
                    await self.pending.delete_one({"_id": rev_id})
                    settled += 1
                    continue
                except DuplicateKeyError:  # it was committed just now
                    doc = await self.revs.find_one({"_id": rev_id})
            if doc is None or doc.get("tomb"):
                await self.pending.delete_one({"_id": rev_id})
                continue
            revision = Revision(key, int(rev), doc["d"], list(doc["ev"]), str(doc.get("rid", "")))
            if await self.complete(revision, bus):
                settled += 1
        return settled


def fold_all(fold: Fold, deltas: Sequence[Document], state: State | None = None) -> State | None:
    """Apply ``deltas`` in order (a helper for tests and migrations)."""
    for delta in deltas:
        state = fold(state, delta)
    return state
