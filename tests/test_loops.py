"""A background loop stops when cancelled, even when what it awaited swallowed the
cancellation, and a test teardown that does not end fails (no servers)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shared.loops import stop_if_cancelled

from .conftest import bounded


async def test_a_loop_whose_cancellation_was_swallowed_still_stops() -> None:
    passes = 0

    async def swallowing_call() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # a library cleaning up
            await asyncio.sleep(3600)
        raise ConnectionError("closed while cleaning up")

    async def loop() -> None:
        nonlocal passes
        while True:
            passes += 1
            with contextlib.suppress(ConnectionError):
                await swallowing_call()
            stop_if_cancelled()
            await asyncio.sleep(0)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled()
    assert passes == 1


async def test_an_uncancelled_task_goes_on() -> None:
    stop_if_cancelled()  # no error


async def test_a_teardown_that_does_not_end_fails_the_test() -> None:
    with pytest.raises(AssertionError, match=r"did not end in 0\.05 s"):
        await bounded(asyncio.sleep(3600), "a step", 0.05)
    await bounded(asyncio.sleep(0), "a step", 0.05)  # one that ends passes
