"""Unique numeric ids (group ids, appids, customer client ids) from blocks claimed by insert.

A counter kept with ``$inc`` is not safe on the local store: FerretDB 1.24 applies an update by
reading the document and writing it back, so concurrent increments hand out the same number.
Inserting a document with a unique ``_id`` *is* atomic on every store, so ids come in blocks:
block ``b`` of counter ``name`` is owned by whoever inserts ``{_id: "<name>:<b>"}``, and that
process hands out its ids ``start + b*size + 1 .. start + (b+1)*size`` one by one. A hint
document ``{_id: "<name>", block}`` says where to start looking; it may lag (it is raised with a
non-atomic ``$max``), which only costs a few refused inserts, never a duplicate.

Ids are unique but not dense: a process that stops with part of a block unused leaves a gap.
The hint document of the older ``$inc`` counters (``{_id: name, seq}``) is read too, so ids
continue above any id such a counter handed out.
"""

from __future__ import annotations

import asyncio
import contextlib

from pymongo.errors import DuplicateKeyError

from shared.mongo import Collection


class IdBlocks:
    def __init__(self, collection: Collection, name: str, *, size: int = 16, start: int = 0):
        if size < 1:
            raise ValueError("block size must be at least 1")
        self._collection = collection
        self._name = name
        self._size = size
        self._start = start
        self._next = 0
        self._end = 0  # exclusive: no ids held when _next == _end
        self._lock = asyncio.Lock()

    async def next_id(self) -> int:
        """A number no other caller of this counter, in any process, ever gets."""
        async with self._lock:
            if self._next >= self._end:
                block = await self._claim_block()
                self._next = self._start + block * self._size + 1
                self._end = self._next + self._size
            value = self._next
            self._next += 1
            return value

    async def _claim_block(self) -> int:
        hint = await self._collection.find_one({"_id": self._name})
        block = 0
        if hint is not None:
            # ``seq``: the last id an earlier ``$inc`` counter handed out (ids start + seq).
            legacy = -(-int(hint.get("seq", 0)) // self._size)
            block = max(int(hint.get("block", 0)), legacy)
        while True:
            try:
                await self._collection.insert_one({"_id": f"{self._name}:{block}"})
            except DuplicateKeyError:
                block += 1
                continue
            break
        with contextlib.suppress(DuplicateKeyError):  # two first claims raced to create it
            await self._collection.update_one(
                {"_id": self._name}, {"$max": {"block": block + 1}}, upsert=True
            )
        return block
