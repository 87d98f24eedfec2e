"""The embedded store of ``parley run``, supervised.

``parley run`` starts FerretDB as its child (on the ``postgresql`` local store, after the
private PostgreSQL cluster FerretDB keeps its data in, another child) and watches them: when
one exits, one line says so, the exit is reaped at once (no zombie), and it is started again
after a short pause. More than ``MAX_RESTARTS`` exits within ``RESTART_WINDOW`` seconds give
up: ``parley run`` stops and exits non-zero. While one is down, ``/readyz`` answers 503 naming
it. The children die with ``parley run`` even when that is killed with SIGKILL (see
``parley.servers._spawn``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from parley.servers import (
    Process,
    ServerError,
    spawn_ferretdb,
    spawn_postgres,
    wait_ferretdb,
    wait_postgres,
)
from shared.lifecycle import running
from shared.metrics import STORE_RESTARTS

log = structlog.get_logger("parley.embedded")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
POLL_INTERVAL = 0.2
START_TIMEOUT = 30.0


class EmbeddedStore:
    """FerretDB with its data under ``data_dir`` (SQLite), in the PostgreSQL database at
    ``postgresql_url``, or (``postgres_dir``) in a private PostgreSQL cluster there."""

    def __init__(
        self,
        data_dir: Path,
        addr: str,
        *,
        postgresql_url: str | None = None,
        postgres_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.addr = addr
        self.postgresql_url = postgresql_url
        self.postgres_dir = postgres_dir
        self.process: Process | None = None
        self.postgres: Process | None = None
        self.failed = False  # gave up restarting: the command must exit non-zero
        self.restarting = False  # from noticing an exit until the new child answers
        self._restarts: list[float] = []

    @property
    def url(self) -> str:
        return f"mongodb://{self.addr}/"

    def start(self) -> None:
        """Starts the cluster (if any), then FerretDB, and waits until they answer (raises
        ``ServerError``, leaving nothing running)."""
        if self.postgres_dir is not None:
            self.postgres = spawn_postgres(self.postgres_dir)
            wait_postgres(self.postgres, START_TIMEOUT)
            self.postgresql_url = self.postgres.extra["url"]
        try:
            self.process = spawn_ferretdb(
                self.data_dir, self.addr, postgresql_url=self.postgresql_url
            )
            wait_ferretdb(self.process, self.addr, START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """FerretDB first, so the cluster's fast shutdown ends no session in use."""
        for process in (self.process, self.postgres):
            if process is not None:
                process.stop()

    def _children(self) -> list[tuple[str, Process]]:
        found = [("PostgreSQL", self.postgres)] if self.postgres is not None else []
        return found + ([("FerretDB", self.process)] if self.process is not None else [])

    async def check(self) -> None:
        """The readiness check: the children are running."""
        if self.process is None:
            raise ConnectionError("the embedded FerretDB is not running")
        for name, process in self._children():
            if process.popen.poll() is not None:
                raise ConnectionError(f"the embedded {name} is not running")
        if self.restarting:
            raise ConnectionError("the embedded store is restarting")

    async def watch(self) -> None:
        """Restarts a child whenever it exits, until the restart budget is spent."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            exited = [(n, p, c) for n, p in self._children() if (c := p.popen.poll()) is not None]
            if not exited:  # poll() reaped any exited child
                continue
            name, process, code = exited[0]
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                log.error(
                    f"the embedded {name} (PID {process.popen.pid}) exited with code {code}; "
                    f"{MAX_RESTARTS} restarts in {RESTART_WINDOW:g}s, giving up "
                    f"(its log: {process.log_path})"
                )
                self.failed = True
                os.kill(os.getpid(), signal.SIGTERM)  # stop serving; the command exits 1
                return
            self._restarts.append(now)
            self.restarting = True
            log.warning(
                f"the embedded {name} (PID {process.popen.pid}) exited with code {code}; "
                f"restarting it ({len(self._restarts)}/{MAX_RESTARTS}, log: {process.log_path})"
            )
            await asyncio.sleep(0.5 * 2 ** (len(self._restarts) - 1))
            try:
                await self._restart(name)
            finally:
                self.restarting = False

    async def _restart(self, name: str) -> None:
        try:
            # Spawned from the event loop's thread: the child's death signal follows this
            # thread, which lives as long as the process.
            if name == "PostgreSQL" and self.postgres_dir is not None:
                self.postgres = spawn_postgres(self.postgres_dir)
                process = self.postgres
                await asyncio.to_thread(wait_postgres, process, START_TIMEOUT)
            else:
                self.process = spawn_ferretdb(
                    self.data_dir, self.addr, postgresql_url=self.postgresql_url
                )
                process = self.process
                await asyncio.to_thread(wait_ferretdb, process, self.addr, START_TIMEOUT)
        except ServerError as exc:
            log.warning(f"the embedded {name} did not start again", error=str(exc)[:500])
            return  # the next pass sees it exited and counts another restart
        STORE_RESTARTS.inc()
        log.info(f"the embedded {name} is back (PID {process.popen.pid})")

    async def supervise_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """A ``cleanup_ctx``: watches the store while the app runs."""
        async with running(self.watch(), "embedded-store"):
            yield
