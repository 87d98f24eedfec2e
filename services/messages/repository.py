"""The messages service's collections: inboxes and super-group queues with sync keys, and the
accepted-message log.

* ``messages_entries``: one document per stored message per inbox. An inbox is a user's
  (owner ``u:<uid>``) or a super group's queue (owner ``g:<gid>``), always within an appid::

      {_id: "<appid>:<owner>:<key>", appid, owner, key, msg, cmd, sender, receiver,
       content, timestamp[, sender_appid, receiver_appid]}

  **Sync keys are dense and commit-ordered** (DESIGN invariant 3): an entry is inserted under
  key k only after entry k-1 of the same inbox is committed (k = the inbox counter + 1, or the
  next key after a duplicate-key refusal), and ``_id`` makes each key unique. So a reader that
  has everything up to K can never later find a new entry at or below K, however many
  replicas write. Readers also stop at the first gap, so even a read that raced a writer
  returns a committed prefix. ``msg`` (unique per inbox) makes every append idempotent.
* ``messages_counters``: ``{_id: "<appid>:<owner>", seq, sync_key}``. ``seq`` is a hint (the
  highest key known committed), raised with ``$max`` after each append; ``sync_key`` is the
  position a delivery server last acknowledged for the user (0: none).
* ``messages_posts``: every accepted message, first as ``pending`` (the intent, with its
  recipients), then ``done`` with its keys once its ``message.*`` event is confirmed by the
  broker. A pending post *is* the message's outbox: one left by a crash or a broker outage is
  completed (stored again idempotently, announced under the same event id) by the recovery
  loop of any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pymongo import IndexModel, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from shared.mongo import Collection, Database, Document

ENTRIES = "messages_entries"
COUNTERS = "messages_counters"
POSTS = "messages_posts"

INDEXES: dict[str, list[IndexModel]] = {
    ENTRIES: [
        IndexModel([("appid", 1), ("owner", 1), ("msg", 1)], unique=True, name="inbox_msg"),
        IndexModel([("appid", 1), ("owner", 1), ("key", 1)], name="inbox_key"),
    ],
    COUNTERS: [],
    POSTS: [IndexModel([("state", 1), ("created_at", 1)], name="pending")],
}

DUPLICATE_KEY = 11000
COUNTER_STRIDE = 16
UPDATE_BATCH = 50
KEY_CACHE_SIZE = 100_000


def user_inbox(uid: int) -> str:
    return f"u:{uid}"


def group_queue(gid: int) -> str:
    return f"g:{gid}"


class MessagesRepository:
    def __init__(self, db: Database) -> None:
        self.entries: Collection = db[ENTRIES]
        self.counters: Collection = db[COUNTERS]
        self.posts: Collection = db[POSTS]
        self._next: OrderedDict[str, int] = OrderedDict()  # inbox -> the next key to try
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # ---- appending ----

    async def append(
        self, appid: int, owners: Sequence[str], msg_id: str, fields: Document
    ) -> dict[str, int]:
        """Store one message in each inbox of ``owners``; returns each inbox's key. Appending
        a message an inbox already holds returns its existing key.

        Within this process, appends to one inbox take turns (a lock per inbox) and the next
        key is remembered, so the usual append is one ``insert_many`` for all inboxes. Other
        replicas' appends show up as duplicate keys, resolved by ``_append_after``."""
        owners = sorted(set(owners))
        if not owners:
            return {}
        inboxes = [f"{appid}:{owner}" for owner in owners]
        async with contextlib.AsyncExitStack() as held:
            for inbox in inboxes:  # sorted: no two appends wait for each other in a cycle
                await held.enter_async_context(self._lock(inbox))
            first = await self._next_keys(inboxes)
            docs = [
                self._entry(appid, owner, first[inbox], msg_id, fields)
                for owner, inbox in zip(owners, inboxes, strict=True)
            ]
            retry: list[int] = []
            try:
                await self.entries.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                for error in exc.details.get("writeErrors", []):
                    if error.get("code") != DUPLICATE_KEY:
                        raise
                    retry.append(error["index"])
            keys = {owner: first[inbox] for owner, inbox in zip(owners, inboxes, strict=True)}
            for index in retry:
                keys[owners[index]] = await self._append_after(
                    appid, owners[index], first[inboxes[index]], msg_id, fields
                )
            for owner, inbox in zip(owners, inboxes, strict=True):
                self._remember(inbox, max(keys[owner] + 1, self._next.get(inbox, 0)))
            # The counters are a starting point for cold processes: kept within a few keys.
            stale = {
                owner: key
                for index, (owner, key) in enumerate(keys.items())
                if index in retry or key % COUNTER_STRIDE == 0
            }
            await self._raise_counters(appid, stale)
        return keys

    def _lock(self, inbox: str) -> asyncio.Lock:
        lock = self._locks.get(inbox)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[inbox] = lock
        return lock

    def _remember(self, inbox: str, next_key: int) -> None:
        self._next[inbox] = next_key
        self._next.move_to_end(inbox)
        while len(self._next) > KEY_CACHE_SIZE:
            self._next.popitem(last=False)

    async def _next_keys(self, inboxes: list[str]) -> dict[str, int]:
        keys = {inbox: self._next[inbox] for inbox in inboxes if inbox in self._next}
        cold = [inbox for inbox in inboxes if inbox not in keys]
        if cold:
            seqs = {
                doc["_id"]: int(doc.get("seq", 0))
                async for doc in self.counters.find({"_id": {"$in": cold}}, {"seq": 1})
            }
            keys |= {inbox: seqs.get(inbox, 0) + 1 for inbox in cold}
        return keys

    async def _raise_counters(self, appid: int, keys: dict[str, int]) -> None:
        updates = [
            UpdateOne({"_id": f"{appid}:{owner}"}, {"$max": {"seq": key}}, upsert=True)
            for owner, key in keys.items()
        ]
        # In small batches: FerretDB 1.24 (SQLite) stops answering altogether when one
        # update command carries 100 or more updates of existing documents.
        for start in range(0, len(updates), UPDATE_BATCH):
            batch = updates[start : start + UPDATE_BATCH]
            for _ in range(3):
                if not batch:
                    break
                try:
                    await self.counters.bulk_write(batch, ordered=False)
                    break
                except BulkWriteError as exc:
                    # Two first appends raced to create a counter: retry those (now updates).
                    errors = exc.details.get("writeErrors", [])
                    if any(e.get("code") != DUPLICATE_KEY for e in errors):
                        raise
                    batch = [batch[e["index"]] for e in errors]

    async def _append_after(
        self, appid: int, owner: str, key: int, msg_id: str, fields: Document
    ) -> int:
        """``key`` was taken: store after the inbox's last entry, unless it holds ``msg_id``.
        Entries at and above ``key`` are all committed (keys are dense), so the one after the
        last of them is the next free key."""
        while True:
            mine = await self.entries.find_one(
                {"appid": appid, "owner": owner, "msg": msg_id}, {"key": 1}
            )
            if mine is not None:  # stored before (a retried or recovered message)
                return int(mine["key"])
            last = (
                await self.entries.find(
                    {"appid": appid, "owner": owner, "key": {"$gte": key}}, {"key": 1}
                )
                .sort("key", -1)
                .limit(1)
                .to_list()
            )
            if last:
                key = int(last[0]["key"]) + 1
            try:
                await self.entries.insert_one(self._entry(appid, owner, key, msg_id, fields))
                return key
            except DuplicateKeyError:
                continue  # another replica took it meanwhile: look again

    @staticmethod
    def _entry(appid: int, owner: str, key: int, msg_id: str, fields: Document) -> Document:
        return {
            "_id": f"{appid}:{owner}:{key}",
            "appid": appid,
            "owner": owner,
            "key": key,
            "msg": msg_id,
            **fields,
        }

    # ---- reading ----

    async def page(self, appid: int, owner: str, after: int, limit: int) -> list[Document]:
        """Entries with key > ``after``, oldest first, up to ``limit``, stopping at a gap."""
        docs = (
            await self.entries.find({"appid": appid, "owner": owner, "key": {"$gt": after}})
            .sort("key", 1)
            .limit(limit)
            .to_list()
        )
        contiguous: list[Document] = []
        expected = after + 1
        for doc in docs:
            if doc["key"] != expected:
                break
            contiguous.append(doc)
            expected += 1
        return contiguous

    async def latest(
        self, appid: int, owner: str, cmds: Sequence[int], limit: int
    ) -> list[Document]:
        """The newest ``limit`` entries of the given kinds, oldest first."""
        docs = (
            await self.entries.find({"appid": appid, "owner": owner, "cmd": {"$in": list(cmds)}})
            .sort("key", -1)
            .limit(limit)
            .to_list()
        )
        return docs[::-1]

    async def count_after_sync_key(self, appid: int, owner: str) -> int:
        counter = await self.counters.find_one({"_id": f"{appid}:{owner}"}, {"sync_key": 1})
        sync_key = int(counter.get("sync_key", 0)) if counter else 0
        return await self.entries.count_documents(
            {"appid": appid, "owner": owner, "key": {"$gt": sync_key}}
        )

    async def set_sync_key(self, appid: int, owner: str, key: int) -> None:
        """Monotonic: a smaller key than the stored one changes nothing (wire protocol §6.4)."""
        await self.counters.update_one(
            {"_id": f"{appid}:{owner}"}, {"$max": {"sync_key": key}}, upsert=True
        )

    # ---- accepted messages ----

    async def insert_post(self, post: Document) -> Document | None:
        """Record an accepted message; returns the existing post if ``_id`` is taken."""
        try:
            await self.posts.insert_one(post)
            return None
        except DuplicateKeyError:
            return await self.posts.find_one({"_id": post["_id"]})

    async def finish_post(self, post_id: str, keys: dict[str, int]) -> None:
        """Mark a post done: stored everywhere and announced."""
        await self.posts.update_one(
            {"_id": post_id, "state": "pending"}, {"$set": {"state": "done", "keys": keys}}
        )

    async def pending_posts(self, older_than: datetime) -> list[Document]:
        return (
            await self.posts.find({"state": "pending", "created_at": {"$lt": older_than}})
            .sort("created_at", 1)
            .limit(1000)
            .to_list()
        )

    async def get_post(self, post_id: str) -> Document | None:
        return await self.posts.find_one({"_id": post_id})


def keys_of(keys: dict[str, int], prefix: str = "u:") -> list[dict[str, Any]]:
    return [
        {"uid": int(owner[len(prefix) :]), "key": key}
        for owner, key in sorted(keys.items())
        if owner.startswith(prefix)
    ]
