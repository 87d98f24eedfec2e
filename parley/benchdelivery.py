"""Benchmarks of the delivery service against a running Parley (``parley run`` or a
``parley serve delivery`` with its services):

* ``idle``: how many authenticated, idle TCP connections one process holds, and its RSS.
* ``rest``: REST ``POST /messages/peers`` at a fixed rate to connected receivers; the time
  from sending the request to the pushed frame's arrival (p50, p99, max), and losses.
* ``client``: peer messages sent by TCP clients to TCP clients (client -> server -> client);
  messages per second and the server's CPU per message.

``python -m parley.benchdelivery MODE --url URL --tcp HOST:PORT --appid N --secret S
[--pid PID]`` (``--pid``: the server process, for RSS and CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import struct
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

HEAD = struct.Struct(">iiBBBB")
AUTH_STATUS, IM, ACK, AUTH_TOKEN, METADATA = 3, 4, 5, 15, 37
PUSH = 0x10


def _server_auth(appid: int, secret: str) -> str:
    digest = hashlib.md5(secret.encode()).hexdigest()
    return "Basic " + base64.b64encode(f"{appid}:{digest}".encode()).decode()


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _grant(http: aiohttp.ClientSession, url: str, auth: str, uid: int) -> str:
    async with http.post(
        f"{url}/auth/grant", json={"uid": uid, "user_name": ""}, headers={"Authorization": auth}
    ) as resp:
        body = await resp.json()
        return str(body["data"]["token"])


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seq = 0

    @classmethod
    async def open(cls, tcp: str, token: str, device: str) -> Conn:
        host, port = tcp.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        conn = cls(reader, writer)
        t, d = token.encode(), device.encode()
        conn.send(AUTH_TOKEN, bytes([2, len(t)]) + t + bytes([len(d)]) + d)
        cmd, _, _, body = await conn.read()
        if cmd != AUTH_STATUS or body != bytes(4):
            raise RuntimeError("authentication failed")
        return conn

    def send(self, cmd: int, body: bytes) -> int:
        self.seq += 1
        self.writer.write(HEAD.pack(len(body), self.seq, cmd, 2, 0, 0) + body)
        return self.seq

    async def read(self) -> tuple[int, int, int, bytes]:
        length, seq, cmd, _, flag, _ = HEAD.unpack(await self.reader.readexactly(12))
        return cmd, seq, flag, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _tokens(url: str, auth: str, uids: Sequence[int]) -> dict[int, str]:
    async with aiohttp.ClientSession() as http:
        limit = asyncio.Semaphore(16)

        async def one(uid: int) -> tuple[int, str]:
            async with limit:
                return uid, await _grant(http, url, auth, uid)

        return dict(await asyncio.gather(*(one(u) for u in uids)))


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    auth = _server_auth(args.appid, args.secret)
    users = max(1, args.connections // args.devices)
    tokens = await _tokens(args.url, auth, range(1, users + 1))
    before = _rss_mib(args.pid)
    limit = asyncio.Semaphore(50)
    conns: list[Conn] = []
    started = time.perf_counter()

    async def one(i: int) -> None:
        async with limit:
            conns.append(await Conn.open(args.tcp, tokens[i % users + 1], f"bench-{i}"))

    await asyncio.gather(*(one(i) for i in range(args.connections)))
    connected = time.perf_counter() - started
    await asyncio.sleep(args.hold)
    after = _rss_mib(args.pid)
    for conn in conns:
        conn.close()
    return {
        "mode": "idle",
        "connections": len(conns),
        "users": users,
        "connect_seconds": round(connected, 2),
        "server_rss_mib_before": before,
        "server_rss_mib_held": after,
        "kib_per_connection": (
            round((after - before) * 1024 / len(conns), 1) if before and after else None
        ),
    }


RUN = os.urandom(6).hex()  # this run's messages (a server may still push an earlier run's)


async def _receive(conn: Conn, latencies: list[float]) -> None:
    try:
        while True:
            cmd, _, flag, body = await conn.read()
            if cmd == IM and flag & PUSH:
                sent = json.loads(body[24:])
                if sent.get("run") == RUN:
                    latencies.append(time.time() - sent["t"])
    except (asyncio.IncompleteReadError, ConnectionError):
        return


async def rest(args: argparse.Namespace) -> dict[str, Any]:
    auth = _server_auth(args.appid, args.secret)
    receivers = list(range(100_001, 100_001 + args.receivers))
    tokens = await _tokens(args.url, auth, receivers)
    conns = [await Conn.open(args.tcp, tokens[uid], f"r-{uid}") for uid in receivers]
    latencies: list[float] = []
    readers = [asyncio.create_task(_receive(c, latencies)) for c in conns]
    errors = 0
    total = int(args.rate * args.duration)
    cpu0 = _cpu_seconds(args.pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:

        async def post(n: int) -> None:
            nonlocal errors
            content = json.dumps({"t": time.time(), "n": n, "run": RUN})
            body = {"sender": 1, "receiver": receivers[n % len(receivers)], "content": content}
            try:
                async with http.post(
                    f"{args.url}/messages/peers", json=body, headers={"Authorization": auth}
                ) as resp:
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

        started = time.perf_counter()
        tasks = []
        for n in range(total):
            delay = started + n / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(n)))
        await asyncio.gather(*tasks)
        sent_seconds = time.perf_counter() - started
    await asyncio.sleep(2.0)  # the last pushes
    cpu1 = _cpu_seconds(args.pid)
    for task in readers:
        task.cancel()
    for conn in conns:
        conn.close()
    ms = [x * 1000 for x in latencies]
    return {
        "mode": "rest",
        "requested_rate": args.rate,
        "achieved_rate": round(total / sent_seconds, 1),
        "messages": total,
        "errors": errors,
        "pushed": len(latencies),
        "p50_ms": round(_percentile(ms, 0.5), 1),
        "p99_ms": round(_percentile(ms, 0.99), 1),
        "max_ms": round(max(ms, default=0), 1),
        "server_cpu_ms_per_message": (
            round((cpu1 - cpu0) * 1000 / total, 2) if cpu0 is not None and cpu1 else None
        ),
    }


async def client(args: argparse.Namespace) -> dict[str, Any]:
    """Pairs of clients: each sender keeps ``window`` messages in flight to its receiver."""
    auth = _server_auth(args.appid, args.secret)
    pairs = args.receivers
    uids = list(range(200_001, 200_001 + 2 * pairs))
    tokens = await _tokens(args.url, auth, uids)
    senders = [await Conn.open(args.tcp, tokens[uids[i]], f"s-{i}") for i in range(pairs)]
    receivers = [await Conn.open(args.tcp, tokens[uids[pairs + i]], f"r-{i}") for i in range(pairs)]
    latencies: list[float] = []
    readers = [asyncio.create_task(_receive(c, latencies)) for c in receivers]
    acked = 0
    stop = time.monotonic() + args.duration

    async def sender(i: int) -> None:
        nonlocal acked
        conn, me, to = senders[i], uids[i], uids[pairs + i]
        in_flight = 0
        while time.monotonic() < stop or in_flight:
            while in_flight < args.window and time.monotonic() < stop:
                content = json.dumps({"t": time.time(), "run": RUN}).encode()
                conn.send(IM, struct.pack(">qqii", me, to, 0, 0) + content)
                in_flight += 1
            cmd, _, _, _ = await conn.read()
            if cmd == ACK:
                in_flight -= 1
                acked += 1

    cpu0 = _cpu_seconds(args.pid)
    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(pairs)))
    elapsed = time.perf_counter() - started
    cpu1 = _cpu_seconds(args.pid)
    await asyncio.sleep(1)
    for task in readers:
        task.cancel()
    for conn in senders + receivers:
        conn.close()
    ms = [x * 1000 for x in latencies]
    return {
        "mode": "client",
        "pairs": pairs,
        "window": args.window,
        "acked": acked,
        "messages_per_second": round(acked / elapsed, 1),
        "pushed": len(latencies),
        "p50_ms": round(_percentile(ms, 0.5), 1),
        "p99_ms": round(_percentile(ms, 0.99), 1),
        "server_cpu_ms_per_message": (
            round((cpu1 - cpu0) * 1000 / acked, 2) if cpu0 is not None and cpu1 and acked else None
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parley.benchdelivery")
    parser.add_argument("mode", choices=("idle", "rest", "client"))
    parser.add_argument("--url", required=True, help="the HTTP API (edge) base URL")
    parser.add_argument("--tcp", required=True, help="the delivery TCP listener, HOST:PORT")
    parser.add_argument("--appid", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--pid", type=int, default=None, help="the delivery server's process")
    parser.add_argument("--connections", type=int, default=10_000, help="idle: connections")
    parser.add_argument("--devices", type=int, default=10, help="idle: connections per user")
    parser.add_argument("--hold", type=float, default=5.0, help="idle: seconds to hold them")
    parser.add_argument("--rate", type=float, default=500.0, help="rest: messages per second")
    parser.add_argument("--duration", type=float, default=10.0, help="rest, client: seconds")
    parser.add_argument("--receivers", type=int, default=50, help="rest: receivers; client: pairs")
    parser.add_argument("--window", type=int, default=4, help="client: messages in flight each")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = {"idle": idle, "rest": rest, "client": client}[args.mode]
    print(json.dumps(asyncio.run(runner(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
