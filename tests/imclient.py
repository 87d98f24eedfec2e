"""A small IM client for the tests, written from the wire protocol (§1.2, §3.3, §5, §6): what
an SDK sends and what it reads, over TCP or WebSocket. Independent of the server's codec."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass
from typing import Any

import aiohttp

HEAD = struct.Struct(">iiBBBB")

AUTH_STATUS, IM, ACK, GROUP_NOTIFICATION, GROUP_IM = 3, 4, 5, 7, 8
PING, PONG, AUTH_TOKEN, RT, ENTER_ROOM, LEAVE_ROOM, ROOM_IM, SYSTEM = 13, 14, 15, 17, 18, 19, 20, 21
SYNC, SYNC_BEGIN, SYNC_END, SYNC_NOTIFY = 26, 27, 28, 29
SYNC_GROUP, SYNC_GROUP_BEGIN, SYNC_GROUP_END, SYNC_GROUP_NOTIFY = 30, 31, 32, 33
SYNC_KEY, GROUP_SYNC_KEY, NOTIFICATION, METADATA, CUSTOMER_V2 = 34, 35, 36, 37, 64
PUSH, SUPER = 0x10, 0x20
WAIT = 10.0


@dataclass
class Frame:
    seq: int
    cmd: int
    version: int
    flag: int
    body: bytes

    def key(self) -> int:
        return int(struct.unpack_from(">q", self.body)[0])

    def group_key(self) -> tuple[int, int]:
        gid, key = struct.unpack_from(">qq", self.body)
        return int(gid), int(key)

    def im(self) -> dict[str, Any]:
        """An IM or GROUP_IM body, in this frame's version."""
        if self.version == 0:
            sender, receiver, msgid = struct.unpack_from(">qqi", self.body)
            return {"sender": sender, "receiver": receiver, "msgid": msgid,
                    "content": self.body[20:].decode()}  # fmt: skip
        sender, receiver, ts, msgid = struct.unpack_from(">qqii", self.body)
        return {"sender": sender, "receiver": receiver, "timestamp": ts, "msgid": msgid,
                "content": self.body[24:].decode()}  # fmt: skip

    def ack(self) -> tuple[int, int | None]:
        seq = struct.unpack_from(">i", self.body)[0]
        return int(seq), (self.body[4] if len(self.body) > 4 else None)

    def rt(self) -> tuple[int, int, str]:
        sender, receiver = struct.unpack_from(">qq", self.body)
        return int(sender), int(receiver), self.body[16:].decode()


def im_body(sender: int, receiver: int, content: str, msgid: int = 0, version: int = 2) -> bytes:
    if version == 0:
        return struct.pack(">qqi", sender, receiver, msgid) + content.encode()
    return struct.pack(">qqii", sender, receiver, 0, msgid) + content.encode()


def auth_body(token: str, platform: int, device: str) -> bytes:
    t, d = token.encode(), device.encode()
    return bytes([platform, len(t)]) + t + bytes([len(d)]) + d


class Client:
    """One connection. ``frames`` collects what the server sent, in order."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.seq = 0
        self.frames: list[Frame] = []
        self.arrived = asyncio.Event()
        self.closed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    # ---- transports ----

    @classmethod
    async def tcp(cls, addr: str, version: int = 2, tls: ssl.SSLContext | None = None) -> Client:
        host, port = addr.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=tls)
        client = TcpClient(version, reader, writer)
        client._reader_task = asyncio.create_task(client._read())
        return client

    @classmethod
    async def ws(cls, addr: str, version: int = 1, tls: ssl.SSLContext | None = None) -> Client:
        session = aiohttp.ClientSession()
        scheme = "https" if tls else "http"
        ws = await session.ws_connect(f"{scheme}://{addr}/ws", ssl=tls or True)
        client = WsClient(version, session, ws)
        client._reader_task = asyncio.create_task(client._read())
        return client

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task

    def _got(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.arrived.set()

    # ---- sending ----

    async def send(self, cmd: int, body: bytes = b"", *, version: int | None = None) -> int:
        self.seq += 1
        v = self.version if version is None else version
        await self.write(HEAD.pack(len(body), self.seq, cmd, v, 0, 0) + body)
        return self.seq

    async def auth(self, token: str, platform: int = 2, device: str = "dev-1") -> int:
        await self.send(AUTH_TOKEN, auth_body(token, platform, device))
        return int(struct.unpack(">i", (await self.next(AUTH_STATUS)).body)[0])

    async def send_im(
        self, sender: int, receiver: int, content: str, *, msgid: int = 0, cmd: int = IM
    ) -> int:
        return await self.send(cmd, im_body(sender, receiver, content, msgid, self.version))

    # ---- receiving ----

    async def next(self, cmd: int | None = None, timeout: float = WAIT) -> Frame:
        """The first unread frame (of ``cmd``), removed from ``frames`` with all before it."""
        async with asyncio.timeout(timeout):
            while True:
                for i, frame in enumerate(self.frames):
                    if cmd is None or frame.cmd == cmd:
                        del self.frames[: i + 1]
                        return frame
                if self.closed.is_set():
                    raise ConnectionError("closed by the server")
                self.arrived.clear()
                await self.arrived.wait()

    async def quiet(self, seconds: float = 0.5) -> list[Frame]:
        """Everything received until nothing arrived for ``seconds``."""
        while True:
            seen = len(self.frames)
            await asyncio.sleep(seconds)
            if len(self.frames) == seen:
                return list(self.frames)

    async def wait_closed(self, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()

    async def sync(self, key: int, timeout: float = WAIT) -> tuple[int, list[Frame], int]:
        """SYNC(key): (the BEGIN key, the messages, the END key)."""
        await self.send(SYNC, struct.pack(">q", key))
        begin = await self.next(SYNC_BEGIN, timeout)
        messages: list[Frame] = []
        while True:
            frame = await self.next(None, timeout)
            if frame.cmd == SYNC_END:
                return begin.key(), messages, frame.key()
            if frame.cmd in (IM, GROUP_IM, SYSTEM, GROUP_NOTIFICATION, CUSTOMER_V2):
                messages.append(frame)

    async def sync_all(self, key: int) -> tuple[list[Frame], int]:
        """Sync until the inbox is exhausted, reporting each END key as an SDK does."""
        found: list[Frame] = []
        while True:
            _, messages, end = await self.sync(key)
            found += messages
            if end != key:
                await self.send(SYNC_KEY, struct.pack(">q", end))
            if not messages:
                return found, end
            key = end

    async def pushed(self, cmd: int, timeout: float = WAIT) -> tuple[Frame, Frame]:
        """(METADATA, the pushed message): the first PUSH-flagged ``cmd`` frame, which must
        follow its METADATA at the previous seq (wire protocol §5.6); removed with all before."""
        async with asyncio.timeout(timeout):
            while True:
                for i, frame in enumerate(self.frames):
                    if frame.cmd == cmd and frame.flag & PUSH:
                        meta = self.frames[i - 1] if i else None
                        assert meta is not None and meta.cmd == METADATA, self.frames[: i + 1]
                        assert meta.seq + 1 == frame.seq
                        del self.frames[: i + 1]
                        return meta, frame
                if self.closed.is_set():
                    raise ConnectionError("closed by the server")
                self.arrived.clear()
                await self.arrived.wait()


class TcpClient(Client):
    def __init__(
        self, version: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(version)
        self.reader, self.writer = reader, writer

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(12)
                length, seq, cmd, version, flag, _ = HEAD.unpack(head)
                body = await self.reader.readexactly(length)
                self._got(Frame(seq, cmd, version, flag, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            self.arrived.set()

    async def close(self) -> None:
        await super().close()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class WsClient(Client):
    def __init__(
        self,
        version: int,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
    ) -> None:
        super().__init__(version)
        self.session, self.socket = session, ws

    async def write(self, data: bytes) -> None:
        await self.socket.send_bytes(data)

    async def _read(self) -> None:
        try:
            async for msg in self.socket:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                data = msg.data
                length, seq, cmd, version, flag, _ = HEAD.unpack_from(data)
                # One frame per message, nothing after it (wire protocol §1.5).
                assert len(data) == 12 + length, "frames must not be coalesced"
                self._got(Frame(seq, cmd, version, flag, data[12:]))
        finally:
            self.closed.set()
            self.arrived.set()

    async def close(self) -> None:
        await super().close()
        await self.socket.close()
        await self.session.close()
