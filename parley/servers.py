"""Starting and stopping the servers Parley runs beside itself: FerretDB (the embedded
MongoDB-compatible server of ``parley run``) and, for tests, RabbitMQ and nginx.

Each start waits on a protocol probe (a MongoDB ``ping``, an AMQP connection, an HTTP answer),
never on a sleep, and each stop terminates the process and waits for it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pymongo import MongoClient

REPO_ROOT = Path(__file__).resolve().parent.parent
FERRETDB_SOURCE = REPO_ROOT / "tools" / "ferretdb"
FERRETDB_NAME = "parley-ferretdb"
LOCAL_BIN = REPO_ROOT / ".parley" / "bin"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def find_ferretdb(build: bool = True) -> Path:
    """The FerretDB binary: ``$PARLEY_FERRETDB_BIN``, the PATH, ``.parley/bin``, or built now
    from ``tools/ferretdb`` with Go (a few seconds once the module cache is warm)."""
    return go_tool(FERRETDB_NAME, FERRETDB_SOURCE, os.environ.get("PARLEY_FERRETDB_BIN"), build)


def go_tool(name: str, source: Path, configured: str | None = None, build: bool = True) -> Path:
    """A helper binary of Parley's written in Go (``tools/``): the configured path, the PATH,
    ``.parley/bin``, or built there now."""
    if configured:
        return Path(configured)
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    local = LOCAL_BIN / name
    if local.exists():
        return local
    if not build:
        raise ServerError(f"{name} not found; run scripts/setup")
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        raise ServerError(f"{name} not found and Go is not installed to build it")
    LOCAL_BIN.mkdir(parents=True, exist_ok=True)
    subprocess.run([go, "build", "-o", str(local), "."], cwd=source, check=True)
    return local


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when its parent dies, even
    by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so no server outlives the Parley that started it.
    Linux ties this to the parent *thread*: spawn from a thread that lives as long as the
    process (the main thread, or the event loop's)."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
        )
    return Process(name, popen, log_path)


def _wait(process: Process, probe: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise ServerError(f"{what} exited early:\n{process.log_tail()}")
        try:
            if probe():  # type: ignore[operator]
                return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    process.stop()
    raise ServerError(
        f"{what} did not become ready in {timeout}s ({last!r}):\n{process.log_tail()}"
    )


def start_ferretdb(
    data_dir: Path, addr: str, *, postgresql_url: str | None = None, timeout: float = 60.0
) -> Process:
    """FerretDB on SQLite files under ``data_dir`` (or on PostgreSQL at ``postgresql_url``),
    listening on ``addr`` (HOST:PORT)."""
    process = spawn_ferretdb(data_dir, addr, postgresql_url=postgresql_url)
    wait_ferretdb(process, addr, timeout)
    return process


def spawn_ferretdb(data_dir: Path, addr: str, *, postgresql_url: str | None = None) -> Process:
    """Starts FerretDB without waiting for it (see ``wait_ferretdb``); refuses a port that
    another process holds, naming it."""
    host, _, port = addr.rpartition(":")
    if port_open(host, int(port)):
        holder = port_holder(int(port))
        who = f"PID {holder[0]} ({holder[1]})" if holder else "another process"
        raise ServerError(
            f"{addr} is already in use by {who}: a FerretDB left by an earlier `parley run`, "
            "or another one running? Stop it, pick another --embedded-mongo-addr, "
            "or pass --mongo-url."
        )
    binary = find_ferretdb()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--listen-addr", addr, "--sqlite-url", f"file:{data_dir}/"]
    if postgresql_url:
        argv += ["--postgresql-url", postgresql_url]
    return _spawn("ferretdb", argv, data_dir / "ferretdb.log")


def wait_ferretdb(process: Process, addr: str, timeout: float = 60.0) -> None:
    """Returns once FerretDB answers a ``ping`` (stops it and raises if it does not)."""

    def ping() -> bool:
        client: MongoClient[dict[str, object]] = MongoClient(
            f"mongodb://{addr}/", serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            client.admin.command("ping")
            return True
        finally:
            client.close()

    _wait(process, ping, timeout, "FerretDB")


def port_holder(port: int) -> tuple[int, str] | None:
    """(PID, command line) of the process listening on TCP ``port``, from ``/proc`` (None when
    it cannot be seen: another user's process, or not Linux)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":")[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    raw = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                    words = raw.decode(errors="replace").split()
                    cmdline = " ".join(words)
                    return int(proc.name), cmdline[:100] + ("..." if len(cmdline) > 100 else "")
        except OSError:
            continue
    return None


def start_rabbitmq(base_dir: Path, port: int, *, timeout: float = 90.0) -> Process:
    """A private RabbitMQ node (its own name, port and files) run from Debian's package."""
    if not RABBITMQ_SERVER.exists():
        raise ServerError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "enabled_plugins").write_text("[].\n")
    cookie = base_dir / ".erlang.cookie"
    if not cookie.exists():
        cookie.write_text("PARLEYTESTCOOKIE")
        cookie.chmod(0o400)
    node = f"parley{port}@localhost"
    env = {
        **os.environ,
        "HOME": str(base_dir),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "ERL_CRASH_DUMP": str(base_dir / "erl_crash.dump"),
        "RABBITMQ_MNESIA_BASE": str(base_dir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base_dir / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base_dir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base_dir / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(base_dir / "rabbitmq.pid"),
    }
    (base_dir / "rabbitmq.conf").write_text("log.console = true\nlog.file = false\n")
    process = _spawn("rabbitmq", [str(RABBITMQ_SERVER)], base_dir / "rabbitmq.out", env=env)
    process.extra["url"] = f"amqp://guest:guest@127.0.0.1:{port}/"
    process.extra["node"] = node
    process.extra["base_dir"] = str(base_dir)
    process.extra["port"] = str(port)

    _wait(process, lambda: amqp_probe("127.0.0.1", port), timeout, "RabbitMQ")
    return process


def restart_rabbitmq(process: Process) -> Process:
    """Stop the node and start it again on the same port and files (its durable queues and
    persistent messages survive)."""
    process.stop()
    return start_rabbitmq(Path(process.extra["base_dir"]), int(process.extra["port"]))


def amqp_probe(host: str, port: int) -> bool:
    """True once the broker answers the AMQP 0-9-1 protocol header with Connection.Start."""
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        frame = sock.recv(7)
    return len(frame) == 7 and frame[0] == 1  # a method frame on channel 0


def start_nginx(config_text: str, work_dir: Path, port: int, *, timeout: float = 20.0) -> Process:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise ServerError("nginx is not installed (apt-get install nginx-light)")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "nginx.conf"
    config.write_text(config_text)
    process = _spawn(
        "nginx",
        [nginx, "-p", str(work_dir), "-c", str(config), "-g", "daemon off; user root;"],
        work_dir / "nginx.out",
    )
    _wait(process, lambda: port_open("127.0.0.1", port), timeout, "nginx")
    return process


def start_service(
    service: str, port: int, env: dict[str, str], log_path: Path, *, timeout: float = 30.0
) -> Process:
    """``parley serve SERVICE`` as its own process, ready once ``/healthz`` answers."""
    import urllib.request

    parley = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "parley"
    argv = [str(parley)] if parley.exists() else [sys.executable, "-m", "parley.cli"]
    process = _spawn(
        f"parley-{service}",
        [*argv, "serve", service, "--http-addr", f"127.0.0.1:{port}"],
        log_path,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
    )

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)

    _wait(process, healthy, timeout, f"parley serve {service}")
    return process
