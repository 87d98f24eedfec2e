"""The lifecycle kit: how a service app opens, runs and closes what it needs.

Everything a service holds while it runs is opened by one ``cleanup_ctx`` step per resource
(open before its one ``yield``, close after), so when a later step fails at startup, aiohttp
closes exactly the steps that had opened: nothing leaks.

* ``resource_ctx``: a client with an ``async close()`` (an internal-API client, say) under a
  typed key, or the in-process one the all-in-one runner provides, which is not closed here.
* ``Consumer`` and ``consumers_ctx``: a service declares its event consumers as data; one step
  subscribes them all and cancels them at stop. Each event has a deadline: a handler that
  overruns it is cancelled, logged, and the delivery fails as any failed handler does (requeued
  once, then dead-lettered: see ``shared/bus.py``).
* ``periodic_ctx``: a background pass run every few seconds, whose failures are logged.
* ``ServiceSpec`` and ``start_order``: what a service provides to the others of its process and
  what it takes from them, so the all-in-one runner starts providers first whatever the order
  it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import structlog
from aiohttp import web

from shared.bus import EventHandler, Subscription
from shared.events import Event
from shared.loops import run_every
from shared.settings import Settings
from shared.web import BUS, SETTINGS, CleanupCtx, Deps

log = structlog.get_logger("parley.lifecycle")


# ---- resources ----------------------------------------------------------------------------


class Closeable(Protocol):
    async def close(self) -> None: ...


R = TypeVar("R", bound=Closeable)


def resource_ctx(
    key: web.AppKey[R],
    open_own: Callable[[Settings], R],
    shared: Callable[[], R | None] = lambda: None,
) -> CleanupCtx:
    """``app[key]``: the process's own when ``shared()`` gives one (read at startup, after the
    services that provide it have started; its owner closes it), else one opened with
    ``open_own(settings)`` and closed at cleanup."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        found = shared()
        if found is not None:
            app[key] = found
            yield
            return
        own = open_own(app[SETTINGS])
        try:
            app[key] = own
            yield
        finally:
            await own.close()

    return ctx


# ---- consumers ----------------------------------------------------------------------------


class EventTimeout(Exception):
    """A consumer's handler did not finish an event in its time."""


@dataclass(frozen=True)
class Consumer:
    """One event consumer of a service: its queue (named ``<exchange>.<queue>``), the routing
    key patterns bound to it, its handler (found in the started app: usually a domain's
    method) and how long one event may take."""

    queue: str
    routing_keys: tuple[str, ...]
    handler: Callable[[web.Application], EventHandler]
    timeout: float

    def queue_name(self, settings: Settings) -> str:
        return f"{settings.amqp_exchange}.{self.queue}"


def with_timeout(queue: str, handler: EventHandler, seconds: float) -> EventHandler:
    """``handler`` with a deadline per event: past it, the handler is cancelled and the event
    fails with ``EventTimeout`` (the bus then requeues it once, then dead-letters it)."""

    async def timed(event: Event) -> None:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                await handler(event)
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # the handler's own timeout, not this deadline: an ordinary failure
            log.warning(
                "event handler overran its deadline; the delivery fails",
                queue=queue,
                routing_key=event.routing_key,
                event_id=event.event_id,
                seconds=seconds,
            )
            raise EventTimeout(f"{queue}: no result in {seconds:g} s") from exc

    return timed


def consumers_ctx(*consumers: Consumer) -> CleanupCtx:
    """Subscribes every consumer at startup (after the steps its handler needs) and cancels
    them all at cleanup, or as soon as one of them cannot subscribe."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings, bus = app[SETTINGS], app[BUS]
        subscriptions: list[Subscription] = []
        try:
            for consumer in consumers:
                queue = consumer.queue_name(settings)
                handler = with_timeout(queue, consumer.handler(app), consumer.timeout)
                subscriptions.append(
                    await bus.subscribe(queue, list(consumer.routing_keys), handler)
                )
            yield
        finally:
            for subscription in reversed(subscriptions):
                await subscription.cancel()

    return ctx


# ---- background passes --------------------------------------------------------------------


def periodic_ctx(
    name: str,
    step: Callable[[web.Application], Callable[[], Awaitable[object]]],
    interval: Callable[[Settings], float],
) -> CleanupCtx:
    """Runs ``step(app)()`` every ``interval(settings)`` seconds from startup to cleanup, in a
    task named ``name``; a pass that fails is logged with its traceback and the next retries."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with running(run_every(interval(app[SETTINGS]), step(app), name), name):
            yield

    return ctx


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, object], name: str) -> AsyncIterator[None]:
    """Runs ``work`` as a task named ``name`` for the block; then cancels it and waits for it."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- services of one process --------------------------------------------------------------

# What a service may put in ``Deps`` for the others of its process (its in-process API) and
# take from it (instead of the owner's internal HTTP API): the names of ``Deps`` fields.
Provided = Literal["verifier", "tokens", "groups", "customers", "messages"]


@dataclass(frozen=True)
class ServiceSpec:
    """A service as the all-in-one runner sees it: its app factory, the ``Deps`` fields its
    startup fills (``provides``) and those its startup reads (``needs``)."""

    name: str
    create: Callable[[Settings, Deps], web.Application]
    provides: frozenset[Provided] = frozenset()
    needs: frozenset[Provided] = frozenset()

    def __call__(self, settings: Settings, deps: Deps | None = None) -> web.Application:
        return self.create(settings, deps or Deps())


def start_order(specs: Iterable[ServiceSpec]) -> list[ServiceSpec]:
    """The services, each after those providing what it needs, and otherwise by name: the
    same order whatever the order of ``specs``. A need that no service of the list provides
    is left to the HTTP client (as a service run alone does)."""
    pending = {spec.name: spec for spec in specs}
    providers: dict[str, set[str]] = {}
    for spec in pending.values():
        for item in spec.provides:
            providers.setdefault(item, set()).add(spec.name)
    ordered: list[ServiceSpec] = []
    while pending:
        started = {spec.name for spec in ordered}
        ready = sorted(
            name
            for name, spec in pending.items()
            if all(providers.get(item, set()) - {name} <= started for item in spec.needs)
        )
        if not ready:
            cycle = ", ".join(sorted(pending))
            raise ValueError(f"services that need each other's in-process API: {cycle}")
        ordered.append(pending.pop(ready[0]))
    return ordered


def check_provided(spec: ServiceSpec, deps: Deps) -> None:
    """After ``spec``'s service started: it filled every ``Deps`` field it declares."""
    missing = sorted(item for item in spec.provides if getattr(deps, item) is None)
    if missing:
        raise RuntimeError(f"service {spec.name!r} started without providing {missing}")
