"""Background loops that stop when they are told to.

A cancellation can be lost below a loop: a library that catches ``CancelledError`` while it
cleans up (closing a connection mid-command, say) and then raises an ordinary error or
returns. The loop then goes on, and a shutdown that cancelled it waits for it forever. Each
pass of a loop therefore ends with ``stop_if_cancelled()``."""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raises ``CancelledError`` if the current task has been cancelled, even when the
    cancellation was swallowed by what it awaited."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
