"""What ``parley bench`` measures besides speed: the CPU each process spends per request (from
``/proc``, so a noisy shared machine does not blur it) and the store commands the services
issue per request (from their own ``/metrics``: counted on the server side, whatever the
client), plus ``--preload``, which fills the store first so growth shows."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

STORE_COMMANDS = re.compile(r"^parley_store_command_duration_seconds_count\{[^}]*\}\s+(\S+)$")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, all its threads (``/proc/<pid>/stat`` fields 14
    and 15). Not its child processes'."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process and every process below it: each live one's own
    and that of the children it has reaped (fields 16 and 17), so a child that exits between
    two samples is still counted (a PostgreSQL backend that ends, for example)."""
    parents: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stats[int(proc.name)] = fields = _stat(int(proc.name))
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(proc.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current) or _stat(current)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        todo += parents.get(current, [])
    return total / TICKS


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: field 3 (state) first."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


async def store_commands(http: aiohttp.ClientSession, urls: list[str]) -> float:
    """Store commands issued so far by the processes whose ``/metrics`` are at ``urls``."""
    total = 0.0
    for url in urls:
        async with http.get(url) as resp:
            text = await resp.text()
        for line in text.splitlines():
            match = STORE_COMMANDS.match(line)
            if match:
                total += float(match.group(1))
    return total


@dataclass
class CostMeter:
    """CPU per watched process (``trees``: with every process below it) and store commands,
    sampled around each family."""

    pids: dict[str, int]
    metrics_urls: list[str]
    trees: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    commands: float = 0.0

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()} | {
            name: tree_cpu_seconds(pid) for name, pid in self.trees.items()
        }

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.cpu = self._cpu()
        self.commands = await store_commands(http, self.metrics_urls) if self.metrics_urls else 0

    async def finish(self, http: aiohttp.ClientSession, requests: int) -> dict[str, float]:
        """Per request: ``cpu_ms.<process>`` for each watched process and, when metrics are
        read, ``store_commands`` (every command of the services, background work included)."""
        if not requests:
            return {}
        result = {
            f"cpu_ms.{name}": (seconds - self.cpu[name]) * 1000 / requests
            for name, seconds in self._cpu().items()
        }
        if self.metrics_urls:
            after = await store_commands(http, self.metrics_urls)
            result["store_commands"] = (after - self.commands) / requests
        return result


async def preload(
    call: Callable[..., Awaitable[tuple[int, str]]],
    headers: dict[str, str],
    *,
    users: int,
    messages: int,
    concurrency: int,
    note: Callable[[str, bool], None],
) -> None:
    """Fill the store through the API: ``users`` granted users; ``messages`` past messages,
    two fifths of them system messages to user 1 and four of users 2..1000 (so user 1's inbox
    holds that many entries and a thousand inboxes share four times as many), the rest peer
    messages between the other users."""
    system = messages * 2 // 5
    jobs: list[tuple[str, str, dict[str, object]]] = []
    for uid in range(1, users + 1):
        jobs.append(("grants", "/auth/grant", {"uid": uid, "user_name": f"user {uid}"}))
    for n in range(system):
        others = [2 + (n * 4 + k) % 999 for k in range(4)]
        jobs.append(("system", "/messages/systems", {"receivers": [1, *others], "content": "x"}))
    for n in range(messages - system):
        sender, receiver = 1001 + n % 9000, 1001 + (n * 7919) % 9000
        jobs.append(
            ("peer", "/messages/peers", {"sender": sender, "receiver": receiver, "content": "x"})
        )
    done = 0
    failed = 0
    queue = iter(jobs)

    async def worker() -> None:
        nonlocal done, failed
        for kind, path, body in queue:
            status, _ = await call("POST", path, json=body, headers=headers)
            done += 1
            failed += status != 200
            if done % 500 == 0 or done == len(jobs):
                note(f"preload {done}/{len(jobs)} ({kind}), {failed} failed", done == len(jobs))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if failed:
        raise RuntimeError(f"preload: {failed} of {len(jobs)} requests failed")
