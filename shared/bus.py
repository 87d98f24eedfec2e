"""The event bus: one interface, two transports with the same semantics.

* ``RabbitBus``: RabbitMQ through aio-pika. One robust connection per process; a durable topic
  exchange (``PARLEY_AMQP_EXCHANGE``); persistent, mandatory messages published on a channel with
  publisher confirms; an alternate exchange that keeps unrouted events in a bounded queue; a
  dead-letter exchange and queue for events that cannot be processed.
* ``LocalBus``: the in-process bus of the all-in-one runner (nothing to install).

Semantics shared by both (and proven by ``tests/test_bus_contract.py`` on each):

* ``publish`` returns only once the event is accepted (broker confirm / queued in memory).
* Each subscription is a named queue bound by routing-key patterns (``*`` one word, ``#`` any).
* A handler's clean return acknowledges the event. A handler exception requeues it once; if it
  fails again on redelivery it is dead-lettered. An event that does not parse is dead-lettered
  at once. Delivery is at least once: handlers must be idempotent (see ``shared/outbox.py``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.events import Event, MalformedEvent, parse_event
from shared.loops import stop_if_cancelled
from shared.metrics import (
    CONFIRM_SECONDS,
    EVENTS_CONSUMED,
    EVENTS_DEAD_LETTERED,
    EVENTS_PUBLISHED,
    EVENTS_REDELIVERED,
    PUBLISH_FAILURES,
)

log = structlog.get_logger("parley.bus")

EventHandler = Callable[[Event], Awaitable[None]]

UNROUTED_MAX = 100_000
DEAD_MAX = 1_000_000


@dataclass(frozen=True)
class DeadLetter:
    routing_key: str
    body: bytes
    queue: str


class Subscription(abc.ABC):
    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop consuming; an event being handled is left unacknowledged (it will come back)."""


class Bus(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish one encoded event; returns once it is confirmed."""

    async def publish_event(self, event: Event, *, headers: dict[str, str] | None = None) -> None:
        await self.publish(
            event.routing_key, event.to_json(), message_id=event.event_id, headers=headers
        )

    @abc.abstractmethod
    async def subscribe(
        self,
        queue: str,
        bindings: Sequence[str],
        handler: EventHandler,
        *,
        durable: bool = True,
    ) -> Subscription:
        """Consume ``queue`` (created if missing, bound to each pattern of ``bindings``).

        ``durable=False`` makes a temporary queue that disappears with its subscriber."""

    @abc.abstractmethod
    async def take_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Remove and return up to ``limit`` dead-lettered events (oldest first)."""

    def ready_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Readiness checks of this transport, by name (none for the in-process bus)."""
        return {}


async def _dispatch(
    queue: str,
    routing_key: str,
    body: bytes,
    redelivered: bool,
    headers: dict[str, Any],
    handler: EventHandler,
) -> str:
    """Run one delivery through ``handler``; returns "ack", "requeue" or "dead"."""
    if redelivered:
        EVENTS_REDELIVERED.labels(queue).inc()
    outcome = await _handle(queue, routing_key, body, redelivered, headers, handler)
    EVENTS_CONSUMED.labels(queue, outcome).inc()
    if outcome == "dead":
        EVENTS_DEAD_LETTERED.labels(queue).inc()
    return outcome


async def _handle(
    queue: str,
    routing_key: str,
    body: bytes,
    redelivered: bool,
    headers: dict[str, Any],
    handler: EventHandler,
) -> str:
    structlog.contextvars.clear_contextvars()
    request_id = headers.get("request_id")
    structlog.contextvars.bind_contextvars(queue=queue, routing_key=routing_key)
    if isinstance(request_id, str):
        structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        event = parse_event(routing_key, body)
    except MalformedEvent as exc:
        log.warning("malformed event dead-lettered", error=str(exc)[:300])
        return "dead"
    structlog.contextvars.bind_contextvars(event_id=event.event_id, appid=event.appid)
    try:
        await handler(event)
    except asyncio.CancelledError:
        raise
    except Exception:
        if redelivered:
            log.exception("event failed again after redelivery; dead-lettered")
            return "dead"
        log.exception("event failed; requeued once")
        return "requeue"
    return "ack"


# ---- RabbitMQ -----------------------------------------------------------------------------


class _RabbitSubscription(Subscription):
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, tag: str) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = tag

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            await self._queue.cancel(self._tag)
        with contextlib.suppress(Exception):
            await self._channel.close()


async def _declare_capped_sink(
    channel: AbstractChannel, queue: str, max_length: int, exchange: str | None = None
) -> None:
    """A durable fanout exchange (named ``exchange``, or like the queue) bound to a durable
    queue that keeps its newest ``max_length`` messages: where unrouted and dead-lettered
    messages are kept for a look."""
    fanout = await channel.declare_exchange(
        exchange or queue, aio_pika.ExchangeType.FANOUT, durable=True
    )
    sink = await channel.declare_queue(
        queue, durable=True, arguments={"x-max-length": max_length, "x-overflow": "drop-head"}
    )
    await sink.bind(fanout)


class RabbitBus(Bus):
    def __init__(
        self,
        url: str,
        *,
        exchange: str = "parley.events",
        prefetch: int = 64,
        publish_timeout: float = 5.0,
        connection_name: str = "parley",
    ) -> None:
        self._url = url
        self._exchange_name = exchange
        self._prefetch = prefetch
        self._publish_timeout = publish_timeout
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self._exchange_name}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self._exchange_name}.dead"

    @property
    def unrouted_queue(self) -> str:
        return f"{self._exchange_name}.unrouted"

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url, client_properties={"connection_name": self._connection_name}
        )
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await self._declare_topology(self._channel)

    async def _declare_topology(self, channel: AbstractChannel) -> AbstractExchange:
        await _declare_capped_sink(channel, self.unrouted_queue, UNROUTED_MAX)
        await _declare_capped_sink(
            channel, self.dead_letter_queue, DEAD_MAX, self.dead_letter_exchange
        )
        return await channel.declare_exchange(
            self._exchange_name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": self.unrouted_queue},
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        if self._exchange is None:
            raise RuntimeError("bus not started")
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=dict(headers or {}),
        )
        # A confirm (ack) means the broker has the message; a nack or a return raises.
        started = time.perf_counter()
        try:
            if self._connection is None or not self._connection.connected.is_set():
                # Reconnecting: fail now rather than wait (the outbox publishes it later).
                raise ConnectionError("not connected to RabbitMQ")
            # The whole publish (a channel being restored included) has the deadline.
            async with asyncio.timeout(self._publish_timeout):
                await self._exchange.publish(
                    message, routing_key, mandatory=True, timeout=self._publish_timeout
                )
        except BaseException:
            PUBLISH_FAILURES.labels(routing_key).inc()
            raise
        CONFIRM_SECONDS.observe(time.perf_counter() - started)
        EVENTS_PUBLISHED.labels(routing_key).inc()

    def ready_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        async def rabbitmq() -> None:
            connection = self._connection
            if connection is None or connection.is_closed or not connection.connected.is_set():
                raise ConnectionError("not connected")

        return {"rabbitmq": rabbitmq}

    async def subscribe(
        self,
        queue: str,
        bindings: Sequence[str],
        handler: EventHandler,
        *,
        durable: bool = True,
    ) -> Subscription:
        if self._connection is None:
            raise RuntimeError("bus not started")

        async def on_message(message: AbstractIncomingMessage) -> None:
            outcome = await _dispatch(
                queue,
                message.routing_key or "",
                message.body,
                bool(message.redelivered),
                dict(message.headers or {}),
                handler,
            )
            if outcome == "ack":
                await message.ack()
            else:
                await message.reject(requeue=outcome == "requeue")

        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=self._prefetch)
            exchange = await self._declare_topology(channel)
            arguments: dict[str, Any] = {"x-dead-letter-exchange": self.dead_letter_exchange}
            amqp_queue = await channel.declare_queue(
                queue,
                durable=durable,
                exclusive=not durable,
                auto_delete=not durable,
                arguments=arguments,
            )
            for pattern in bindings:
                await amqp_queue.bind(exchange, pattern)
            tag = await amqp_queue.consume(on_message)
        except BaseException:
            # Refused (a queue declared with other arguments, say): close the channel, which
            # would otherwise reopen itself and stay open for nothing.
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        return _RabbitSubscription(channel, amqp_queue, tag)

    async def take_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if self._connection is None:
            raise RuntimeError("bus not started")
        channel = await self._connection.channel()
        try:
            dead = await channel.declare_queue(
                self.dead_letter_queue,
                durable=True,
                arguments={"x-max-length": DEAD_MAX, "x-overflow": "drop-head"},
            )
            letters: list[DeadLetter] = []
            while len(letters) < limit:
                message = await dead.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(
                    DeadLetter(message.routing_key or "", message.body, _death_queue(message))
                )
                await message.ack()
            return letters
        finally:
            await channel.close()


def _death_queue(message: AbstractIncomingMessage) -> str:
    deaths = (message.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        queue = deaths[0].get("queue")
        if isinstance(queue, bytes):
            return queue.decode()
        if isinstance(queue, str):
            return queue
    return ""


# ---- in-process ---------------------------------------------------------------------------


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on ``.``; ``*`` is exactly one word, ``#`` any number."""
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match_words(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match_words(rest, words[1:])


@dataclass
class _Delivery:
    routing_key: str
    body: bytes
    headers: dict[str, str]
    redelivered: bool = False


@dataclass
class _LocalQueue:
    name: str
    patterns: list[str]
    durable: bool
    items: asyncio.Queue[_Delivery] = field(default_factory=asyncio.Queue)
    workers: set[asyncio.Task[None]] = field(default_factory=set)

    def matches(self, routing_key: str) -> bool:
        return any(topic_matches(p, routing_key) for p in self.patterns)


class _LocalSubscription(Subscription):
    def __init__(self, bus: LocalBus, queue: _LocalQueue, worker: asyncio.Task[None]) -> None:
        self._bus = bus
        self._queue = queue
        self._worker = worker

    async def cancel(self) -> None:
        await self._bus._stop_worker(self._queue, self._worker)


class LocalBus(Bus):
    """The all-in-one bus: queues live in this process. Queues outlive their subscribers (as
    durable RabbitMQ queues do) but not the process; the outbox republishes whatever was not
    yet published when a process stopped."""

    def __init__(self) -> None:
        self._queues: dict[str, _LocalQueue] = {}
        self._dead: deque[DeadLetter] = deque(maxlen=DEAD_MAX)
        self._unrouted: deque[_Delivery] = deque(maxlen=UNROUTED_MAX)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for queue in list(self._queues.values()):
            for worker in list(queue.workers):
                await self._stop_worker(queue, worker)

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        delivered = False
        for queue in self._queues.values():
            if queue.matches(routing_key):
                queue.items.put_nowait(_Delivery(routing_key, body, dict(headers or {})))
                delivered = True
        if not delivered:
            self._unrouted.append(_Delivery(routing_key, body, dict(headers or {})))
        EVENTS_PUBLISHED.labels(routing_key).inc()

    async def subscribe(
        self,
        queue: str,
        bindings: Sequence[str],
        handler: EventHandler,
        *,
        durable: bool = True,
    ) -> Subscription:
        local = self._queues.get(queue)
        if local is None:
            local = _LocalQueue(queue, [], durable)
            self._queues[queue] = local
        local.patterns.extend(p for p in bindings if p not in local.patterns)
        # Several subscribers of one queue compete for its events, as replicas do on RabbitMQ.
        worker = asyncio.create_task(self._work(local, handler), name=f"bus:{queue}")
        local.workers.add(worker)
        return _LocalSubscription(self, local, worker)

    async def _work(self, queue: _LocalQueue, handler: EventHandler) -> None:
        while True:
            delivery = await queue.items.get()
            try:
                outcome = await _dispatch(
                    queue.name,
                    delivery.routing_key,
                    delivery.body,
                    delivery.redelivered,
                    delivery.headers,
                    handler,
                )
            except asyncio.CancelledError:
                # Unacknowledged: it goes back to the queue, flagged as a redelivery.
                delivery.redelivered = True
                queue.items.put_nowait(delivery)
                raise
            if outcome == "requeue":
                delivery.redelivered = True
                queue.items.put_nowait(delivery)
            elif outcome == "dead":
                self._dead.append(DeadLetter(delivery.routing_key, delivery.body, queue.name))
            stop_if_cancelled()  # a handler's driver may have swallowed the cancellation

    async def _stop_worker(self, queue: _LocalQueue, worker: asyncio.Task[None]) -> None:
        queue.workers.discard(worker)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        if not queue.durable and not queue.workers:
            self._queues.pop(queue.name, None)

    async def take_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        while self._dead and len(letters) < limit:
            letters.append(self._dead.popleft())
        return letters
