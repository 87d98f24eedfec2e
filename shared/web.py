"""What every service app has in common: middleware, its rows of the routing table,
``/healthz`` (alive), ``/readyz`` (what it needs answers), ``/metrics``, and its resources as
``cleanup_ctx`` generators reached through typed ``AppKey``s.

A service's ``create_app(settings, deps)`` calls ``service_app`` and appends ``service_steps``:
the common contexts, then its own.
``Deps`` carries process-wide resources: the all-in-one runner fills one (one Mongo client,
one bus, the auth service's in-process verifier) and hands it to every service; a service run
alone (``parley serve``) gets an empty one and opens its own.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import pymongo
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pymongo import IndexModel

from shared.auth import (
    CLIENT_IP_HEADER,
    TRUSTED_PROXIES,
    VERIFIER,
    CachingVerifier,
    HttpVerifier,
    Verifier,
)
from shared.bus import Bus, RabbitBus
from shared.errors import DEADLINE_EXCEEDED, ParleyError, error_middleware
from shared.http import MAX_BODY
from shared.inboxes import MessageStore
from shared.internal import (
    INTERNAL_SECRET_HEADER,
    CustomerDirectory,
    GroupDirectory,
    TokenIssuer,
)
from shared.jsonio import json_response
from shared.logs import request_context_middleware
from shared.metrics import backlog_probes, metrics_handler, observe_middleware
from shared.mongo import Database, ensure_indexes, make_client, ping
from shared.outbox import OutboxRelay
from shared.revlog import RevLog
from shared.routing import ROUTES, internal_routes_for, routes_for
from shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
BUS = web.AppKey("bus", Bus)
RELAY = web.AppKey("outbox_relay", OutboxRelay)

# A readiness check raises (or times out) when what it checks is down.
ReadyCheck = Callable[[], Awaitable[None]]
READY_CHECKS = web.AppKey("ready_checks", dict[str, ReadyCheck])
READY_TIMEOUT = 1.0

log = structlog.get_logger("parley.web")


@dataclass
class Deps:
    """Process-wide resources shared by the services of one process. A service that owns one
    of the directories puts its in-process implementation here at startup; services started
    after it use that instead of the owner's internal HTTP API (the all-in-one runner starts
    the owners first: see ``ServiceSpec`` in ``shared/lifecycle.py``)."""

    db: Database | None = None
    bus: Bus | None = None
    verifier: Verifier | None = None
    groups: GroupDirectory | None = None
    customers: CustomerDirectory | None = None
    tokens: TokenIssuer | None = None
    messages: MessageStore | None = None


def require_internal(request: web.Request) -> None:
    """Internal APIs answer only callers that send ``PARLEY_INTERNAL_SECRET`` (compared in
    constant time): 401 without it, 403 with a wrong one, 403 when the process has none
    (unless started with ``--insecure-internal``)."""
    settings = request.app[SETTINGS]
    expected = settings.internal_secret
    if not expected:
        if settings.insecure_internal:
            return
        raise ParleyError("internal API disabled: no internal secret", status=403)
    given = request.headers.get(INTERNAL_SECRET_HEADER)
    if given is None:
        raise ParleyError("internal secret required", status=401)
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise ParleyError("wrong internal secret", status=403)


def internal(handler: Handler) -> Handler:
    """``handler`` behind ``require_internal``: how ``service_app`` registers the rows of
    ``INTERNAL_ROUTES``, so no internal handler checks the secret itself."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        require_internal(request)
        return await handler(request)

    return guarded


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


# Paths that browsers call directly: CORS headers on every answer, errors included, and an
# OPTIONS preflight answered without credentials (spec §1.4).
CORS_PATHS = frozenset(
    {
        "/messages",
        "/messages/dequeue",
        "/supporters",
        "/v2/supporters",
        "/customer/register",
        "/v2/customer/register",
        "/auth/customer",
    }
)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if request.path in CORS_PATHS:
        methods = sorted({r.method for r in ROUTES if r.path == request.path})
        response.headers.update(
            {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": ", ".join(methods),
                "Access-Control-Max-Age": "21600",
                "Access-Control-Allow-Headers": "AUTHORIZATION, Content-Type",
            }
        )
    return response


async def cors_preflight(request: web.Request) -> web.Response:
    """``OPTIONS``: 200, empty, no authentication; ``cors_middleware`` adds the headers."""
    return web.Response(status=200)


# Paths every process serves beside its routing-table rows; never routed by the edge.
OPERATIONS_PATHS = ("/healthz", "/readyz", "/metrics")


def deadline_middleware(seconds: float) -> Middleware:
    """No request waits longer than ``seconds``: its work is cancelled and it is answered 503.
    MongoDB operations inside it get the remaining time as their deadline (so they give up
    first, cleanly). What was written stays consistent: a change and its event are one
    document write, and the outbox relay publishes an event whose publish was cut short."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPERATIONS_PATHS:
            return await handler(request)
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                with pymongo.timeout(seconds):
                    return await handler(request)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            log.warning("request deadline exceeded", seconds=seconds, path=request.path)
            raise ParleyError(DEADLINE_EXCEEDED, status=503) from exc

    return middleware


def operations_middlewares(
    service: str, settings: Settings, *extra: Middleware
) -> list[Middleware]:
    """Request id and log context, metrics and the access log, ``extra``, the error envelope,
    and the request deadline: in that order (outermost first)."""
    return [
        request_context_middleware(service, settings.request_id_header),
        observe_middleware(service, settings.access_log),
        *extra,
        error_middleware,
        deadline_middleware(settings.request_timeout),
    ]


def service_app(
    service: str, settings: Settings, handlers: Mapping[str, Handler]
) -> web.Application:
    """A bare service app: middleware, its routing-table rows bound to ``handlers`` (its
    internal rows behind the internal-secret check), ``/healthz``, ``/readyz`` and
    ``/metrics``."""
    app = web.Application(
        middlewares=operations_middlewares(service, settings, cors_middleware),
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[CLIENT_IP_HEADER] = settings.client_ip_header
    app[TRUSTED_PROXIES] = settings.trusted_proxies
    app[READY_CHECKS] = {}
    for route in [*routes_for(service), *internal_routes_for(service)]:
        if route.handler not in handlers:
            raise LookupError(f"service {service!r} has no handler {route.handler!r}")
        handler = handlers[route.handler]
        app.router.add_route(
            route.method, route.path, internal(handler) if route.internal else handler
        )
    add_operations_routes(app, lambda request: [request.app])
    return app


def add_operations_routes(
    app: web.Application, apps: Callable[[web.Request], list[web.Application]]
) -> None:
    """``/healthz``, ``/readyz`` (the checks of ``apps(request)``) and ``/metrics``."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz_handler(apps))
    app.router.add_get("/metrics", metrics_handler(apps))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. It checks nothing else (see ``/readyz``)."""
    return json_response({"status": "ok"})


async def run_checks(checks: Mapping[str, ReadyCheck]) -> dict[str, str]:
    """Runs every check at once, each with a short timeout: name -> "ok" or why not."""

    async def one(check: ReadyCheck) -> str:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await check()
        except TimeoutError:
            return f"no answer in {READY_TIMEOUT:g}s"
        except Exception as exc:
            return type(exc).__name__ + (f": {str(exc)[:120]}" if str(exc) else "")
        return "ok"

    names = list(checks)
    results = await asyncio.gather(*(one(checks[n]) for n in names))
    return dict(zip(names, results, strict=True))


def readyz_handler(apps: Callable[[web.Request], list[web.Application]]) -> Handler:
    async def readyz(request: web.Request) -> web.StreamResponse:
        """Readiness: 200 when everything this process needs answers; else 503 naming what
        is down (the envelope, plus each check's result)."""
        checks: dict[str, ReadyCheck] = {}
        for app in apps(request):
            if READY_CHECKS in app:
                found: dict[str, ReadyCheck] = app[READY_CHECKS]
                checks.update(found)
        started = time.perf_counter()
        results = await run_checks(checks)
        down = [name for name, result in results.items() if result != "ok"]
        if not down:
            return json_response({"status": "ready", "checks": results})
        log.info("not ready", down=down, ms=round((time.perf_counter() - started) * 1000, 1))
        return json_response(
            {"meta": {"code": 503, "message": f"not ready: {', '.join(down)}"}, "checks": results},
            status=503,
        )

    return readyz


def database_ctx(
    deps: Deps, indexes: Mapping[str, Sequence[IndexModel]], *, share: bool = False
) -> CleanupCtx:
    """The service's database (shared or its own client), with its indexes created; with
    ``share``, the one it opens is lent to the other services of the process (``deps.db``)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        client = None
        if deps.db is not None:
            app[DB] = deps.db
        else:
            client = make_client(settings.mongo_url, timeout=settings.mongo_timeout)
            app[DB] = client[settings.mongo_db]
            if share:
                deps.db = app[DB]
        db = app[DB]

        async def mongodb() -> None:
            await ping(db, READY_TIMEOUT)

        app[READY_CHECKS]["mongodb"] = mongodb
        try:
            await ensure_indexes(app[DB], indexes)
            yield
        finally:
            if client is not None:
                await client.close()

    return ctx


def rabbit_bus(url: str, settings: Settings, connection_name: str) -> RabbitBus:
    """The RabbitMQ bus at ``url``, as ``settings`` configure it."""
    return RabbitBus(
        url,
        exchange=settings.amqp_exchange,
        prefetch=settings.amqp_prefetch,
        publish_timeout=settings.publish_timeout,
        connection_name=connection_name,
    )


def own_rabbit_bus(service: str) -> Callable[[Settings], Bus]:
    """A service run on its own: its RabbitMQ connection, which it cannot run without."""

    def open_bus(settings: Settings) -> Bus:
        if not settings.amqp_url:
            raise RuntimeError("PARLEY_AMQP_URL is required to run a service on its own")
        return rabbit_bus(settings.amqp_url, settings, f"parley-{service}")

    return open_bus


def bus_ctx(
    deps: Deps,
    service: str,
    open_bus: Callable[[Settings], Bus] | None = None,
    *,
    share: bool = False,
) -> CleanupCtx:
    """The process's bus when ``deps`` has one, else one opened with ``open_bus`` (by default
    the service's own RabbitMQ connection), started, and closed at cleanup; with ``share``,
    the one it opens is lent to the other services of the process (``deps.bus``)."""
    opener = open_bus or own_rabbit_bus(service)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if deps.bus is not None:
            app[BUS] = deps.bus
            app[READY_CHECKS].update(deps.bus.ready_checks())
            yield
            return
        bus = opener(app[SETTINGS])
        try:
            await bus.start()  # a start that fails halfway closes what it opened below
            app[BUS] = bus
            if share:
                deps.bus = bus
            app[READY_CHECKS].update(bus.ready_checks())
            yield
        finally:
            await bus.close()

    return ctx


def verifier_ctx(deps: Deps) -> CleanupCtx:
    """Credential checks through the auth service (in-process when the runner provides it)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        inner: Verifier = deps.verifier or HttpVerifier(
            settings.auth_url, internal_secret=settings.internal_secret
        )
        verifier = CachingVerifier(inner, settings.auth_cache_ttl)
        app[VERIFIER] = verifier
        try:
            yield
        finally:
            if deps.verifier is None:
                await verifier.close()

    return ctx


def service_steps(
    deps: Deps,
    service: str,
    indexes: Mapping[str, Sequence[IndexModel]],
    *own: CleanupCtx,
    verify: bool = True,
) -> list[CleanupCtx]:
    """A service's startup steps: its database (with ``indexes``), the bus, the credential
    checks (``verify=False`` for the service that is the verifier), then its ``own`` steps."""
    return [
        database_ctx(deps, indexes),
        bus_ctx(deps, service),
        *([verifier_ctx(deps)] if verify else []),
        *own,
    ]


def outbox_ctx(revlogs: Callable[[web.Application], Sequence[RevLog]]) -> CleanupCtx:
    """Runs the outbox relay over the service's revision logs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        relay = OutboxRelay(
            revlogs(app),
            app[BUS],
            interval=settings.outbox_relay_interval,
            grace=settings.outbox_grace,
        )
        app[RELAY] = relay
        backlog_probes(app).append(relay.measure_backlog)
        relay.start()
        try:
            yield
        finally:
            await relay.stop()

    return ctx
