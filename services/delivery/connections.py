"""Client connections and where to find them: each user's devices, each room's occupants.

A ``Connection`` is one authenticated-or-not TCP, TLS or WebSocket session. Frames are given
a seq and encoded in the connection's version when queued (so the order of ``send`` calls is
the order on the wire, and the frames of one call, such as METADATA and its message, stay
adjacent: wire protocol §1.7, §5.6); a flush task, started only while something is queued,
writes them. An idle connection costs no task beyond its reader.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import structlog

from .protocol import Out

log = structlog.get_logger("parley.delivery")

# Frames queued for one connection beyond which the oldest are dropped (a dropped push or
# notify is recovered by the next sync, wire protocol §12.29); the frames of one ``send``
# (METADATA and its message) are dropped together.
MAX_QUEUED = 1000

Writer = Callable[[list[bytes]], Awaitable[None]]


class Connection:
    def __init__(self, transport: str, peer: str, write: Writer) -> None:
        self.transport = transport
        self.peer = peer
        self.appid = 0
        self.uid = 0
        self.device = 0  # device_ID (wire protocol §5.1 step 5)
        self.platform = 0
        self.version = 0  # before a successful AUTH_TOKEN: 0 (§2.2)
        self.room = 0
        self._write = write
        self._seq = 0
        self._queued: deque[list[bytes]] = deque()
        self._flush: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def authenticated(self) -> bool:
        return self.uid != 0

    @property
    def key(self) -> tuple[int, int]:
        """The user, as ``(appid, uid)``."""
        return self.appid, self.uid

    def send(self, *frames: Out) -> None:
        """Queue frames, written back-to-back in this order."""
        if self.closed:
            return
        encoded = []
        for out in frames:
            self._seq += 1
            encoded.append(out.encode(self._seq, self.version))
        self._queued.append(encoded)
        while len(self._queued) > MAX_QUEUED:
            self._queued.popleft()
        if self._flush is None:
            self._flush = asyncio.create_task(self._drain(), name="delivery-write")

    async def _drain(self) -> None:
        try:
            while self._queued:
                await self._write(self._queued.popleft())
        except (ConnectionError, RuntimeError, OSError) as exc:
            log.debug("write failed", peer=self.peer, error=repr(exc))
            self.closed = True
            self._queued.clear()
        finally:
            self._flush = None

    async def flushed(self) -> None:
        """Wait until everything queued is written (or the connection failed)."""
        while self._flush is not None:
            await asyncio.shield(self._flush)

    async def close(self) -> None:
        self.closed = True
        self._queued.clear()
        if self._flush is not None:
            self._flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush


class Registry:
    """The live, authenticated connections of this process, by user and by room."""

    def __init__(self) -> None:
        self._users: dict[tuple[int, int], set[Connection]] = {}
        self._rooms: dict[tuple[int, int], set[Connection]] = {}
        self.connections = 0  # open connections, authenticated or not

    def add_user(self, conn: Connection) -> None:
        self._users.setdefault((conn.appid, conn.uid), set()).add(conn)

    def user(self, appid: int, uid: int) -> tuple[Connection, ...]:
        return tuple(self._users.get((appid, uid), ()))

    def users(self) -> int:
        return len(self._users)

    def uids(self, appid: int) -> list[int]:
        """The users of ``appid`` connected here."""
        return [uid for a, uid in self._users if a == appid]

    def enter_room(self, conn: Connection, room: int) -> None:
        self.leave_room(conn)
        conn.room = room
        self._rooms.setdefault((conn.appid, room), set()).add(conn)

    def leave_room(self, conn: Connection) -> None:
        if not conn.room:
            return
        _discard(self._rooms, (conn.appid, conn.room), conn)
        conn.room = 0

    def room(self, appid: int, room: int) -> Iterable[Connection]:
        return tuple(self._rooms.get((appid, room), ()))

    def remove(self, conn: Connection) -> None:
        self.leave_room(conn)
        if conn.authenticated:
            _discard(self._users, (conn.appid, conn.uid), conn)


def _discard(
    groups: dict[tuple[int, int], set[Connection]], key: tuple[int, int], conn: Connection
) -> None:
    """Take ``conn`` out of its set under ``key``; a set left empty goes."""
    members = groups.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del groups[key]
