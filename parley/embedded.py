"""The embedded store of ``parley run``, supervised.

``parley run`` starts FerretDB as its child and watches it: when it exits, one line says so,
the exit is reaped at once (no zombie), and it is started again after a short pause. More
than ``MAX_RESTARTS`` exits within ``RESTART_WINDOW`` seconds give up: ``parley run`` stops
and exits non-zero. While it is down, ``/readyz`` answers 503 naming it. The child dies with
``parley run`` even when that is killed with SIGKILL (see ``parley.servers._spawn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from parley.servers import Process, ServerError, spawn_ferretdb, wait_ferretdb
from shared.metrics import STORE_RESTARTS

log = structlog.get_logger("parley.embedded")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
POLL_INTERVAL = 0.2
START_TIMEOUT = 30.0


class EmbeddedStore:
    def __init__(self, data_dir: Path, addr: str, *, postgresql_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.addr = addr
        self.postgresql_url = postgresql_url
        self.process: Process | None = None
        self.failed = False  # gave up restarting: the command must exit non-zero
        self.restarting = False  # from noticing an exit until the new child answers
        self._restarts: list[float] = []

    @property
    def url(self) -> str:
        return f"mongodb://{self.addr}/"

    def start(self) -> None:
        """Starts FerretDB and waits until it answers (raises ``ServerError``)."""
        self.process = spawn_ferretdb(self.data_dir, self.addr, postgresql_url=self.postgresql_url)
        wait_ferretdb(self.process, self.addr, START_TIMEOUT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    async def check(self) -> None:
        """The readiness check: the child is running."""
        if self.process is None or self.process.popen.poll() is not None:
            raise ConnectionError("the embedded FerretDB is not running")
        if self.restarting:
            raise ConnectionError("the embedded FerretDB is restarting")

    async def watch(self) -> None:
        """Restarts FerretDB whenever it exits, until the restart budget is spent."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            process = self.process
            if process is None:
                continue
            code = process.popen.poll()  # reaps an exited child
            if code is None:
                continue
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                log.error(
                    f"the embedded FerretDB (PID {process.popen.pid}) exited with code {code}; "
                    f"{MAX_RESTARTS} restarts in {RESTART_WINDOW:g}s, giving up "
                    f"(its log: {process.log_path})"
                )
                self.failed = True
                os.kill(os.getpid(), signal.SIGTERM)  # stop serving; the command exits 1
                return
            self._restarts.append(now)
            self.restarting = True
            log.warning(
                f"the embedded FerretDB (PID {process.popen.pid}) exited with code {code}; "
                f"restarting it ({len(self._restarts)}/{MAX_RESTARTS}, log: {process.log_path})"
            )
            await asyncio.sleep(0.5 * 2 ** (len(self._restarts) - 1))
            try:
                await self._restart()
            finally:
                self.restarting = False

    async def _restart(self) -> None:
        try:
            # Spawned from the event loop's thread: the child's death signal follows this
            # thread, which lives as long as the process.
            self.process = spawn_ferretdb(
                self.data_dir, self.addr, postgresql_url=self.postgresql_url
            )
            await asyncio.to_thread(wait_ferretdb, self.process, self.addr, START_TIMEOUT)
        except ServerError as exc:
            log.warning("the embedded FerretDB did not start again", error=str(exc)[:500])
            return  # the next pass sees it exited and counts another restart
        STORE_RESTARTS.inc()
        log.info(f"the embedded FerretDB is back (PID {self.process.popen.pid})")

    async def supervise_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """A ``cleanup_ctx``: watches the store while the app runs."""
        task = asyncio.create_task(self.watch(), name="embedded-store")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
