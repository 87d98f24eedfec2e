"""structlog setup and the request-context middleware.

Every log line carries the request id (from ``X-Request-ID`` or a new one; it is also the
trace id put on published events) and the service; handlers bind the appid once
authenticated. Tokens, secrets, the Authorization header and message content are never logged.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = structlog.get_logger("parley.http")

REQUEST_ID = web.RequestKey("request_id", str)
MAX_REQUEST_ID = 128


def configure_logging(*, json: bool = False, level: str = "info", cache: bool = True) -> None:
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=cache,
    )


def request_id_of(request: web.Request) -> str:
    return str(request.get(REQUEST_ID, ""))


def request_context_middleware(service: str, header: str = "X-Request-ID") -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.get(REQUEST_ID) or request.headers.get(header, "")
        request_id = (
            incoming
            if incoming
            and len(incoming) <= MAX_REQUEST_ID
            and incoming.isascii()
            and incoming.isprintable()
            else uuid.uuid4().hex
        )
        request[REQUEST_ID] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, service=service)
        started = time.perf_counter()
        response = await handler(request)
        response.headers[header] = request_id
        log.debug(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return response

    return middleware
