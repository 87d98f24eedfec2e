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
from pymongo import AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

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


async def next_sequence(counters: Collection, name: str, start: int = 0) -> int:
    """The next number of a named counter (the first is ``start + 1``)."""
    for _ in range(5):
        try:
            doc = await counters.find_one_and_update(
                {"_id": name},
                {"$inc": {"seq": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            continue  # two first uses raced to create the counter: the loser retries
        assert doc is not None
        return start + int(doc["seq"])
    raise RuntimeError(f"counter {name!r} did not settle")
