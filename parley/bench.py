"""``parley bench``: load through the edge, per endpoint family, with a progress line, a results
table (or ``--json``): requests/s, latency percentiles, errors, and the event lag (from the
200 to a subscriber's receipt of the request's event; needs ``--amqp-url``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from parley.benchcost import CostMeter, preload
from shared.bus import RabbitBus
from shared.events import Event, GroupMessage, PeerMessage, TokenGranted

FAMILIES = (
    "grant",
    "regrant",
    "groups",
    "peer",
    "group",
    "history",
    "offline",
    "member-add",
    "group-create",
)
GROUP_SIZE = 500
CREATE_SIZE = 10  # members of each group the group-create family creates


@dataclass
class Result:
    family: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.rate, 1),
            "latency_ms": {
                f"p{p}": round(percentile(self.latencies, p) * 1000, 2) for p in (50, 90, 99)
            },
            "event_lag_ms": (
                {f"p{p}": round(percentile(self.lags, p) * 1000, 2) for p in (50, 99)}
                if self.lags
                else None
            ),
            **{k: round(v, 2) for k, v in self.extra.items()},
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(
        self,
        url: str,
        appid: int,
        secret: str,
        *,
        concurrency: int,
        duration: float,
        amqp_url: str | None,
        exchange: str,
        quiet: bool,
        cost: CostMeter | None = None,
        preload_users: int = 0,
        preload_messages: int = 0,
    ) -> None:
        self.url = url.rstrip("/")
        self.appid = appid
        credential = f"{appid}:{hashlib.md5(secret.encode()).hexdigest()}"
        self.server = {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}
        self.concurrency = concurrency
        self.duration = duration
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.quiet = quiet
        self.sent: dict[str, float] = {}  # event marker -> when its request got its 200
        self.received: dict[str, float] = {}  # event marker -> when its event arrived
        self.http: aiohttp.ClientSession
        self.cost = cost
        self.preload_users = preload_users
        self.preload_messages = preload_messages
        self.groups: list[int] = []  # created by the setup

    async def remove_groups(self) -> None:
        """Disbands the groups the setup created (the run used an existing app)."""
        async with aiohttp.ClientSession() as http:
            for gid in self.groups:
                async with http.delete(f"{self.url}/groups/{gid}", headers=self.server):
                    pass

    # ---- plumbing ----

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            body = await resp.read()
            return resp.status, body

    async def server_call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """``call`` with the bench app's server credentials (scheme A)."""
        return await self.call(method, path, headers=self.server, **kwargs)

    async def on_event(self, event: Event) -> None:
        if event.appid != self.appid:
            return
        now = time.perf_counter()
        marker = None
        if isinstance(event, (PeerMessage, GroupMessage)):
            marker = event.content
        elif isinstance(event, TokenGranted):
            marker = f"grant:{event.uid}:{event.user_name}"
        if marker:
            self.received.setdefault(marker, now)

    def lags(self, family: str) -> list[float]:
        """200-to-receipt times of a family's events (an event that beat its 200 counts 0)."""
        prefix = f"{family}:"
        return [
            max(0.0, self.received[marker] - sent)
            for marker, sent in self.sent.items()
            if marker.startswith(prefix) and marker in self.received
        ]

    def preload_note(self, text: str, done: bool) -> None:
        if not self.quiet:
            sys.stderr.write(f"\r{text}   " + ("\n" if done else ""))
            sys.stderr.flush()

    def progress(self, family: str, started: float, result: Result) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - started
        rate = result.requests / elapsed if elapsed else 0.0
        sys.stderr.write(
            f"\r{family:<8} {elapsed:5.1f}s/{self.duration:.0f}s  {result.requests:7d} requests"
            f"  {rate:8.1f}/s  errors {result.errors}   "
        )
        sys.stderr.flush()

    async def run_family(
        self, family: str, one: Callable[[int, int], Awaitable[tuple[int, str | None]]]
    ) -> Result:
        result = Result(family)
        started = time.perf_counter()
        deadline = started + self.duration
        counter = itertools.count()

        async def worker(w: int) -> None:
            while time.perf_counter() < deadline:
                n = next(counter)
                t0 = time.perf_counter()
                try:
                    status, marker = await one(w, n)
                except (aiohttp.ClientError, TimeoutError):
                    status, marker = 0, None
                t1 = time.perf_counter()
                result.latencies.append(t1 - t0)
                result.requests += 1
                if status != 200:
                    result.errors += 1
                elif marker is not None:
                    self.sent[marker] = t1

        async def ticker() -> None:
            while True:
                self.progress(family, started, result)
                await asyncio.sleep(0.5)

        if self.cost is not None:
            await self.cost.start(self.http)
        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(worker(w) for w in range(self.concurrency)))
        result.seconds = time.perf_counter() - started
        tick.cancel()
        if self.cost is not None:
            result.extra.update(await self.cost.finish(self.http, result.requests))
        self.progress(family, started, result)
        if not self.quiet:
            sys.stderr.write("\n")
        return result

    # ---- setup and families ----

    def note(self, text: str, done: bool = True) -> None:
        """A setup progress line (rewritten in place until ``done``)."""
        if not self.quiet:
            sys.stderr.write(f"\rsetup: {text}   " + ("\n" if done else ""))
            sys.stderr.flush()

    async def setup(self, families: list[str]) -> dict[str, Any]:
        state: dict[str, Any] = {"tokens": []}
        if {"history", "offline", "grant", "regrant"} & set(families):
            for uid in range(1, 201):
                self.note(f"granting tokens {uid}/200", done=uid == 200)
                status, body = await self.server_call(
                    "POST", "/auth/grant", json={"uid": uid, "user_name": f"u{uid}"}
                )
                if status != 200:
                    raise RuntimeError(f"cannot grant tokens: {status} {body[:200]!r}")
                state["tokens"].append(json.loads(body)["data"]["token"])
        if "group" in families:
            self.note(f"creating a {GROUP_SIZE}-member group")
            status, body = await self.server_call(
                "POST",
                "/groups",
                json={"master": 1, "name": "bench", "members": list(range(1, GROUP_SIZE + 1))},
            )
            state["big_group"] = json.loads(body)["data"]["group_id"]
            self.groups.append(state["big_group"])
        if "groups" in families:
            status, body = await self.server_call(
                "POST", "/groups", json={"master": 1, "name": "churn", "members": [1, 2]}
            )
            state["churn_group"] = json.loads(body)["data"]["group_id"]
            self.groups.append(state["churn_group"])
        if "member-add" in families:
            # One group per client, each growing by one member per request.
            state["add_groups"] = []
            for w in range(self.concurrency):
                self.note(f"creating groups to add members to {w + 1}/{self.concurrency}")
                status, body = await self.server_call(
                    "POST", "/groups", json={"master": 1, "name": f"add {w}", "members": [1]}
                )
                state["add_groups"].append(json.loads(body)["data"]["group_id"])
                self.groups.append(state["add_groups"][-1])
        if {"history", "offline"} & set(families):
            for n in range(100):  # something to read
                self.note(f"posting messages to read {n + 1}/100", done=n == 99)
                await self.server_call(
                    "POST",
                    "/messages/peers",
                    json={"sender": 2, "receiver": 1 + n % 200, "content": f"history {n}"},
                )
        return state

    async def run(self, families: list[str]) -> list[Result]:
        connector = aiohttp.TCPConnector(limit=self.concurrency * 2)
        async with aiohttp.ClientSession(connector=connector) as self.http:
            bus = None
            subscription = None
            if self.amqp_url:
                bus = RabbitBus(self.amqp_url, exchange=self.exchange, prefetch=1000)
                await bus.start()
                subscription = await bus.subscribe(
                    f"bench.{random.getrandbits(48):x}",
                    ["message.peer", "message.group", "token.granted"],
                    self.on_event,
                    durable=False,
                )
            try:
                if self.preload_users or self.preload_messages:
                    await preload(
                        self.call,
                        self.server,
                        users=self.preload_users,
                        messages=self.preload_messages,
                        concurrency=self.concurrency,
                        note=self.preload_note,
                    )
                state = await self.setup(families)
                results = [await self.family(name, state) for name in families]
                await asyncio.sleep(2)  # late events
                for result in results:
                    result.lags = self.lags(result.family)
                    if self.amqp_url and result.family in ("grant", "peer", "group"):
                        result.extra["events_missing"] = sum(
                            1
                            for m in self.sent
                            if m.startswith(result.family + ":") and m not in self.received
                        )
                return results
            finally:
                if subscription is not None:
                    await subscription.cancel()
                if bus is not None:
                    await bus.close()

    async def family(self, name: str, state: dict[str, Any]) -> Result:
        tag = f"{random.getrandbits(32):x}"
        if name == "grant":

            async def one(w: int, n: int) -> tuple[int, str | None]:
                uid = 1 + n % 200
                status, _ = await self.server_call(
                    "POST", "/auth/grant", json={"uid": uid, "user_name": f"{tag}{n}"}
                )
                return status, f"grant:{uid}:{tag}{n}"

        elif name == "regrant":  # an existing user, nothing changed: the token is read back

            async def one(w: int, n: int) -> tuple[int, str | None]:
                uid = 1 + n % 200
                status, _ = await self.server_call(
                    "POST", "/auth/grant", json={"uid": uid, "user_name": f"u{uid}"}
                )
                return status, None

        elif name == "groups":
            gid = state["churn_group"]

            async def one(w: int, n: int) -> tuple[int, str | None]:
                member = 1000 + w
                if n % 2 == 0:
                    status, _ = await self.server_call(
                        "POST", f"/groups/{gid}/members", json=[member]
                    )
                else:
                    status, _ = await self.server_call("DELETE", f"/groups/{gid}/members/{member}")
                return status, None

        elif name == "peer":

            async def one(w: int, n: int) -> tuple[int, str | None]:
                content = f"peer:{tag}:{n}"
                status, _ = await self.server_call(
                    "POST",
                    "/messages/peers",
                    json={
                        "sender": 1 + w,
                        "receiver": 1 + (n * 7919) % 100_000,
                        "content": content,
                    },
                )
                return status, content

        elif name == "group":
            gid = state["big_group"]

            async def one(w: int, n: int) -> tuple[int, str | None]:
                content = f"group:{tag}:{n}"
                status, _ = await self.server_call(
                    "POST",
                    "/messages/groups",
                    json={"sender": 1, "receiver": gid, "content": content},
                )
                return status, content

        elif name == "member-add":
            groups = state["add_groups"]

            async def one(w: int, n: int) -> tuple[int, str | None]:
                status, _ = await self.server_call(
                    "POST", f"/groups/{groups[w]}/members", json=[10_000 + n]
                )
                return status, None

        elif name == "group-create":

            async def one(w: int, n: int) -> tuple[int, str | None]:
                first = 1 + n % 190
                status, body = await self.server_call(
                    "POST",
                    "/groups",
                    json={
                        "master": first,
                        "name": f"{tag}{n}",
                        "members": list(range(first, first + CREATE_SIZE)),
                    },
                )
                if status == 200:
                    self.groups.append(json.loads(body)["data"]["group_id"])
                return status, None

        else:
            tokens = state["tokens"]
            path = "/messages" if name == "history" else "/messages/offline"

            async def one(w: int, n: int) -> tuple[int, str | None]:
                token = tokens[n % len(tokens)]
                status, _ = await self.call(
                    "GET", path, headers={"Authorization": f"Bearer {token}"}
                )
                return status, None

        result = await self.run_family(name, one)
        if name == "group":
            result.extra["inbox_entries_per_s"] = result.rate * GROUP_SIZE
        return result


def table(results: list[Result], header: str) -> str:
    lines = [
        header,
        f"{'family':<9}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'lag p50':>9}{'lag p99':>9}  notes",
    ]
    for r in results:
        d = r.as_dict()
        lag = d["event_lag_ms"] or {"p50": float("nan"), "p99": float("nan")}
        notes = (
            f"{d['inbox_entries_per_s']:.0f} inbox entries/s" if "inbox_entries_per_s" in d else ""
        )
        lines.append(
            f"{r.family:<9}{d['requests_per_s']:>9.1f}{d['latency_ms']['p50']:>9.1f}"
            f"{d['latency_ms']['p90']:>9.1f}{d['latency_ms']['p99']:>9.1f}{r.errors:>8}"
            f"{lag['p50']:>9.1f}{lag['p99']:>9.1f}"
            f"  {notes}"
        )
    return "\n".join(lines)
