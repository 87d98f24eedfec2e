"""``parley run`` and its embedded FerretDB, as an operator meets failures: the store dies, the
store freezes, ``parley run`` itself is killed, a stale process holds the store's port."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from parley.servers import REPO_ROOT, free_port, port_open

from .conftest import PARLEY, start_parley_run

# Processes killed, stalled and restarted: slow (``-m "not slow"`` leaves them out; CI runs them).
pytestmark = pytest.mark.slow

REQUEST_TIMEOUT = 2.0


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    base: str
    mongo_port: int
    output: Path
    basic: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def get(url: str, *, data: bytes | None = None, auth: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


def start_run(tmp_path: Path, http: int, mongo: int, name: str = "run") -> Run:
    env = {"PARLEY_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    process, out, text = start_parley_run(tmp_path, http, mongo, name, env)
    basic = text.split(" -u ", 1)[1].split()[0]
    return Run(process, f"http://127.0.0.1:{http}", mongo, out, basic)


def children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of the processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid:
            found.append((int(proc.name), state, cmdline))
    return found


def ferretdb_of(run: Run) -> int:
    pids = [pid for pid, state, cmd in children(run.process.pid) if "ferretdb" in cmd]
    assert len(pids) == 1, children(run.process.pid)
    return pids[0]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    started = start_run(tmp_path, free_port(), free_port())
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.terminate()
            started.process.wait(30)


def test_a_killed_store_is_reported_restarted_and_reaped(run: Run) -> None:
    status, body = get(run.base + "/readyz")
    assert status == 200, body
    assert body["checks"] == {"embedded store": "ok", "mongodb": "ok"}
    victim = ferretdb_of(run)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    # Not ready within 2 s, naming the store (the first 503 may name only MongoDB: its
    # connection breaks a moment before the supervisor notices the exit).
    while True:
        status, body = get(run.base + "/readyz")
        if status == 503 and "embedded store" in body["meta"]["message"]:
            break
        assert time.monotonic() - killed < 2.0, body
        time.sleep(0.05)
    not_ready = time.monotonic() - killed
    assert body["meta"]["code"] == 503 and "embedded store" in body["meta"]["message"]
    assert body["checks"]["embedded store"] != "ok"

    # Reaped: the dead child does not linger as a zombie.
    while Path(f"/proc/{victim}").exists():
        assert time.monotonic() - killed < 2.0, "the killed FerretDB was not reaped"
        time.sleep(0.05)

    # Restarted, ready again and serving within 10 s.
    while get(run.base + "/readyz")[0] != 200:
        assert time.monotonic() - killed < 10.0, run.text()
        time.sleep(0.1)
    back = time.monotonic() - killed
    print(f"503 after {not_ready:.2f}s, ready again after {back:.2f}s")
    assert ferretdb_of(run) != victim
    status, body = get(
        run.base + "/auth/grant", data=json.dumps({"uid": 1}).encode(), auth=run.basic
    )
    assert status == 200, body
    lines = [line for line in run.text().splitlines() if "exited with code" in line]
    assert len(lines) == 1 and f"PID {victim}" in lines[0] and "restarting" in lines[0]
    assert not [c for c in children(run.process.pid) if c[1] == "Z"]
    with urllib.request.urlopen(run.base + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    restarts = [
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "parley_embedded_store_restarts_total"
    ]
    assert restarts == [1.0]


def test_a_frozen_store_gets_503_within_the_request_deadline(run: Run) -> None:
    store = ferretdb_of(run)
    grant = json.dumps({"uid": 2}).encode()
    assert get(run.base + "/auth/grant", data=grant, auth=run.basic)[0] == 200
    os.kill(store, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = get(run.base + "/auth/grant", data=grant, auth=run.basic)
        elapsed = time.monotonic() - started
        print(f"frozen store: {status} after {elapsed:.2f}s")
        assert status == 503, body
        assert body["meta"]["code"] == 503
        assert elapsed < REQUEST_TIMEOUT + 1.0
        status, body = get(run.base + "/readyz")
        assert status == 503 and "mongodb" in body["meta"]["message"]
    finally:
        os.kill(store, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while get(run.base + "/readyz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert get(run.base + "/auth/grant", data=grant, auth=run.basic)[0] == 200
    assert "unhandled error" not in run.text()


def test_sigkill_of_parley_run_leaves_no_child_and_the_next_start_works(
    tmp_path: Path,
) -> None:
    http, mongo = free_port(), free_port()
    first = start_run(tmp_path, http, mongo, "first")
    store = ferretdb_of(first)
    first.process.kill()
    first.process.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{store}").exists() or port_open("127.0.0.1", mongo):
        assert time.monotonic() < deadline, "the embedded FerretDB outlived parley run"
        time.sleep(0.1)
    second = start_run(tmp_path, http, mongo, "second")
    try:
        assert "Apps: 1" in second.text()
        assert get(second.base + "/readyz")[0] == 200
    finally:
        second.process.terminate()
        assert second.process.wait(30) == 0


def test_a_stale_process_on_the_store_port_is_named(tmp_path: Path) -> None:
    mongo = free_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {mongo})); s.listen()\n"
            "print('listening', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith(b"listening")
        result = subprocess.run(
            [
                *PARLEY,
                "run",
                "--http-addr",
                f"127.0.0.1:{free_port()}",
                "--data",
                str(tmp_path / "data"),
                "--embedded-mongo-addr",
                f"127.0.0.1:{mongo}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            check=False,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"127.0.0.1:{mongo} is already in use by PID {holder.pid}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
