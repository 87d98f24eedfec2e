"""Rewriting documents of the previous shape (updated in place, events in an embedded outbox,
``shared/outbox.py``) as revision logs (``shared/revlog.py``), for the services' start-up
migrations.

Each old document becomes revision 1 of its entity's log. Events still waiting in its outbox
ride in that revision, with a pending pointer written first, so the relay publishes them (a
duplicate publish is possible, a lost event is not; consumers deduplicate by event id). Every
write is an insert whose ``_id`` decides: running it twice, or in two replicas at once, changes
nothing the first run did not.
"""

from __future__ import annotations

from collections.abc import Iterable

from pymongo.errors import BulkWriteError

from shared.events import utcnow
from shared.mongo import Collection, Document
from shared.revlog import RevLog

DUPLICATE_KEY = 11000
BATCH = 500


async def insert_new(collection: Collection, docs: list[Document]) -> int:
    """Insert the documents whose ``_id`` is not taken; returns how many were inserted."""
    inserted = 0
    for start in range(0, len(docs), BATCH):
        chunk = docs[start : start + BATCH]
        try:
            await collection.insert_many(chunk, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise
            inserted += len(chunk) - len(errors)
            continue
        inserted += len(chunk)
    return inserted


def outbox_events(doc: Document) -> list[Document]:
    """Events still waiting in a document's embedded outbox, encoded as a revision's."""
    entries: dict[str, Document] = doc.get("outbox") or {}
    ordered = sorted(entries.items(), key=lambda kv: str(kv[1].get("at", "")))
    return [{"id": event_id, "rk": e["rk"], "body": e["body"]} for event_id, e in ordered]


async def write_first_revisions(
    log: RevLog, entities: Iterable[tuple[str, Document, list[Document]]]
) -> int:
    """Revision 1 of each ``(key, delta, events)`` unless the entity's log exists; returns
    how many were written."""
    now = utcnow()
    revisions: list[Document] = []
    pointers: list[Document] = []
    for key, delta, events in entities:
        rev_id = f"{key}:1"
        revisions.append({"_id": rev_id, "d": delta, "ev": events, "rid": "", "at": now})
        if events:
            pointers.append({"_id": rev_id, "at": now})
    # Pointers first: an event is never stored without one.
    await insert_new(log.pending, pointers)
    return await insert_new(log.revs, revisions)
