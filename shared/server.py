"""Serving an app: aiohttp's runner, with one difference on malformed requests.

When a request cannot even be parsed (a control character in a header, a bad request line),
aiohttp answers it itself, before any handler or middleware runs: a text/plain 400 whose body
quotes the offending bytes, and an ERROR log line with a traceback that quotes them again. A
header such as ``Authorization`` would be echoed into both. ``QuietRequestHandler`` answers
these in the error envelope instead, and logs one line naming only the error's type.

``ParleyRunner`` is ``web.AppRunner`` with that handler; ``run_app`` serves an app with it until
SIGINT or SIGTERM (what ``web.run_app`` does, which takes no handler class).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from shared.errors import envelope

log = structlog.get_logger("parley.server")


class QuietRequestHandler(RequestHandler):
    """A connection that never quotes a request back: see the module's docstring."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = type(exc).__name__ if exc is not None else None
        if status >= 500:
            # Raised by Parley's own code outside the error middleware: keep the traceback.
            log.error("request failed", status=status, error=error, exc_info=exc)
        else:
            log.info("malformed request refused", status=status, error=error)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error response can follow")
        try:
            reason = HTTPStatus(status).phrase.lower()
        except ValueError:
            reason = "error"
        response = envelope(status, reason)
        response.force_close()
        return response


class QuietServer(web.Server):
    """``web.Server`` whose connections are ``QuietRequestHandler``s."""

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class ParleyRunner(web.AppRunner):
    """``web.AppRunner`` serving through ``QuietServer``."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app, as AppRunner does
        return QuietServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )


Listening = Callable[[], Awaitable[None]]


async def serve(
    app: web.Application,
    host: str,
    port: int,
    on_listening: Listening | None = None,
    **runner_kwargs: Any,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled (or SIGINT/SIGTERM, with
    ``handle_signals=True``); the app is cleaned up on the way out. ``on_listening`` runs
    once the port accepts connections (what a banner saying "listening" must wait for)."""
    runner = ParleyRunner(app, access_log=None, **runner_kwargs)
    try:
        await runner.setup()  # a startup step that fails: the steps before it are closed
        await web.TCPSite(runner, host, port).start()
        if on_listening is not None:
            await on_listening()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_app(
    app: web.Application, host: str, port: int, on_listening: Listening | None = None
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut it down cleanly."""
    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(serve(app, host, port, on_listening, handle_signals=True))
