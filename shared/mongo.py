"""MongoDB access through PyMongo's async API.

Writes are acknowledged and journaled (``w=1, j=true``) before a handler answers. Each service
owns its collections, named ``<service>_<thing>``, and declares their indexes in code; they are
created at startup, before traffic, and a failure stops the service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pymongo
import structlog
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from shared.metrics import STORE_LISTENER
from shared.storecount import STORE_COMMANDS

log = structlog.get_logger("parley.mongo")

Document = dict[str, Any]
Database = AsyncDatabase[Document]
Collection = AsyncCollection[Document]


def make_client(
    url: str, *, appname: str = "parley", timeout: float = 5.0
) -> AsyncMongoClient[Document]:
    """A client whose every operation has a deadline: ``timeout`` seconds (PyMongo's
    ``timeoutMS``, which also bounds server selection and connecting), or the tighter deadline
    of an enclosing ``pymongo.timeout()`` block (each request sets one). Every command is
    timed for ``/metrics``."""
    ms = max(1, int(timeout * 1000))
    return AsyncMongoClient(
        url,
        w=1,
        journal=True,
        tz_aware=True,
        appname=appname,
        timeoutMS=ms,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=min(ms, 2000),
        event_listeners=[STORE_LISTENER, STORE_COMMANDS],
    )


async def ping(db: Database, seconds: float) -> None:
    """Raises unless the server answers a ``ping`` within ``seconds``."""
    with pymongo.timeout(seconds):
        await db.command("ping")


async def ensure_indexes(db: Database, declared: Mapping[str, Sequence[IndexModel]]) -> None:
    """Create every declared index (a no-op for those that exist)."""
    for collection, indexes in declared.items():
        # One index per command: FerretDB 1.24 drops the connection when a multi-index
        # createIndexes names indexes that already exist.
        for index in indexes:
            await db[collection].create_indexes([index])
        log.debug("indexes ready", collection=collection, count=len(indexes))


# Parley's FerretDB answers ``{_id: {$in: [...]}}`` from ``_id`` up to this many values.
IDS_PER_COMMAND = 1000


async def by_ids(
    collection: Collection, ids: Sequence[str], projection: Mapping[str, int] | None = None
) -> dict[str, Document]:
    """The documents of ``ids`` that exist, by ``_id``: one ``{_id: {$in: ids}}`` command per
    ``IDS_PER_COMMAND`` ids (one lookup for a single id), answered from ``_id`` by MongoDB and
    by Parley's FerretDB alike."""
    found: dict[str, Document] = {}
    unique = list(dict.fromkeys(ids))
    if len(unique) == 1:
        doc = await collection.find_one({"_id": unique[0]}, projection)
        return {unique[0]: doc} if doc is not None else {}
    for start in range(0, len(unique), IDS_PER_COMMAND):
        part = unique[start : start + IDS_PER_COMMAND]
        # The whole answer in the first reply, and the cursor closed by the server: no getMore
        # (a first batch holds 101 documents by default; at most one document per id).
        cursor = collection.find(
            {"_id": {"$in": part}}, projection, limit=len(part), batch_size=len(part)
        )
        async for doc in cursor:
            found[str(doc["_id"])] = doc
    return found
