"""The messages service's collections: inboxes and super-group queues with sync keys, the
messages in flight and the accepted-message log.

Every command a request issues is an insert or reads, updates or deletes one document by its
string ``_id``: the one query every store (FerretDB on SQLite included) answers without
reading the collection. So a request costs the same however many messages are stored.

* ``messages_entries``: one document per stored message per inbox. An inbox is a user's
  (owner ``u:<uid>``) or a super group's queue (owner ``g:<gid>``), always within an appid::

      {_id: "<appid>:<owner>:<key>", appid, owner, key, msg, cmd, sender, receiver,
       content, timestamp[, sender_appid, receiver_appid]}

  **Sync keys are dense and commit-ordered** (DESIGN invariant 3): an entry is inserted under
  key k only when entry k-1 of the same inbox is known committed (this process stored it, or
  read it, or a duplicate-key refusal showed it), and ``_id`` makes each key unique. So a
  reader that has everything up to K can never later find a new entry at or below K, however
  many replicas write; readers also stop at the first missing key. The unique index on
  ``(appid, owner, msg)`` makes every append idempotent: a message is never stored twice in
  one inbox, whichever attempt (first, retried, recovered) stores it.
* ``messages_chunks``: ``{_id: "<appid>:<owner>:<n>", entries: [...]}``, a copy of the 32
  entries of keys ``32n+1 .. 32n+32`` of an inbox, written once (by insert) when all of them
  are committed: in the background by the process that stored all 32, else by the first
  reader that needs them. Entries never change, so a chunk never does: history and inbox
  paging read 32 entries with one ``_id`` lookup.
* ``messages_counters``: ``{_id: "<appid>:<owner>", seq}``, a hint: a key known committed
  (never above the last one), raised in the background in batches. A process that has not
  seen an inbox starts from it and probes forward by ``_id`` to the first free key.
* ``messages_sync_keys``: ``{_id: "<appid>:<owner>", key}``, the position a delivery server
  last acknowledged for the user (0: none). Kept apart from the counters so that raising a
  hint in the background never writes over an acknowledgement (the local store has no atomic
  update: an update rewrites the whole document).
* ``messages_pending``: the messages in flight, each the whole post (its recipients and the
  key each inbox's append starts from), inserted before anything is stored and deleted once
  its ``message.*`` event is confirmed by the broker. A pending post *is* the message's
  outbox: one left by a crash or a broker outage is completed (stored again idempotently,
  announced under the same event id) by the recovery loop of any replica, which reads only
  this small collection.
* ``messages_posts``: the accepted-message log, each post once it is ``done``, with the key
  it got in each inbox. Written (like the deletions of pending posts and the hints) in the
  background in batches, except for posts whose id is derived from an event, which are
  written at once because a replayed event looks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pymongo import DeleteOne, IndexModel, UpdateOne
from pymongo.errors import BulkWriteError, CollectionInvalid, DuplicateKeyError

from shared.loops import stop_if_cancelled
from shared.mongo import Collection, Database, Document, by_ids

log = structlog.get_logger("parley.messages")

ENTRIES = "messages_entries"
CHUNKS = "messages_chunks"
COUNTERS = "messages_counters"
SYNC_KEYS = "messages_sync_keys"
PENDING = "messages_pending"
POSTS = "messages_posts"

INDEXES: dict[str, list[IndexModel]] = {
    ENTRIES: [
        IndexModel([("appid", 1), ("owner", 1), ("msg", 1)], unique=True, name="inbox_msg"),
    ],
    CHUNKS: [],
    COUNTERS: [],
    SYNC_KEYS: [],
    PENDING: [],
    POSTS: [],
}

DUPLICATE_KEY = 11000
CHUNK = 32
# FerretDB 1.24 (SQLite) stops answering altogether when one update command carries 100 or
# more updates of existing documents: every batched update or delete stays below that.
WRITE_BATCH = 50
INSERT_BATCH = 1000
MAX_BATCH_ROUNDS = 3
KEY_CACHE_SIZE = 100_000
OPEN_CHUNKS = 10_000
APPENDED_SIZE = 2_000
MAX_ROUNDS = 1_000
RECENT_CHUNKS = 2_000
FLUSH_INTERVAL = 0.05
# Keys read past the last one known, in one command: this process's own knowledge is seldom
# behind (one lookup, the cheapest command; then a chunk's worth at a time); a hint is raised
# in the background, a few batches behind a busy inbox.
PROBE = 1
PROBE_COLD = 64
PENDING_BATCH = 1000
SCHEMA_ID = "~schema"
SCHEMA_VERSION = 2


def user_inbox(uid: int) -> str:
    return f"u:{uid}"


def group_queue(gid: int) -> str:
    return f"g:{gid}"


def entry_id(appid: int, owner: str, key: int) -> str:
    return f"{appid}:{owner}:{key}"


Fetched = dict[int, Document]  # entries by key, as read

# ---- models ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message in one inbox, under its sync key."""

    appid: int
    owner: str
    key: int
    msg: str
    cmd: int
    sender: int
    receiver: int
    timestamp: int
    content: str
    sender_appid: int | None = None
    receiver_appid: int | None = None

    @property
    def id(self) -> str:
        return entry_id(self.appid, self.owner, self.key)

    @classmethod
    def from_doc(cls, appid: int, owner: str, doc: Document) -> Entry:
        return cls(
            appid,
            owner,
            int(doc["key"]),
            str(doc["msg"]),
            int(doc["cmd"]),
            int(doc["sender"]),
            int(doc["receiver"]),
            int(doc["timestamp"]),
            str(doc["content"]),
            doc.get("sender_appid"),
            doc.get("receiver_appid"),
        )


@dataclass(slots=True)
class Post:
    """An accepted message: what it is, who gets it, and (once stored) its key in each inbox.

    ``members`` are a group message's members at posting, ``receivers`` a system message's,
    ``recipients`` a group notification's. ``plan`` is, per inbox, a key at or below the one
    the message gets there (where an append of it starts looking); ``keys`` are the keys it
    got."""

    id: str
    appid: int
    kind: str
    content: str
    timestamp: int
    created_at: datetime
    state: str = "pending"
    sender: int = 0
    receiver: int = 0
    gid: int = 0
    super: bool = False
    members: list[int] = field(default_factory=list)
    receivers: list[int] = field(default_factory=list)
    recipients: list[int] = field(default_factory=list)
    room: int = 0
    per_inbox: bool = False
    cause: str | None = None
    sender_appid: int = 0
    receiver_appid: int = 0
    receiver_key: int = 0
    plan: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)

    def doc(self) -> Document:
        doc: Document = {
            "_id": self.id,
            "appid": self.appid,
            "kind": self.kind,
            "state": self.state,
            "content": self.content,
            "timestamp": self.timestamp,
            "created_at": self.created_at,
        }
        kind = self.kind
        if kind in ("peer", "group", "room", "customer"):
            doc["sender"] = self.sender
        if kind in ("peer", "notification", "customer"):
            doc["receiver"] = self.receiver
        if kind in ("group", "group_notification"):
            doc |= {"gid": self.gid, "super": self.super}
        if kind == "group":
            doc["members"] = self.members
        if kind == "system":
            doc["receivers"] = self.receivers
        if kind == "group_notification":
            doc |= {"recipients": self.recipients, "per_inbox": self.per_inbox}
            doc["cause"] = self.cause
        if kind == "room":
            doc["room"] = self.room
        if kind == "customer":
            doc |= {
                "sender_appid": self.sender_appid,
                "receiver_appid": self.receiver_appid,
                "receiver_key": self.receiver_key,
            }
        if self.plan:
            doc["plan"] = self.plan
        if self.keys:
            doc["keys"] = self.keys
        return doc

    @classmethod
    def from_doc(cls, doc: Document) -> Post:
        return cls(
            id=str(doc["_id"]),
            appid=int(doc["appid"]),
            kind=str(doc["kind"]),
            content=str(doc["content"]),
            timestamp=int(doc["timestamp"]),
            created_at=doc["created_at"],
            state=str(doc.get("state", "pending")),
            sender=int(doc.get("sender", 0)),
            receiver=int(doc.get("receiver", 0)),
            gid=int(doc.get("gid", 0)),
            super=bool(doc.get("super", False)),
            members=[int(u) for u in doc.get("members", [])],
            receivers=[int(u) for u in doc.get("receivers", [])],
            recipients=[int(u) for u in doc.get("recipients", [])],
            room=int(doc.get("room", 0)),
            per_inbox=bool(doc.get("per_inbox", False)),
            cause=doc.get("cause"),
            sender_appid=int(doc.get("sender_appid", 0)),
            receiver_appid=int(doc.get("receiver_appid", 0)),
            receiver_key=int(doc.get("receiver_key", 0)),
            plan={str(k): int(v) for k, v in (doc.get("plan") or {}).items()},
            keys={str(k): int(v) for k, v in (doc.get("keys") or {}).items()},
        )


# ---- the repository -------------------------------------------------------------------------


class MessagesRepository:
    def __init__(self, db: Database) -> None:
        self.entries: Collection = db[ENTRIES]
        self.chunks: Collection = db[CHUNKS]
        self.counters: Collection = db[COUNTERS]
        self.sync_keys: Collection = db[SYNC_KEYS]
        self.pending: Collection = db[PENDING]
        self.posts: Collection = db[POSTS]
        # inbox ("<appid>:<owner>") -> a key such that every key below it is committed
        self._next: OrderedDict[str, int] = OrderedDict()
        self._appended: OrderedDict[str, dict[str, int]] = OrderedDict()  # appid:msg -> keys
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Background work, written in batches by ``flush``.
        self._hints: dict[str, int] = {}
        self._finished: dict[str, Document] = {}
        self._sealed: dict[str, Document] = {}
        # inbox -> the entries of its open chunk that this process stored one after another
        self._open: OrderedDict[str, list[Document]] = OrderedDict()
        self._recent: OrderedDict[str, list[Document]] = OrderedDict()  # chunk id -> entries
        self._flusher: asyncio.Task[None] | None = None

    # ---- appending ----

    async def plan(self, appid: int, owners: Iterable[str]) -> dict[str, int]:
        """For each inbox, a key at or below the next free one: where an append starts. From
        what this process knows, else from the inboxes' hints (one ``$in`` for all)."""
        plan: dict[str, int] = {}
        cold: list[str] = []
        for owner in owners:
            known = self._next.get(f"{appid}:{owner}")
            if known is None:
                cold.append(owner)
            else:
                plan[owner] = known
        if cold:
            hints = await by_ids(self.counters, [f"{appid}:{o}" for o in cold], {"seq": 1})
            for owner in cold:
                hint = hints.get(f"{appid}:{owner}")
                plan[owner] = int(hint.get("seq", 0)) + 1 if hint else 1
        return plan

    async def _hint(self, inbox: str) -> int:
        doc = await self.counters.find_one({"_id": inbox}, {"seq": 1})
        return int(doc.get("seq", 0)) if doc else 0

    async def append(
        self,
        appid: int,
        owners: Sequence[str],
        msg_id: str,
        fields: Document,
        plan: dict[str, int] | None = None,
    ) -> dict[str, int]:
        """Store one message in each inbox of ``owners``; returns each inbox's key. An inbox
        that already holds the message keeps it under its existing key (found at or after
        ``plan``'s key for that inbox, which must not be above it: see ``plan``).

        Appends to one inbox take turns within this process (a lock per inbox), so the usual
        append is one ``insert_many`` for all inboxes. A key another replica took shows up as
        a duplicate key: those inboxes are retried once at the following key, together, and
        then resolved by reading forward by ``_id`` from the plan."""
        owners = sorted(set(owners))
        if not owners:
            return {}
        known = dict(plan or {})
        unplanned = [o for o in owners if o not in known]
        if unplanned:
            known |= await self.plan(appid, unplanned)
        start = {owner: known[owner] for owner in owners}
        async with contextlib.AsyncExitStack() as held:
            for owner in owners:  # sorted: no two appends wait for each other in a cycle
                await held.enter_async_context(self._lock(f"{appid}:{owner}"))
            # Stored by this process already (e.g. an event delivered twice, both at once).
            done = self._appended.get(f"{appid}:{msg_id}", {})
            keys = {o: k for o, k in done.items() if o in start}
            todo = {
                o: max(start[o], self._next.get(f"{appid}:{o}", 0)) for o in owners if o not in keys
            }
            rounds = 0
            while todo:
                failed = await self._insert(appid, todo, msg_id, fields)
                keys |= {o: k for o, k in todo.items() if o not in failed}
                if not failed:
                    break
                rounds += 1
                if rounds > MAX_ROUNDS:
                    raise RuntimeError(f"no free key found for message {msg_id!r}")
                if rounds == 1:  # usually another replica's entry: the next key is free
                    todo = {o: todo[o] + 1 for o in failed}
                    continue
                found = await asyncio.gather(
                    *(self._walk(appid, o, start[o], todo[o], msg_id) for o in failed)
                )
                todo = {}
                for owner, (ours, key) in zip(failed, found, strict=True):
                    if ours:
                        keys[owner] = key
                    else:
                        todo[owner] = key
                        start[owner] = key  # everything below was read: not this message
            self._appended[f"{appid}:{msg_id}"] = keys
            self._appended.move_to_end(f"{appid}:{msg_id}")
            while len(self._appended) > APPENDED_SIZE:
                self._appended.popitem(last=False)
            for owner, key in keys.items():
                inbox = f"{appid}:{owner}"
                self._remember(inbox, key + 1)
                self._hints[inbox] = max(key, self._hints.get(inbox, 0))
                self._gather(inbox, {"key": key, "msg": msg_id, **fields})
        self._schedule()
        return keys

    async def append_batch(
        self, appid: int, items: Sequence[tuple[Sequence[str], str, Document]], plan: dict[str, int]
    ) -> dict[str, dict[str, int]]:
        """Store several messages in order, each in its inboxes (``(owners, msg_id, fields)``);
        returns each message's keys. The messages get consecutive keys in each inbox, written
        by one ordered insert (the store stops at the first refusal, as MongoDB does and
        Parley's FerretDB build does: see tools/ferretdb/build.sh). After a refusal (another
        replica's entry at a key, or a message stored before, e.g. a replay after a crash) the
        inboxes are read forward from the plan, ``PROBE_COLD`` keys per command, to find the
        messages already there and the first free keys, and the rest is inserted again.
        ``plan`` as for ``append``."""
        owners = sorted({o for item in items for o in item[0]})
        known = dict(plan)
        unplanned = [o for o in owners if o not in known]
        if unplanned:
            known |= await self.plan(appid, unplanned)
        keys: dict[str, dict[str, int]] = {msg_id: {} for _, msg_id, _ in items}
        wanted = {msg_id: sorted(set(o)) for o, msg_id, _ in items}
        async with contextlib.AsyncExitStack() as held:
            for owner in owners:
                await held.enter_async_context(self._lock(f"{appid}:{owner}"))
            nxt = {o: max(known[o], self._next.get(f"{appid}:{o}", 0)) for o in owners}
            cold = {o: k for o, k in nxt.items() if f"{appid}:{o}" not in self._next}
            if cold:
                nxt |= (await self._scan(appid, cold, set(), PROBE_COLD))[0]
            for _ in range(MAX_BATCH_ROUNDS):
                docs: list[Document] = []
                for _, msg_id, fields in items:
                    for owner in wanted[msg_id]:
                        if owner not in keys[msg_id]:
                            docs.append(self._entry_doc(appid, owner, nxt[owner], msg_id, fields))
                            nxt[owner] += 1
                written = await self._insert_ordered(docs)
                for doc in docs[:written]:
                    self._stored(appid, doc)
                    keys[doc["msg"]][doc["owner"]] = doc["key"]
                if written == len(docs):
                    break
                missing = {m for m, done in keys.items() if len(done) < len(wanted[m])}
                starts = {o: known[o] for m in missing for o in wanted[m] if o not in keys[m]}
                nxt_found, located = await self._scan(appid, starts, missing, PROBE_COLD)
                nxt |= nxt_found
                for (owner, msg_id), key in located.items():
                    keys[msg_id][owner] = key
                    self._remember(f"{appid}:{owner}", key + 1)
            for msg_id, done in keys.items():
                self._appended[f"{appid}:{msg_id}"] = done
                self._appended.move_to_end(f"{appid}:{msg_id}")
            while len(self._appended) > APPENDED_SIZE:
                self._appended.popitem(last=False)
        self._schedule()
        for item_owners, msg_id, fields in items:  # still refused (heavy contention): singly
            if len(keys[msg_id]) < len(wanted[msg_id]):
                keys[msg_id] = await self.append(appid, item_owners, msg_id, fields, known)
        return keys

    @staticmethod
    def _entry_doc(appid: int, owner: str, key: int, msg_id: str, fields: Document) -> Document:
        return {
            "_id": entry_id(appid, owner, key),
            "appid": appid,
            "owner": owner,
            "key": key,
            "msg": msg_id,
            **fields,
        }

    def _stored(self, appid: int, doc: Document) -> None:
        """Bookkeeping for an entry this process has just stored."""
        inbox = f"{appid}:{doc['owner']}"
        key = int(doc["key"])
        self._remember(inbox, key + 1)
        self._hints[inbox] = max(key, self._hints.get(inbox, 0))
        self._gather(inbox, {k: v for k, v in doc.items() if k not in ("_id", "appid", "owner")})

    async def _scan(
        self, appid: int, starts: dict[str, int], msgs: set[str], window: int
    ) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """Read each inbox forward from its start to its first free key (keys are dense),
        ``window`` keys of every inbox per command: (the first free keys, where each of
        ``msgs`` was found, by (inbox, msg))."""
        free = dict(starts)
        located: dict[tuple[str, str], int] = {}
        todo = dict(starts)
        fields = {"msg": 1} if msgs else {"_id": 1}
        while todo:
            ids = [entry_id(appid, o, k) for o, s in todo.items() for k in range(s, s + window)]
            found = await by_ids(self.entries, ids, fields)
            more: dict[str, int] = {}
            for owner, start in todo.items():
                key = start
                while key < start + window and (doc := found.get(entry_id(appid, owner, key))):
                    if doc.get("msg") in msgs:
                        located[(owner, str(doc["msg"]))] = key
                    key += 1
                free[owner] = key
                if key == start + window:
                    more[owner] = key
            todo = more
        return free, located

    async def _insert_ordered(self, docs: list[Document]) -> int:
        """Insert ``docs`` in order, stopping at the first duplicate key; returns how many
        were written (a prefix). Batches stay below the store's command size."""
        written = 0
        for start in range(0, len(docs), INSERT_BATCH):
            part = docs[start : start + INSERT_BATCH]
            try:
                await self.entries.insert_many(part, ordered=True)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                return written + int(errors[0]["index"])
            written += len(part)
        return written

    def _gather(self, inbox: str, entry: Document) -> None:
        """Keep the entries this process stores one after another in an inbox's open chunk;
        once it holds the whole chunk, its copy is written in the background (so readers
        seldom have to make it)."""
        key = entry["key"]
        if key % CHUNK == 1:
            run = [entry]
        else:
            run = self._open.pop(inbox, [])
            if run and key <= run[-1]["key"]:  # found stored again (a retry): held already
                self._open[inbox] = run
                return
            if not run or run[-1]["key"] != key - 1:
                return  # another replica stored some: the first reader makes the copy
            run.append(entry)
        if len(run) == CHUNK:
            chunk_id = f"{inbox}:{key // CHUNK - 1}"
            self._sealed[chunk_id] = {"_id": chunk_id, "entries": run}
            self._keep_chunk(chunk_id, run)
            return
        self._open[inbox] = run
        while len(self._open) > OPEN_CHUNKS:
            self._open.popitem(last=False)

    async def _insert(
        self, appid: int, keys: dict[str, int], msg_id: str, fields: Document
    ) -> list[str]:
        """Insert the entries; returns the inboxes whose insert met a duplicate key."""
        owners = list(keys)
        docs = [
            {
                "_id": entry_id(appid, owner, keys[owner]),
                "appid": appid,
                "owner": owner,
                "key": keys[owner],
                "msg": msg_id,
                **fields,
            }
            for owner in owners
        ]
        try:
            await self.entries.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            failed: list[str] = []
            for error in exc.details.get("writeErrors", []):
                if error.get("code") != DUPLICATE_KEY:
                    raise
                failed.append(owners[error["index"]])
            return failed
        return []

    async def _walk(
        self, appid: int, owner: str, start: int, refused: int, msg_id: str
    ) -> tuple[bool, int]:
        """(True, key) if the inbox holds ``msg_id`` at or after ``start``, else (False, the
        first free key). Keys are dense, so the message, if stored at or after ``start``,
        comes before the first free key. ``refused`` is the key whose insert was just refused:
        if it is free, the refusal came from the message being stored below ``start`` (only
        a post written by an older version, which recorded no plan): found by its ``msg``."""
        key = start
        while True:  # PROBE_COLD keys per command
            ids = [entry_id(appid, owner, k) for k in range(key, key + PROBE_COLD)]
            found = await by_ids(self.entries, ids, {"msg": 1})
            for doc_id in ids:
                doc = found.get(doc_id)
                if doc is None:
                    break
                if doc.get("msg") == msg_id:
                    return True, key
                key += 1
            else:
                continue
            break
        if key != refused:
            return False, key
        log.warning("message stored below its plan; looking it up", msg=msg_id, owner=owner)
        mine = await self.entries.find_one(
            {"appid": appid, "owner": owner, "msg": msg_id}, {"key": 1}
        )
        if mine is None:
            return False, key
        return True, int(mine["key"])

    def _lock(self, inbox: str) -> asyncio.Lock:
        lock = self._locks.get(inbox)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[inbox] = lock
        return lock

    def _remember(self, inbox: str, next_key: int) -> None:
        self._next[inbox] = max(next_key, self._next.get(inbox, 0))
        self._next.move_to_end(inbox)
        while len(self._next) > KEY_CACHE_SIZE:
            self._next.popitem(last=False)

    # ---- reading ----

    async def last_key(self, appid: int, owner: str) -> int:
        """The inbox's last committed key (0: empty), in one command when this process knows
        the inbox (two when it starts from the hint)."""
        last, _ = await self._tail(appid, owner, entries=False)
        return last

    async def _tail(self, appid: int, owner: str, *, entries: bool) -> tuple[int, Fetched]:
        """(the last committed key, the entries read on the way). From what this process knows
        or the hint, the keys after it are read by ``_id`` (``PROBE`` or ``PROBE_COLD`` at a
        time) up to the first missing one; with ``entries``, the same command also reads the
        open chunk's entries below that point which this process does not hold (a history
        needs them)."""
        inbox = f"{appid}:{owner}"
        start = self._next.get(inbox)
        probe = PROBE
        if start is None:
            start, probe = await self._hint(inbox) + 1, PROBE_COLD
        lo = start
        if entries:
            first = (start - 1) // CHUNK * CHUNK + 1  # the chunk the next key falls in
            run = self._open.get(inbox) or []
            held = run[-1]["key"] if run and run[0]["key"] == first else first - 1
            lo = min(start, held + 1)
        fields = None if entries else {"_id": 1}
        fetched: Fetched = {}
        hi = start + probe
        while True:
            ids = [entry_id(appid, owner, k) for k in range(lo, hi)]
            for doc_id, doc in (await by_ids(self.entries, ids, fields)).items():
                fetched[int(doc_id.rpartition(":")[2])] = doc
            key = start
            while key in fetched:
                key += 1
            if key < hi:
                break
            lo, start, hi = hi, key, key + CHUNK  # more than a probe's worth is new
        self._remember(inbox, key)
        return key - 1, fetched if entries else {}

    async def page(self, appid: int, owner: str, after: int, limit: int) -> list[Entry]:
        """Entries with key > ``after``, oldest first, up to ``limit``, stopping at a gap."""
        last, fetched = await self._tail(appid, owner, entries=True)
        if last <= after or limit <= 0:
            return []
        return await self._range(appid, owner, after + 1, min(after + limit, last), last, fetched)

    async def latest(self, appid: int, owner: str, cmds: Sequence[int], limit: int) -> list[Entry]:
        """The newest ``limit`` entries of the given kinds, oldest first: a chunk-aligned
        range from the last key down, in whole chunks, widened while kinds not wanted leave
        fewer than ``limit``."""
        last, fetched = await self._tail(appid, owner, entries=True)
        wanted = set(cmds)
        found: list[Entry] = []
        hi = last
        while hi > 0 and len(found) < limit:
            # Enough keys for what is missing if they are all of the wanted kinds, in whole
            # chunks (the one holding the last key may be partial).
            lo = max(1, (hi - (limit - len(found))) // CHUNK * CHUNK + 1)
            part = await self._range(appid, owner, lo, hi, last, fetched)
            found.extend(e for e in reversed(part) if e.cmd in wanted)
            hi = lo - 1
        return found[:limit][::-1]

    async def _range(
        self, appid: int, owner: str, lo: int, hi: int, last: int, fetched: Fetched
    ) -> list[Entry]:
        """Entries ``lo`` .. ``hi`` (all committed: ``hi <= last``), stopping at a missing
        one. Complete chunks come from this process's recent chunks or their copies (one
        ``$in`` for all of them), the open chunk from what this process stored or ``fetched``,
        then single entries (one ``$in``). Entries never change, so what is held is what is
        stored."""
        inbox = f"{appid}:{owner}"
        docs: dict[int, Document] = dict(fetched)
        complete: list[int] = []
        for n in range((lo - 1) // CHUNK, (hi - 1) // CHUNK + 1):
            first, end = n * CHUNK + 1, (n + 1) * CHUNK
            if end <= last:
                kept = self._recent.get(f"{inbox}:{n}")
                if kept is not None:
                    docs.update((int(e["key"]), e) for e in kept)
                elif any(k not in docs for k in range(max(first, lo), min(end, hi) + 1)):
                    complete.append(n)
                continue
            run = self._open.get(inbox, [])
            if run and run[0]["key"] == first:
                docs.update((int(e["key"]), e) for e in run)
        if complete:
            await self._chunks(appid, owner, complete, docs)
        missing = [k for k in range(lo, hi + 1) if k not in docs]
        if missing:
            read = await by_ids(self.entries, [entry_id(appid, owner, k) for k in missing])
            docs.update((int(d["key"]), d) for d in read.values())
        out: list[Entry] = []
        for key in range(lo, hi + 1):
            doc = docs.get(key)
            if doc is None:
                break
            out.append(Entry.from_doc(appid, owner, doc))
        return out

    async def _chunks(
        self, appid: int, owner: str, numbers: list[int], docs: dict[int, Document]
    ) -> None:
        """Add the entries of complete chunks ``numbers`` to ``docs``: from their copies (one
        ``$in``), and the copies missing made now from the entries (one ``$in``, one insert)."""
        inbox = f"{appid}:{owner}"
        copies = await by_ids(self.chunks, [f"{inbox}:{n}" for n in numbers])
        absent: list[int] = []
        for n in numbers:
            copy = copies.get(f"{inbox}:{n}")
            if copy is None:
                absent.append(n)
                continue
            self._keep_chunk(f"{inbox}:{n}", copy["entries"])
            docs.update((int(e["key"]), e) for e in copy["entries"])
        if not absent:
            return
        keys = [k for n in absent for k in range(n * CHUNK + 1, (n + 1) * CHUNK + 1)]
        read = await by_ids(self.entries, [entry_id(appid, owner, k) for k in keys])
        by_key = {int(d["key"]): d for d in read.values()}
        made: list[Document] = []
        for n in absent:
            entries = [by_key.get(k) for k in range(n * CHUNK + 1, (n + 1) * CHUNK + 1)]
            kept = [
                {k: v for k, v in d.items() if k not in ("_id", "appid", "owner")}
                for d in entries
                if d is not None
            ]
            docs.update((int(e["key"]), e) for e in kept)
            if len(kept) == CHUNK:  # all committed (the caller knows): made once, by insert
                made.append({"_id": f"{inbox}:{n}", "entries": kept})
                self._keep_chunk(f"{inbox}:{n}", kept)
        if made:
            with contextlib.suppress(BulkWriteError):  # another reader made some: the same
                await self.chunks.insert_many(made, ordered=False)

    def _keep_chunk(self, chunk_id: str, entries: list[Document]) -> None:
        self._recent[chunk_id] = entries
        self._recent.move_to_end(chunk_id)
        while len(self._recent) > RECENT_CHUNKS:
            self._recent.popitem(last=False)

    async def sync_key(self, appid: int, owner: str) -> int:
        doc = await self.sync_keys.find_one({"_id": f"{appid}:{owner}"}, {"key": 1})
        return int(doc.get("key", 0)) if doc else 0

    async def count_after_sync_key(self, appid: int, owner: str) -> int:
        """Keys are dense: the entries after the acknowledged key are the last key minus it."""
        sync_key, last = await asyncio.gather(
            self.sync_key(appid, owner), self.last_key(appid, owner)
        )
        return max(0, last - sync_key)

    async def set_sync_key(self, appid: int, owner: str, key: int) -> None:
        """Monotonic: a smaller key than the stored one changes nothing (wire protocol §6.4).
        The acknowledgements of one inbox take turns within this process."""
        inbox = f"{appid}:{owner}"
        async with self._lock(f"{inbox}:sync"):
            await self._raise_sync_key(inbox, key)

    async def _raise_sync_key(self, inbox: str, key: int) -> None:
        for _ in range(3):
            try:
                await self.sync_keys.update_one({"_id": inbox}, {"$max": {"key": key}}, upsert=True)
                return
            except DuplicateKeyError:
                continue  # two first acknowledgements raced to create it: now an update

    # ---- accepted messages ----

    async def insert_pending(self, post: Post) -> Post | None:
        """Record a message in flight; returns the pending post already there under its id."""
        try:
            await self.pending.insert_one(post.doc())
            return None
        except DuplicateKeyError:
            doc = await self.pending.find_one({"_id": post.id})
            return Post.from_doc(doc) if doc else None

    async def done_posts(self, post_ids: Sequence[str]) -> set[str]:
        """Which of the posts are done (one ``$in``)."""
        found = await by_ids(self.posts, post_ids, {"state": 1})
        return {i for i, doc in found.items() if doc.get("state") == "done"}

    async def insert_pending_many(self, posts: Sequence[Post]) -> dict[str, Post]:
        """Record several messages in flight; returns those already there, by id."""
        try:
            await self.pending.insert_many([p.doc() for p in posts], ordered=False)
            return {}
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            ids = [posts[e["index"]].id for e in errors]
        found = await by_ids(self.pending, ids)
        return {i: Post.from_doc(doc) for i, doc in found.items()}

    async def done_post(self, post_id: str) -> Post | None:
        """The post if it is done (stored everywhere and announced)."""
        doc = await self.posts.find_one({"_id": post_id})
        if doc is None or doc.get("state") != "done":
            return None
        return Post.from_doc(doc)

    async def finish(self, post: Post, *, now: bool = False) -> None:
        """Record ``post`` as done and take it off the pending list: in the next background
        batch, or ``now``."""
        post.state = "done"
        doc = post.doc()
        doc.pop("plan", None)
        if now:
            await self._write_finished({post.id: doc})
            return
        self._finished[post.id] = doc
        self._schedule()

    async def finish_now(self, posts: Sequence[Post]) -> None:
        """Record ``posts`` as done and take them off the pending list, now."""
        finished: dict[str, Document] = {}
        for post in posts:
            post.state = "done"
            doc = post.doc()
            doc.pop("plan", None)
            finished[post.id] = doc
        if finished:
            await self._write_finished(finished)

    def finishing(self, post_id: str) -> bool:
        return post_id in self._finished

    async def pending_posts(self, older_than: datetime) -> list[Post]:
        """Posts in flight for longer than the grace period (a small collection)."""
        docs = (
            await self.pending.find({"created_at": {"$lt": older_than}})
            .limit(PENDING_BATCH)
            .to_list()
        )
        return sorted((Post.from_doc(d) for d in docs), key=lambda p: p.created_at)

    # ---- background batches ----

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            # A context of its own: these commands belong to no request.
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_soon(), name="messages-flush", context=contextvars.Context()
            )

    async def _flush_soon(self) -> None:
        while self._hints or self._finished or self._sealed:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # hints are hints; an unfinished post is recovered
                log.warning("messages background write failed", error=repr(exc))
            stop_if_cancelled()

    async def flush(self) -> None:
        """Write what the background owes now: finished posts, chunk copies, hints."""
        finished, self._finished = self._finished, {}
        hints, self._hints = self._hints, {}
        sealed, self._sealed = self._sealed, {}
        if finished:
            await self._write_finished(finished)
        if sealed:
            with contextlib.suppress(BulkWriteError):  # a reader made some copies first
                await self.chunks.insert_many(list(sealed.values()), ordered=False)
        items = list(hints.items())
        for start in range(0, len(items), WRITE_BATCH):
            await self._raise_hints(items[start : start + WRITE_BATCH])

    async def close(self) -> None:
        """Write what is owed and stop the background task."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush()

    async def _write_finished(self, finished: dict[str, Document]) -> None:
        # The log first, then the pending list: a post is never in neither.
        docs = list(finished.values())
        try:
            await self.posts.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            for error in errors:  # logged before (a replay) or by an older version: replace
                doc = docs[error["index"]]
                await self.posts.replace_one({"_id": doc["_id"]}, doc)
        ids = list(finished)
        for start in range(0, len(ids), WRITE_BATCH):
            await self.pending.bulk_write(
                [DeleteOne({"_id": i}) for i in ids[start : start + WRITE_BATCH]], ordered=False
            )

    async def _raise_hints(self, items: list[tuple[str, int]]) -> None:
        batch = [
            UpdateOne({"_id": inbox}, {"$max": {"seq": key}}, upsert=True) for inbox, key in items
        ]
        for _ in range(3):
            if not batch:
                return
            try:
                await self.counters.bulk_write(batch, ordered=False)
                return
            except BulkWriteError as exc:
                # Two first raises of one hint raced to create it: retry those (now updates).
                errors = exc.details.get("writeErrors", [])
                if any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                batch = [batch[e["index"]] for e in errors]

    # ---- the previous schema ----

    async def migrate(self) -> None:
        """Bring data the previous version wrote to this one's shapes, once (idempotent, and
        harmless when several replicas start together): its pending posts (kept in
        ``messages_posts`` with ``state: pending``) join the pending list, and its
        acknowledged sync keys (kept in the counters) move to ``messages_sync_keys``. These
        two reads scan their collections: they run once per database, at startup."""
        # Each collection exists before traffic: FerretDB creates one on its first write, and
        # many first writes at once (e.g. the chunks of a first history read) stall it.
        existing = set(await self.counters.database.list_collection_names())
        for name in INDEXES:
            if name not in existing:
                with contextlib.suppress(CollectionInvalid):
                    await self.counters.database.create_collection(name)
        marker = await self.counters.find_one({"_id": SCHEMA_ID})
        if marker is not None and int(marker.get("version", 0)) >= SCHEMA_VERSION:
            return
        moved = 0
        async for doc in self.posts.find({"state": "pending"}):
            with contextlib.suppress(DuplicateKeyError):
                await self.pending.insert_one(doc)
                moved += 1
        synced = 0
        async for doc in self.counters.find({"sync_key": {"$gt": 0}}, {"sync_key": 1}):
            await self._raise_sync_key(str(doc["_id"]), int(doc["sync_key"]))
            synced += 1
        with contextlib.suppress(DuplicateKeyError):
            await self.counters.update_one(
                {"_id": SCHEMA_ID}, {"$set": {"version": SCHEMA_VERSION}}, upsert=True
            )
        log.info("messages storage migrated", pending_posts=moved, sync_keys=synced)


def keys_of(keys: dict[str, int], prefix: str = "u:") -> list[dict[str, Any]]:
    return [
        {"uid": int(owner[len(prefix) :]), "key": key}
        for owner, key in sorted(keys.items())
        if owner.startswith(prefix)
    ]
