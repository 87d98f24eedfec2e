"""The client listeners: raw frames on a TCP (or TLS) stream, one frame per binary WebSocket
message on path ``/ws`` (wire protocol §1.4, §1.5).

Each connection reads and handles its frames strictly one at a time (§1.6: authentication is
complete before the next frame is handled). Any frame that fails validation, a text WebSocket
message, or no frame for ``idle_timeout`` seconds closes the connection without a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import structlog
from aiohttp import WSMsgType, web

from shared.settings import split_addr

from . import protocol as p
from .connections import Connection
from .server import DeliveryServer

log = structlog.get_logger("parley.delivery")

WS_PATH = "/ws"
WS_MAX_MESSAGE = 64 * 1024  # the reference's WebSocket read limit (§1.3)


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class Listeners:
    """The TCP and WebSocket listeners of one delivery server, started and stopped together."""

    def __init__(self, server: DeliveryServer, idle_timeout: float) -> None:
        self.server = server
        self.idle_timeout = idle_timeout
        self._tcp: list[asyncio.Server] = []
        self._ws: list[web.AppRunner] = []
        self._connections: set[asyncio.Task[None]] = set()
        self.addresses: list[str] = []

    async def start_tcp(self, addr: str, context: ssl.SSLContext | None = None) -> None:
        host, port = split_addr(addr)
        server = await asyncio.start_server(self._serve_stream, host, port, ssl=context)
        self._tcp.append(server)
        self.addresses.append(f"{'tls' if context else 'tcp'}://{addr}")

    async def start_ws(self, addr: str, context: ssl.SSLContext | None = None) -> None:
        host, port = split_addr(addr)
        app = web.Application()
        app.router.add_get(WS_PATH, self._serve_ws)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._ws.append(runner)
        await web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True).start()
        self.addresses.append(f"{'wss' if context else 'ws'}://{addr}{WS_PATH}")

    async def stop(self) -> None:
        for server in self._tcp:
            server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self._tcp:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for runner in self._ws:
            await runner.cleanup()

    # ---- TCP ----

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = str(writer.get_extra_info("peername"))
        transport = "tls" if writer.get_extra_info("sslcontext") else "tcp"

        async def write(frames: list[bytes]) -> None:
            writer.write(b"".join(frames))
            await writer.drain()

        conn = Connection(transport, peer, write)
        self.server.opened(conn)
        try:
            while True:
                async with asyncio.timeout(self.idle_timeout):
                    head = await reader.readexactly(p.HEADER_SIZE)
                    header = p.parse_header(head)
                    body = await reader.readexactly(header.length)
                command = p.decode_body(header.cmd, header.version, body)
                await self.server.handle(conn, header, command)
        except (p.ProtocolError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("connection failed", peer=peer)
        finally:
            self.server.closed(conn)
            await conn.close()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._connections.discard(task)

    # ---- WebSocket ----

    async def _serve_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, autoping=True)
        await ws.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)

        async def write(frames: list[bytes]) -> None:
            for frame in frames:  # one frame per message, never coalesced (§1.5)
                await ws.send_bytes(frame)

        transport = "wss" if request.secure else "ws"
        conn = Connection(transport, str(request.remote), write)
        self.server.opened(conn)
        try:
            while True:
                msg = await ws.receive(timeout=self.idle_timeout)
                if msg.type != WSMsgType.BINARY:
                    break  # text, close, error: the connection ends (§1.5)
                header, command = p.decode_frame(msg.data)
                await self.server.handle(conn, header, command)
        except (p.ProtocolError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("connection failed", peer=conn.peer)
        finally:
            self.server.closed(conn)
            await conn.close()
            with contextlib.suppress(Exception):
                await ws.close()
            self._connections.discard(task)
        return ws
