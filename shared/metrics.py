"""Prometheus metrics of one Parley process, served at ``/metrics`` (internal only: the edge
never routes it).

The instruments live in one registry per process. Requests are observed by
``observe_middleware`` (which also writes the access log), store commands by a PyMongo
``CommandListener`` registered where clients are made (``shared/mongo.py``), events by the
bus (``shared/bus.py``) and the outbox relay (``shared/outbox.py``). Backlogs (events waiting
in outboxes, messages still pending) are counted in MongoDB when ``/metrics`` is scraped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pymongo import monitoring

REGISTRY = CollectorRegistry(auto_describe=True)

# Seconds; from a cached credential check to a slow store write.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "parley_http_requests",
    "HTTP requests answered, by route (the routing table's path), method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "parley_http_request_duration_seconds",
    "Time from receiving a request to its answer, by route and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STORE_COMMAND_SECONDS = Histogram(
    "parley_store_command_duration_seconds",
    "MongoDB command latency, by command name.",
    ["command"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STORE_COMMAND_FAILURES = Counter(
    "parley_store_command_failures",
    "MongoDB commands that failed (an error reply or a lost connection), by command name.",
    ["command"],
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "parley_events_published",
    "Events accepted by the bus (confirmed by the broker), by routing key.",
    ["routing_key"],
    registry=REGISTRY,
)
PUBLISH_FAILURES = Counter(
    "parley_event_publish_failures",
    "Publishes that failed (no confirm in time, a nack, a return, no connection).",
    ["routing_key"],
    registry=REGISTRY,
)
CONFIRM_SECONDS = Histogram(
    "parley_event_publish_confirm_seconds",
    "Time from publishing an event to the broker's confirm.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
EVENTS_CONSUMED = Counter(
    "parley_events_consumed",
    "Deliveries handled by Parley's consumers, by queue and outcome (ack, requeue, dead).",
    ["queue", "outcome"],
    registry=REGISTRY,
)
EVENTS_REDELIVERED = Counter(
    "parley_events_redelivered",
    "Deliveries that arrived flagged as redelivered, by queue.",
    ["queue"],
    registry=REGISTRY,
)
EVENTS_DEAD_LETTERED = Counter(
    "parley_events_dead_lettered",
    "Deliveries sent to the dead-letter queue, by queue.",
    ["queue"],
    registry=REGISTRY,
)
OUTBOX_REPUBLISHED = Counter(
    "parley_outbox_republished",
    "Events published by the outbox relay (left over by a failed or interrupted publish).",
    registry=REGISTRY,
)
OUTBOX_BACKLOG = Gauge(
    "parley_outbox_backlog",
    "Documents holding unpublished events, by collection (counted at scrape time).",
    ["collection"],
    registry=REGISTRY,
)
PENDING_MESSAGES = Gauge(
    "parley_pending_messages",
    "Messages accepted but not yet stored and announced (counted at scrape time).",
    registry=REGISTRY,
)
STORE_RESTARTS = Counter(
    "parley_embedded_store_restarts",
    "Restarts of the embedded store (FerretDB) by `parley run` after it exited.",
    registry=REGISTRY,
)

access_log = structlog.get_logger("parley.access")

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away

# Set on a request once it has been observed: in the all-in-one process a request passes the
# edge's middleware and its service's, and must be counted (and logged) once.
_OBSERVED = web.RequestKey("parley_observed", bool)

BacklogProbe = Callable[[], Awaitable[None]]
BACKLOG_PROBES = web.AppKey("parley_backlog_probes", list[BacklogProbe])


def route_name(request: web.Request) -> str:
    """The routing table's path of a request (``/groups/{gid}``), never the concrete path:
    bounded label values, and no ids in the logs."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    if resource is None or info.http_exception is not None:
        return "unmatched"
    return resource.canonical


def observe_middleware(service: str, log_requests: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.get(_OBSERVED):
            return await handler(request)
        request[_OBSERVED] = True
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client went away (the server cancels its handler): one info line.
                status = CLIENT_CLOSED
                structlog.get_logger("parley.errors").info("client disconnected", path=request.path)
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = route_name(request)
            if route not in ("/metrics", "/healthz", "/readyz"):
                REQUESTS.labels(route, request.method, str(status)).inc()
                REQUEST_SECONDS.labels(route, request.method).observe(elapsed)
            if log_requests:
                context = structlog.contextvars.get_contextvars()
                access_log.info(
                    "access",
                    method=request.method,
                    route=route,
                    status=status,
                    ms=round(elapsed * 1000, 2),
                    request_id=context.get("request_id"),
                    appid=context.get("appid"),
                )

    return middleware


def backlog_probes(app: web.Application) -> list[BacklogProbe]:
    """The app's scrape-time backlog counters (created on first use)."""
    if BACKLOG_PROBES not in app:
        app[BACKLOG_PROBES] = []
    return app[BACKLOG_PROBES]


def metrics_handler(apps: Callable[[web.Request], list[web.Application]]) -> Handler:
    """``GET /metrics``: refreshes the backlog gauges of ``apps(request)``, then renders the
    registry in Prometheus' text format."""

    async def handler(request: web.Request) -> web.StreamResponse:
        for app in apps(request):
            for probe in app.get(BACKLOG_PROBES, []):
                try:
                    await probe()
                except Exception as exc:  # the store is down: keep the last values
                    structlog.get_logger("parley.metrics").warning(
                        "backlog probe failed", error=repr(exc)
                    )
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return handler


class StoreCommandListener(monitoring.CommandListener):
    """Times every MongoDB command by name."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        return None

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        STORE_COMMAND_SECONDS.labels(event.command_name).observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        STORE_COMMAND_SECONDS.labels(event.command_name).observe(event.duration_micros / 1e6)
        STORE_COMMAND_FAILURES.labels(event.command_name).inc()


STORE_LISTENER = StoreCommandListener()
