"""Starting and stopping the servers Parley runs beside itself: FerretDB (the embedded
MongoDB-compatible server of ``parley run``), the private PostgreSQL cluster FerretDB stores its
data in when the local store is ``postgresql``, and, for tests, RabbitMQ and nginx.

Each start waits on a protocol probe (a MongoDB ``ping``, an AMQP connection, an HTTP answer),
never on a sleep, and each stop terminates the process and waits for it.

Every server runs inside its data directory (its working directory, so anything it drops
there, crash dumps included, stays there), with umask 077: the directory is 0700 and its
files 0600. RabbitMQ listens on loopback only, its Erlang distribution and its own epmd too,
with a random cookie and a dedicated user with a random password (no ``guest``).
PostgreSQL opens no TCP port at all: FerretDB reaches it on a unix socket inside its directory.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pymongo import MongoClient

REPO_ROOT = Path(__file__).resolve().parent.parent
FERRETDB_SOURCE = REPO_ROOT / "tools" / "ferretdb"
FERRETDB_NAME = "parley-ferretdb"
LOCAL_BIN = REPO_ROOT / ".parley" / "bin"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQ_USER = "parley"
# What an earlier Parley wrote as every node's cookie; a node that finds it gets a new one.
OLD_COOKIE = "PARLEYTESTCOOKIE"


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


def private_dir(path: Path, files: bool = True) -> Path:
    """``path`` created if missing, and everything in it made private to this user: the
    directories 0700, and (``files``) the files 0600, what an earlier run left included."""
    _mkdirs(path)
    for root, _dirs, names in os.walk(path):
        os.chmod(root, 0o700)
        for name in names if files else ():
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, 0o600)
    return path


def _mkdirs(path: Path) -> None:
    """``path`` and its missing parents, each created 0700 (existing ones left alone)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def _private_file(path: Path, text: str) -> None:
    """Writes ``text`` to a file readable by this user only (0600 from its creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    path.chmod(0o600)


def _kept_secret(path: Path, make: str, refuse: str = "") -> str:
    """The secret stored in ``path`` (0600), or ``make`` stored there now."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not value or value == refuse:
        _private_file(path, make)
        return make
    path.chmod(0o600)
    return value


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
    script = source / "build.sh"  # a tool with its own recipe (FerretDB: a patched build)
    if script.exists():
        subprocess.run([str(script), str(local)], env={**os.environ, "GO": go}, check=True)
    else:
        subprocess.run([go, "build", "-o", str(local), "."], cwd=source, check=True)
    return local


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)
    # Helpers started for this process (RabbitMQ's epmd), stopped after it.
    companions: list[Process] = field(default_factory=list)
    # What asks it to stop cleanly (PostgreSQL: SIGINT, its fast shutdown).
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 20.0) -> None:
        stop_all([self], timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        for companion in self.companions:
            companion.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_all(processes: Sequence[Process], timeout: float = 20.0) -> None:
    """Ask every process to stop at once, then wait for them together (a process still
    running after ``timeout`` is killed); then their companions, the same way. A cluster's
    shutdown takes as long as its slowest process, not the sum of them."""
    running = [p for p in processes if p.popen.poll() is None]
    for process in running:
        process.popen.send_signal(process.stop_signal)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(5)
    companions = [c for p in processes for c in p.companions]
    if companions:
        stop_all(companions, timeout)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux to send the child ``sig`` when its parent dies, even
    by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so no server outlives the Parley that started it.
    Linux ties this to the parent *thread*: spawn from a thread that lives as long as the
    process (the main thread, or the event loop's). Linux forgets the setting when the
    child's user changes, so it runs after ``Popen``'s own switch to ``user``."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    umask: int = 0o077,
    account: pwd.struct_passwd | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Process:
    """``argv`` in its own session, working in ``cwd`` (its data directory) with ``umask``,
    its output appended to ``log_path`` (0600), as the user ``account`` (default: this one).
    It gets ``stop_signal`` when Parley stops it or dies."""
    _mkdirs(log_path.parent)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            umask=umask,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            preexec_fn=(
                _die_with_parent(os.getpid(), stop_signal) if sys.platform == "linux" else None
            ),
        )
    return Process(name, popen, log_path, stop_signal=stop_signal)


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
    # The directory is 0700, so no other user reaches the files in it. Their own modes are
    # left as FerretDB makes them: with SQLite files created 0600 (umask 077 or 066) FerretDB
    # stopped answering under tests/test_messages.py's 120-member group load, with 022 not.
    private_dir(data_dir, files=False)
    argv = [str(binary), "--listen-addr", addr, "--sqlite-url", f"file:{data_dir}/"]
    if postgresql_url:
        argv += ["--postgresql-url", postgresql_url]
    return _spawn("ferretdb", argv, data_dir / "ferretdb.log", cwd=data_dir, umask=0o022)


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


# ---- PostgreSQL: the private cluster of the ``postgresql`` local store ----------------------

POSTGRES_ACCOUNT = "postgres"  # the system user the cluster runs as when Parley runs as root
POSTGRES_ROLE = "parley"  # the cluster's one role (its superuser), FerretDB's
POSTGRES_DB = "ferretdb"
POSTGRES_PORT = 5432  # names the socket file only: the cluster opens no TCP port
POSTGRES_SOCKET = f".s.PGSQL.{POSTGRES_PORT}"
SUN_PATH_MAX = 107  # the longest unix socket path Linux accepts
# Everything that differs from PostgreSQL's defaults, on its command line (``ps`` shows it):
# no TCP listener; the socket in the cluster's own 0700 directory, itself 0700; commits not
# waited on (a crash of the machine may lose the last fraction of a second of writes, but
# never corrupts the cluster, fsync staying on; a crash of PostgreSQL alone loses nothing):
# a local try-out store need not sync every commit, which FerretDB's SQLite files do (WAL,
# SQLite's default synchronous=FULL); dynamic shared memory as files under the data
# directory rather than in /dev/shm.
POSTGRES_OPTIONS = {
    "listen_addresses": "",
    "port": str(POSTGRES_PORT),
    "unix_socket_permissions": "0700",
    "fsync": "on",
    "synchronous_commit": "off",
    "dynamic_shared_memory_type": "mmap",
    "logging_collector": "off",
    "cluster_name": "parley",
}


def find_postgres(debian: Path = Path("/usr/lib/postgresql")) -> Path:
    """The directory of PostgreSQL's server programs (``initdb`` and ``postgres``): from the
    PATH, or the newest of Debian's ``/usr/lib/postgresql/N/bin``."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres and Path(initdb).resolve().parent == Path(postgres).resolve().parent:
        return Path(initdb).resolve().parent
    versions = sorted(
        (d for d in debian.glob("*/bin") if d.parent.name.isdigit()),
        key=lambda d: int(d.parent.name),
    )
    for directory in reversed(versions):
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise ServerError(
        "the postgresql local store needs PostgreSQL's initdb and postgres, which are not "
        "installed (apt-get install postgresql, or scripts/setup --servers)"
    )


def postgres_account() -> pwd.struct_passwd | None:
    """Who the cluster runs as: this user, or ``postgres`` when this is root (PostgreSQL
    refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_ACCOUNT)
    except KeyError:
        raise ServerError(
            "PostgreSQL refuses to run as root, and there is no `postgres` system user to run "
            "it as (apt-get install postgresql creates it)"
        ) from None


def _searchable_by(account: pwd.struct_passwd, directory: Path) -> bool:
    """Whether ``account`` (its primary group only, as ``_spawn`` runs it) may enter
    ``directory``."""
    st = directory.stat()
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == account.pw_gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _hand_over(base_dir: Path, account: pwd.struct_passwd) -> None:
    """Makes ``base_dir`` the cluster account's (0700) and lets that account pass through
    Parley's data directory, ``base_dir``'s parent: group ``postgres``, mode 0710 (enter, not
    list; nobody else gains anything). Refuses if a directory above it shuts the account out."""
    data_dir = base_dir.parent
    for created in (False, True):  # what exists first, then what making data_dir made
        if created:
            _mkdirs(data_dir)
        for directory in reversed(data_dir.parents):
            if directory.exists() and not _searchable_by(account, directory):
                raise ServerError(
                    f"the `{account.pw_name}` user, which runs PostgreSQL, cannot enter "
                    f"{directory}; choose a data directory it can reach (--data)"
                )
    if not _searchable_by(account, data_dir):
        os.chown(data_dir, -1, account.pw_gid)
        data_dir.chmod(0o710)
    _mkdirs(base_dir)
    os.chown(base_dir, account.pw_uid, account.pw_gid)
    base_dir.chmod(0o700)


def _postgres_env() -> dict[str, str]:
    """The environment of PostgreSQL's programs: Parley's, without ``PG*`` variables (they
    would point the programs elsewhere), in the C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _initdb(bin_dir: Path, base_dir: Path, account: pwd.struct_passwd | None) -> None:
    """Creates the cluster in ``base_dir/data``, once: built in ``data.new`` and renamed,
    so an interrupted first start leaves nothing that looks finished. Its one role
    (``parley``) logs in without a password, on the unix socket only (``--auth-host=reject``;
    there is no TCP listener anyway); the database FerretDB uses is created here."""
    new = base_dir / "data.new"
    shutil.rmtree(new, ignore_errors=True)
    log_path = base_dir / "initdb.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as log:
        steps: list[tuple[list[str], bytes | None]] = [
            (
                [
                    str(bin_dir / "initdb"),
                    *("-D", str(new), "-U", POSTGRES_ROLE, "--encoding=UTF8", "--no-locale"),
                    *("--auth-local=trust", "--auth-host=reject"),
                ],
                None,
            ),
            (
                [str(bin_dir / "postgres"), "--single", "-D", str(new), "postgres"],
                f"CREATE DATABASE {POSTGRES_DB};\n".encode(),
            ),
        ]
        for argv, stdin in steps:
            done = subprocess.run(
                argv,
                input=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=base_dir,
                env=_postgres_env(),
                umask=0o077,
                check=False,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
            if done.returncode != 0:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise ServerError(f"{Path(argv[0]).name} failed ({done.returncode}):\n{tail}")
    new.rename(base_dir / "data")


def start_postgres(base_dir: Path, *, timeout: float = 60.0) -> Process:
    """The private PostgreSQL cluster in ``base_dir``, made on its first start; returns once
    it accepts a session. ``extra["url"]`` is FerretDB's ``--postgresql-url``."""
    process = spawn_postgres(base_dir)
    wait_postgres(process, timeout)
    return process


def spawn_postgres(base_dir: Path) -> Process:
    """Starts the cluster without waiting for it (see ``wait_postgres``); creates it first
    (``initdb``) when ``base_dir/data`` does not hold one.

    Everything it has stays in ``base_dir``: the data (``data``), its log (``postgres.log``),
    its socket. When Parley runs as root it runs as the ``postgres`` system user, which owns
    ``base_dir``. It stops on SIGINT (fast shutdown: sessions ended, a checkpoint, exit), and
    gets that signal too when the Parley that started it dies."""
    bin_dir = find_postgres()
    base_dir = base_dir.resolve()
    socket_path = base_dir / POSTGRES_SOCKET
    if len(str(socket_path).encode()) > SUN_PATH_MAX:
        raise ServerError(
            f"{socket_path} is too long for a unix socket ({SUN_PATH_MAX} bytes at most); "
            "choose a shorter data directory path"
        )
    account = postgres_account()
    if account is None:
        private_dir(base_dir, files=False)
    else:
        _hand_over(base_dir, account)
    if not (base_dir / "data" / "PG_VERSION").exists():
        _initdb(bin_dir, base_dir, account)
    options = {**POSTGRES_OPTIONS, "unix_socket_directories": str(base_dir)}
    argv = [str(bin_dir / "postgres"), "-D", str(base_dir / "data")]
    for key, value in options.items():
        argv += ["-c", f"{key}={value}"]
    process = _spawn(
        "postgres",
        argv,
        base_dir / "postgres.log",
        cwd=base_dir,
        env=_postgres_env(),
        account=account,
        stop_signal=signal.SIGINT,
    )
    host = urllib.parse.quote(str(base_dir), safe="")
    process.extra["url"] = f"postgres://{POSTGRES_ROLE}@/{POSTGRES_DB}?host={host}"
    process.extra["socket"] = str(socket_path)
    process.extra["base_dir"] = str(base_dir)
    return process


def wait_postgres(process: Process, timeout: float = 60.0) -> None:
    """Returns once the cluster accepts a session (stops it and raises if it does not)."""
    socket_path = Path(process.extra["socket"])
    _wait(process, lambda: postgres_probe(socket_path), timeout, "PostgreSQL")


def postgres_probe(socket_path: Path, user: str = POSTGRES_ROLE, db: str = POSTGRES_DB) -> bool:
    """True once PostgreSQL answers a startup message (protocol 3.0) on ``socket_path`` with
    a session: AuthenticationOk, then ReadyForQuery. While it starts it answers an error."""
    params = f"user\0{user}\0database\0{db}\0\0".encode()
    body = struct.pack("!i", 3 << 16) + params
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        sock.connect(str(socket_path))
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            head = _recv_exactly(sock, 5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            payload = _recv_exactly(sock, length - 4)
            if kind == b"E" or (kind == b"R" and payload[:4] != b"\0\0\0\0"):
                return False  # not ready yet, or it wants a password (not this cluster)
            if kind == b"Z":
                sock.sendall(b"X\0\0\0\x04")  # Terminate
                return True


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("PostgreSQL closed the connection")
        data += chunk
    return data


def listeners(port: int) -> list[int]:
    """The PIDs holding a listening TCP socket on ``port`` (IPv4 or IPv6), from ``/proc``:
    those this user may see (none when not Linux)."""
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
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def port_holder(port: int) -> tuple[int, str] | None:
    """(PID, command line) of a process listening on TCP ``port``, from ``/proc`` (None when
    it cannot be seen: another user's process, or not Linux)."""
    for pid in listeners(port):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        cmdline = " ".join(raw.decode(errors="replace").split())
        return pid, cmdline[:100] + ("..." if len(cmdline) > 100 else "")
    return None


def start_rabbitmq(base_dir: Path, port: int, *, timeout: float = 90.0) -> Process:
    """A private RabbitMQ node (its own name, port and files) run from Debian's package.

    Everything it opens listens on 127.0.0.1: AMQP, the Erlang distribution port, and an
    epmd of its own on a private port (stopped with the node). Its cookie and the password of
    its one user (``parley``) are random, made on the first start and kept, 0600, in
    ``base_dir`` (``.erlang.cookie``, ``amqp-password``); ``extra["url"]`` carries them."""
    if not RABBITMQ_SERVER.exists():
        raise ServerError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    epmd_bin = shutil.which("epmd") or "/usr/bin/epmd"
    private_dir(base_dir)
    if (base_dir / "mnesia").exists() and not (base_dir / "amqp-password").exists():
        raise ServerError(
            f"{base_dir} holds a RabbitMQ node made by an earlier Parley (with the guest "
            "user); remove that directory to start a new node"
        )
    _kept_secret(base_dir / ".erlang.cookie", secrets.token_hex(32), refuse=OLD_COOKIE)
    password = _kept_secret(base_dir / "amqp-password", secrets.token_hex(24))
    _private_file(base_dir / "enabled_plugins", "[].\n")
    _private_file(
        base_dir / "rabbitmq.conf",
        "log.console = true\n"
        "log.file = false\n"
        f"default_user = {RABBITMQ_USER}\n"
        f"default_pass = {password}\n"
        f"loopback_users.{RABBITMQ_USER} = true\n",
    )

    epmd_port = free_port()
    epmd = _spawn(
        "epmd",
        [epmd_bin, "-address", "127.0.0.1", "-port", str(epmd_port)],
        base_dir / "epmd.log",
        cwd=base_dir,
        env={**os.environ, "HOME": str(base_dir)},
    )
    _wait(epmd, lambda: port_open("127.0.0.1", epmd_port), 10.0, "epmd")

    node = f"parley{port}@localhost"
    env = {
        **os.environ,
        "HOME": str(base_dir),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        # Every Erlang VM started with this environment (the node, and the short-lived ones
        # RabbitMQ's scripts start) binds its distribution port to loopback and finds this
        # node's own epmd, which listens on loopback only.
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_CRASH_DUMP": str(base_dir / "erl_crash.dump"),
        "RABBITMQ_MNESIA_BASE": str(base_dir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base_dir / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base_dir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base_dir / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(base_dir / "rabbitmq.pid"),
    }
    try:
        process = _spawn(
            "rabbitmq", [str(RABBITMQ_SERVER)], base_dir / "rabbitmq.out", cwd=base_dir, env=env
        )
    except BaseException:
        epmd.stop()
        raise
    process.companions.append(epmd)
    process.extra["url"] = f"amqp://{RABBITMQ_USER}:{password}@127.0.0.1:{port}/"
    process.extra["node"] = node
    process.extra["base_dir"] = str(base_dir)
    process.extra["port"] = str(port)
    process.extra["epmd_port"] = str(epmd_port)

    try:
        _wait(process, lambda: amqp_probe("127.0.0.1", port), timeout, "RabbitMQ")
    except BaseException:
        process.stop()
        raise
    return process


def restart_rabbitmq(process: Process) -> Process:
    """Stop the node and start it again on the same port and files (its durable queues and
    persistent messages survive; its cookie and credentials are the same)."""
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
    private_dir(work_dir)
    config = work_dir / "nginx.conf"
    _private_file(config, config_text)
    process = _spawn(
        "nginx",
        [nginx, "-p", str(work_dir), "-c", str(config), "-g", "daemon off; user root;"],
        work_dir / "nginx.out",
        cwd=work_dir,
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
        cwd=log_path.parent,
        env={"PYTHONPATH": str(REPO_ROOT), **os.environ, **env},
    )

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)

    process.extra["url"] = f"http://127.0.0.1:{port}"
    _wait(process, healthy, timeout, f"parley serve {service}")
    return process
