"""Background loops that stop when they are told to.

A cancellation can be lost below a loop: a library that catches ``CancelledError`` while it
cleans up (closing a connection mid-command, say) and then raises an ordinary error or
returns. The loop then goes on, and a shutdown that cancelled it waits for it forever. Each
pass of a loop therefore ends with ``stop_if_cancelled()``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("parley.loops")


def stop_if_cancelled() -> None:
    """Raises ``CancelledError`` if the current task has been cancelled, even when the
    cancellation was swallowed by what it awaited."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def run_every(interval: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Runs ``step`` now and then every ``interval`` seconds, until cancelled. A pass that
    fails is logged with its traceback (nothing is swallowed unseen) and the next pass
    retries."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("background pass failed; the next one retries", loop=what, exc_info=True)
        stop_if_cancelled()
        await asyncio.sleep(interval)
