"""The outbox relay: a committed change always gets its event (DESIGN invariant 1).

Every change is a revision inserted into a revision log (``shared/revlog.py``) with its events
inside, one atomic write, after a pending pointer naming it. The writer publishes the events
(broker confirms) and then deletes the pointer. If the process dies or the publish fails in
between, the ``OutboxRelay`` of any replica finds the pointer (the small ``*_pending``
collection, read whole: it holds only changes in flight) and publishes the events again:
duplicates are possible, loss is not. Consumers deduplicate by ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from shared.bus import Bus
from shared.loops import run_every
from shared.metrics import OUTBOX_BACKLOG, OUTBOX_REPUBLISHED
from shared.revlog import RevLog

log = structlog.get_logger("parley.outbox")


class OutboxRelay:
    """Settles the pending revisions of the given logs older than ``grace`` seconds (publishes
    their events, or tombstones a revision that never appeared), every ``interval`` seconds."""

    def __init__(
        self, revlogs: Sequence[RevLog], bus: Bus, *, interval: float, grace: float
    ) -> None:
        self._revlogs = list(revlogs)
        self._bus = bus
        self._interval = interval
        self._grace = grace
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, *, grace: float | None = None) -> int:
        """One pass over every log's pending pointers; returns how many events it published."""
        published = 0
        for revlog in self._revlogs:
            published += await revlog.settle_pending(
                self._bus, self._grace if grace is None else grace
            )
        if published:
            OUTBOX_REPUBLISHED.inc(published)
            log.info("outbox relay republished events", count=published)
        return published

    async def measure_backlog(self) -> None:
        """Sets ``parley_outbox_backlog``: each revision log's pending pointers."""
        for revlog in self._revlogs:
            OUTBOX_BACKLOG.labels(revlog.pending.name).set(await revlog.pending.count_documents({}))

    def start(self) -> None:
        self._task = asyncio.create_task(
            run_every(self._interval, self.run_once, "outbox relay"), name="outbox-relay"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for revlog in self._revlogs:
            await revlog.drain()
