"""The ``postgresql`` local store: ``parley run --local-store postgresql`` starts a private
PostgreSQL cluster under its data directory and FerretDB on it, serves real requests from it,
exposes nothing beyond loopback and its own unix socket, keeps every file it has in the data
directory, and takes the cluster down with it even when killed with SIGKILL."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from parley.servers import (
    POSTGRES_ACCOUNT,
    REPO_ROOT,
    ServerError,
    find_postgres,
    free_port,
    start_postgres,
)

from .test_security_infra import LOOPBACK, _proc, command, listeners, started_by

PARLEY = [sys.executable, "-m", "parley.cli"]


def call(
    url: str, body: Any = None, *, basic: str | None = None, bearer: str | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    if basic:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


# ---- sockets and files of a process, from /proc ----------------------------------------------


def _inet_table(name: str) -> dict[str, tuple[str, str]]:
    """inode -> (local address, remote address) of one of /proc/net/{tcp,udp}{,6}."""
    found = {}
    for row in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
        fields = row.split()
        found[fields[9]] = (_address(fields[1]), _address(fields[2]))
    return found


def _address(hex_pair: str) -> str:
    """``0100007F:1F90`` -> ``127.0.0.1`` (the kernel prints each 32-bit word little-endian)."""
    raw = bytes.fromhex(hex_pair.split(":")[0])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def fd_targets(pid: int) -> list[str]:
    """What each open file descriptor of ``pid`` refers to (nothing once it has exited)."""
    found = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return []
    for fd in fds:
        try:
            found.append(os.readlink(fd))
        except OSError:
            continue
    return found


def sockets_of(pid: int) -> list[tuple[str, str]]:
    """(kind, where) of every socket ``pid`` holds: ``("unix", path or "")`` or
    ``(table, "local -> remote")``; an inode found in no table is ``("unknown", inode)``."""
    inet = {name: _inet_table(name) for name in ("tcp", "tcp6", "udp", "udp6")}
    unix = {}
    for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = row.split()
        unix[fields[6]] = fields[7] if len(fields) > 7 else ""
    found = []
    for target in fd_targets(pid):
        if not target.startswith("socket:["):
            continue
        inode = target[8:-1]
        if inode in unix:
            found.append(("unix", unix[inode]))
            continue
        for name, table in inet.items():
            if inode in table:
                local, remote = table[inode]
                found.append((name, f"{local} -> {remote}"))
                break
        else:
            found.append(("unknown", inode))
    return found


def open_paths(pid: int) -> list[str]:
    """The files and directories ``pid`` has open, its working directory and the files it
    maps (libraries and programs included)."""
    try:
        paths = [os.readlink(f"/proc/{pid}/cwd")]
    except FileNotFoundError:  # it exited (an autovacuum worker, say)
        return []
    for target in fd_targets(pid):
        if target.startswith("/"):
            paths.append(target.removesuffix(" (deleted)"))
    for row in _proc(pid, "maps").decode().splitlines():
        fields = row.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.append(fields[5].removesuffix(" (deleted)"))
    return paths


def is_program_file(path: str) -> bool:
    """What any process opens or maps: its programs and libraries, the locale, the null
    device; and what the kernel names anonymous shared memory (``/dev/zero``, ``/SYSV...``),
    no file."""
    return path in ("/dev/null", "/dev/zero") or path.startswith(
        ("/usr/", "/lib", "/etc/", "/SYSV")
    )


# ---- parley run on the postgresql store ------------------------------------------------------


@pytest.fixture
def data() -> Iterator[Path]:
    """A data directory whose parent the ``postgres`` user can enter (pytest's directories
    are private to root, so it is made in the system's temporary directory)."""
    path = Path(tempfile.mkdtemp(prefix="parley-pg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_run(data: Path, out: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``parley run --local-store postgresql``: (process, base URL, server credential)."""
    port = free_port()
    with open(out, "wb") as sink:
        process = subprocess.Popen(
            [
                *PARLEY,
                "run",
                "--local-store",
                "postgresql",
                *("--data", str(data), "--http-addr", f"127.0.0.1:{port}"),
                *("--embedded-mongo-addr", f"127.0.0.1:{free_port()}"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={k: v for k, v in os.environ.items() if k != "PARLEY_LOCAL_STORE"},
        )
    deadline = time.monotonic() + 120
    while "curl" not in (text := out.read_text(errors="replace")):
        assert process.poll() is None, text
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}", text.rsplit(" -u ", 1)[1].split()[0]


def postgres_pids(root: int, data: Path) -> set[int]:
    return {pid for pid in started_by(root, data) if _proc(pid, "comm").strip() == b"postgres"}


def test_parley_run_serves_from_a_private_postgresql_cluster(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.out"
    process, base, basic = start_run(data, out)
    try:
        # Real requests end to end: grants, a peer message, the receiver's history.
        status, body = call(f"{base}/auth/grant", {"uid": 1, "user_name": "a"}, basic=basic)
        assert status == 200, body
        status, body = call(f"{base}/auth/grant", {"uid": 2, "user_name": "b"}, basic=basic)
        assert status == 200, body
        token = body["data"]["token"]
        status, body = call(
            f"{base}/messages/peers",
            {"sender": 1, "receiver": 2, "content": "over postgresql"},
            basic=basic,
        )
        assert status == 200, body
        status, body = call(f"{base}/messages", bearer=token)
        assert status == 200, body
        assert [m["content"] for m in body["data"]] == ["over postgresql"], body

        # FerretDB keeps its data in the cluster: its tables hold the message.
        cluster = data / "postgres"
        assert (cluster / "data" / "PG_VERSION").is_file()
        assert not list((data / "mongo").glob("*.sqlite")), list((data / "mongo").iterdir())

        pids = postgres_pids(process.pid, data)
        assert len(pids) >= 5, [command(p) for p in started_by(process.pid, data)]  # + workers
        postmaster = {p for p in pids if "-D" in command(p)}
        assert len(postmaster) == 1, [command(p) for p in pids]
        argv = command(next(iter(postmaster)))
        assert "listen_addresses=" in argv and "synchronous_commit=off" in argv, argv
        assert ("unix", str(cluster / ".s.PGSQL.5432")) in sockets_of(next(iter(postmaster)))

        # Every socket of every PostgreSQL process is a unix socket or on loopback; it
        # listens on no TCP port at all; FerretDB and Parley listen on loopback only.
        for pid in pids:
            for kind, where in sockets_of(pid):
                if kind == "unix":
                    assert where in ("", str(cluster / ".s.PGSQL.5432")), (pid, where)
                else:
                    local, _, remote = where.partition(" -> ")
                    assert kind != "unknown", (pid, where)
                    assert ipaddress.ip_address(local).is_loopback, (pid, kind, where)
                    assert remote in ("0.0.0.0", "::") or ipaddress.ip_address(remote).is_loopback
        ours = [lst for lst in listeners() if lst.pids & started_by(process.pid, data)]
        assert {"parley-ferretdb"} <= {n for lst in ours for n in lst.names}, ours
        assert not [lst for lst in ours if lst.pids & pids], ours
        assert not [lst for lst in ours if lst.host not in LOOPBACK], ours

        # Every file it has open or maps is in the data directory (besides programs and
        # libraries): no shared memory in /dev/shm, no socket in /var/run/postgresql.
        for pid in pids:
            outside = [
                p
                for p in open_paths(pid)
                if not Path(p).is_relative_to(data) and not is_program_file(p)
            ]
            assert not outside, (command(pid), outside)
        # The cluster is private: its directory is 0700 and, when Parley runs as root, the
        # `postgres` user's; the data directory lets that user through only (0710).
        assert stat.S_IMODE(cluster.stat().st_mode) == 0o700
        assert stat.S_IMODE((cluster / "data").stat().st_mode) == 0o700
        if os.geteuid() == 0:
            account = pwd.getpwnam(POSTGRES_ACCOUNT)
            assert cluster.stat().st_uid == account.pw_uid
            for pid in postgres_pids(process.pid, data):
                assert Path(f"/proc/{pid}").stat().st_uid == account.pw_uid
            assert data.stat().st_gid == account.pw_gid
            assert stat.S_IMODE(data.stat().st_mode) == 0o710
            assert stat.S_IMODE((data / "mongo").stat().st_mode) == 0o700

        # SIGKILL of parley run takes the cluster down (it shuts down cleanly on its own).
        process.kill()
        process.wait(10)
        deadline = time.monotonic() + 30
        while [p for p in pids if Path(f"/proc/{p}").exists()]:
            assert time.monotonic() < deadline, "PostgreSQL outlived parley run"
            time.sleep(0.1)
        assert "database system is shut down" in (cluster / "postgres.log").read_text()

        # The next start uses the same cluster: the app and the message are there.
        out = tmp_path / "second.out"
        process, base, basic = start_run(data, out)
        assert "Apps: 1" in out.read_text()
        status, body = call(f"{base}/messages", bearer=token)
        assert status == 200 and [m["content"] for m in body["data"]] == ["over postgresql"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
    assert not postgres_pids(process.pid, data)


def test_missing_postgresql_programs_are_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="apt-get install postgresql"):
        find_postgres(tmp_path / "lib-postgresql")


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the cluster runs as `postgres`")
def test_a_data_directory_postgres_cannot_reach_is_refused_clearly(tmp_path: Path) -> None:
    # pytest's directories are 0700, root's: the `postgres` user cannot pass through them.
    with pytest.raises(ServerError, match=r"cannot enter /tmp/.*; choose a data directory"):
        start_postgres(tmp_path / "data" / "postgres")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700  # nothing was opened up
    assert not (tmp_path / "data").exists()
