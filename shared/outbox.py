"""The embedded outbox: a committed change always gets its event (DESIGN invariant 1).

There are no multi-document transactions, so an event rides in the *same single-document
write* as the change it announces: ``with_outbox`` adds ``outbox.<event_id>`` (the encoded event)
and increments ``outbox_n``. After the write, ``deliver`` publishes each event with a broker
confirm and then clears its entry, conditionally, so a concurrent clear cannot double-count. If
the process dies or the publish fails in between, the ``OutboxRelay`` of any replica finds the
document (``outbox_n > 0``, indexed) and republishes the leftovers: duplicates are possible,
loss is not. Consumers deduplicate by ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
from pymongo import IndexModel

from shared.bus import Bus
from shared.events import Event, utcnow
from shared.metrics import OUTBOX_BACKLOG, OUTBOX_REPUBLISHED
from shared.mongo import Collection, Document
from shared.revlog import RevLog

log = structlog.get_logger("parley.outbox")

OUTBOX_INDEX = IndexModel([("outbox_n", 1)], name="outbox_pending")
RELAY_BATCH = 1000


def _entries(events: Sequence[Event], request_id: str) -> dict[str, Document]:
    now = utcnow()
    return {
        event.event_id: {
            "rk": event.routing_key,
            "body": event.to_json().decode(),
            "at": now,
            "rid": request_id,
        }
        for event in events
    }


def with_outbox(
    update: dict[str, Any], events: Sequence[Event], request_id: str = ""
) -> dict[str, Any]:
    """Return ``update`` with the events' outbox entries added to its ``$set`` and ``$inc``."""
    merged = {op: dict(fields) for op, fields in update.items()}
    sets = merged.setdefault("$set", {})
    incs = merged.setdefault("$inc", {})
    for event_id, entry in _entries(events, request_id).items():
        sets[f"outbox.{event_id}"] = entry
    incs["outbox_n"] = incs.get("outbox_n", 0) + len(events)
    return merged


def new_with_outbox(document: Document, events: Sequence[Event], request_id: str = "") -> Document:
    """A new document (for ``insert_one``) carrying the events in its outbox."""
    return {**document, "outbox": _entries(events, request_id), "outbox_n": len(events)}


async def _publish_entry(
    collection: Collection, doc_id: Any, event_id: str, entry: Document, bus: Bus
) -> bool:
    headers = {"request_id": entry["rid"]} if entry.get("rid") else {}
    await bus.publish(entry["rk"], entry["body"].encode(), message_id=event_id, headers=headers)
    result = await collection.update_one(
        {"_id": doc_id, f"outbox.{event_id}": {"$exists": True}},
        {"$unset": {f"outbox.{event_id}": ""}, "$inc": {"outbox_n": -1}},
    )
    return result.modified_count == 1


async def deliver(
    collection: Collection,
    doc_id: Any,
    events: Sequence[Event],
    bus: Bus | None,
    request_id: str = "",
) -> None:
    """Publish events just written with ``with_outbox`` and clear them. Never raises for a
    broker failure: the write is durable and the relay will publish later. Without a bus (a
    management command), the relay of a running service publishes them."""
    if bus is None:
        return
    for event in events:
        entry = {"rk": event.routing_key, "body": event.to_json().decode(), "rid": request_id}
        try:
            await _publish_entry(collection, doc_id, event.event_id, entry, bus)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "publish failed; the outbox relay will retry",
                event_id=event.event_id,
                routing_key=event.routing_key,
                error=repr(exc),
            )
            return


class OutboxRelay:
    """Republishes outbox entries older than ``grace`` seconds, every ``interval`` seconds,
    and settles the pending revisions of the given logs (``shared/revlog.py``)."""

    def __init__(
        self,
        collections: Sequence[Collection],
        bus: Bus,
        *,
        interval: float,
        grace: float,
        revlogs: Sequence[RevLog] = (),
    ) -> None:
        self._collections = list(collections)
        self._revlogs = list(revlogs)
        self._bus = bus
        self._interval = interval
        self._grace = grace
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, *, grace: float | None = None) -> int:
        """One pass over every collection; returns how many events it published."""
        cutoff = utcnow() - timedelta(seconds=self._grace if grace is None else grace)
        published = 0
        for collection in self._collections:
            # Read the batch first: a cursor held open across the publishes and updates below
            # can starve a server's connection pool (FerretDB's SQLite backend stalls).
            pending = (
                await collection.find({"outbox_n": {"$gt": 0}}, {"outbox": 1})
                .limit(RELAY_BATCH)
                .to_list()
            )
            for doc in pending:
                entries: dict[str, Document] = doc.get("outbox") or {}
                for event_id, entry in sorted(entries.items(), key=lambda kv: kv[1]["at"]):
                    if entry["at"] > cutoff:
                        continue
                    if await _publish_entry(collection, doc["_id"], event_id, entry, self._bus):
                        published += 1
        for revlog in self._revlogs:
            published += await revlog.settle_pending(
                self._bus, self._grace if grace is None else grace
            )
        if published:
            OUTBOX_REPUBLISHED.inc(published)
            log.info("outbox relay republished events", count=published)
        return published

    async def measure_backlog(self) -> None:
        """Sets ``parley_outbox_backlog``: documents of each collection with pending events, and
        each revision log's pending pointers (a collection of changes in flight only)."""
        for collection in self._collections:
            count = await collection.count_documents({"outbox_n": {"$gt": 0}})
            OUTBOX_BACKLOG.labels(collection.name).set(count)
        for revlog in self._revlogs:
            OUTBOX_BACKLOG.labels(revlog.pending.name).set(await revlog.pending.count_documents({}))

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay pass failed", error=repr(exc))
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="outbox-relay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for revlog in self._revlogs:
            await revlog.drain()
