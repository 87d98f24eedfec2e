"""What Parley exposes around its API: the servers it starts listen on loopback only (RabbitMQ,
its Erlang distribution and epmd included), with a random cookie and no ``guest``, in private
data directories; the internal API refuses callers without the shared secret; the deployment
files never overwrite a Secret and let scaled replicas get traffic; no crash dump is committed.

The cluster tests run ``parley cluster`` as a user does and find what it started from the
process table: its descendants, and anything carrying its data directory in its environment
(a daemon that left the process tree, as epmd does, still carries it).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq.exceptions
import pytest
import yaml
from aiohttp.test_utils import TestServer

from parley.allinone import SERVICE_FACTORIES
from parley.deploy import SECRET_EXAMPLE, render_compose_nginx
from parley.servers import (
    OLD_COOKIE,
    REPO_ROOT,
    Process,
    ServerError,
    free_port,
    port_open,
    restart_rabbitmq,
    start_rabbitmq,
)
from services.auth.app import create_app as create_auth
from shared.internal import INTERNAL_SECRET_HEADER
from shared.ratelimit import TokenBuckets
from shared.settings import Settings
from shared.web import Deps

from .conftest import Stack, md5_hex, unique
from .test_deploy import compose_check

PARLEY = Path(sys.executable).parent / "parley"
LOOPBACK = {"127.0.0.1", "::1"}


# ---- the process table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    pids: frozenset[int]
    names: frozenset[str]


SS_USERS = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def parse_ss(text: str) -> list[Listener]:
    """``ss -Hltnp`` output -> listening sockets with the processes holding them."""
    listeners = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        host, _, port = fields[3].rpartition(":")
        users = SS_USERS.findall(line)
        listeners.append(
            Listener(
                host.strip("[]").split("%")[0],
                int(port),
                frozenset(int(pid) for _, pid in users),
                frozenset(name for name, _ in users),
            )
        )
    return listeners


def listeners() -> list[Listener]:
    result = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True)
    return parse_ss(result.stdout)


def _proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def _ppids() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat_line = _proc(int(entry.name), "stat").decode(errors="replace")
            if stat_line:
                parents[int(entry.name)] = int(stat_line.rpartition(")")[2].split()[1])
    return parents


def started_by(root: int, data_dir: Path) -> set[int]:
    """Live processes descending from ``root``, and those whose environment or command line
    names ``data_dir`` (daemons that left the tree)."""
    parents = _ppids()
    found = {root}
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return {pid for pid in found | carrying(data_dir) if _proc(pid, "stat")}


def carrying(data_dir: Path) -> set[int]:
    """Live processes whose environment or command line names ``data_dir``."""
    marker = str(data_dir).encode()
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return {pid for pid in pids if marker in _proc(pid, "environ") + _proc(pid, "cmdline")}


def command(pid: int) -> list[str]:
    return [a.decode() for a in _proc(pid, "cmdline").split(b"\0") if a]


def environ(pid: int) -> dict[str, str]:
    pairs = (a.decode().partition("=") for a in _proc(pid, "environ").split(b"\0") if a)
    return {k: v for k, _, v in pairs}


def test_parse_ss_sees_a_socket_on_every_interface() -> None:
    """The parser the loopback checks rely on reports the bound address and holders."""
    sample = (
        'LISTEN 0 4096 0.0.0.0:4369 0.0.0.0:* users:(("epmd",pid=10199,fd=3))\n'
        'LISTEN 0 128 127.0.0.1:5672 0.0.0.0:* users:(("beam.smp",pid=7,fd=17),'
        '("beam.smp",pid=8,fd=17))\n'
        'LISTEN 0 4096 [::1]:4369 [::]:* users:(("epmd",pid=9,fd=4))\n'
    )
    assert parse_ss(sample) == [
        Listener("0.0.0.0", 4369, frozenset({10199}), frozenset({"epmd"})),
        Listener("127.0.0.1", 5672, frozenset({7, 8}), frozenset({"beam.smp"})),
        Listener("::1", 4369, frozenset({9}), frozenset({"epmd"})),
    ]


SQLITE_FILE = re.compile(r"\.sqlite(-wal|-shm|-journal)?$")


def assert_private_tree(root: Path) -> None:
    """Every directory under ``root`` is 0700 and every file 0600, except FerretDB's SQLite
    files, which keep the modes FerretDB gives them (0644 at most) inside their 0700
    directory (see ``start_ferretdb``)."""
    wide = []
    for dirpath, _dirs, files in os.walk(root):
        if stat.S_IMODE(os.stat(dirpath).st_mode) != 0o700:
            wide.append((dirpath, oct(os.stat(dirpath).st_mode)))
        for name in files:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if not stat.S_ISREG(mode):
                continue
            if SQLITE_FILE.search(name):
                if stat.S_IMODE(mode) & 0o133:
                    wide.append((os.path.join(dirpath, name), oct(mode)))
            elif stat.S_IMODE(mode) != 0o600:
                wide.append((os.path.join(dirpath, name), oct(mode)))
    assert not wide, wide


async def amqp_login(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    await connection.close()


async def assert_guest_refused(port: int, url: str) -> None:
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await amqp_login(f"amqp://guest:guest@127.0.0.1:{port}/")
    await amqp_login(url)  # the node's own user gets in


def assert_cookie(base_dir: Path) -> None:
    cookie = base_dir / ".erlang.cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o600
    value = cookie.read_text().strip()
    assert value != OLD_COOKIE and len(value) >= 32


# ---- parley cluster ------------------------------------------------------------------------


@dataclass
class RunningCluster:
    popen: subprocess.Popen[str]
    data: Path
    edge: str
    amqp_url: str
    output: list[str]

    def parley_pids(self) -> set[int]:
        return started_by(self.popen.pid, self.data)

    def services(self) -> dict[int, tuple[str, str]]:
        """pid -> (service, base URL) of each ``parley serve`` replica."""
        found = {}
        for pid in self.parley_pids():
            argv = command(pid)
            if "serve" in argv and "--http-addr" in argv:
                service = argv[argv.index("serve") + 1]
                found[pid] = (service, "http://" + argv[argv.index("--http-addr") + 1])
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """``parley cluster`` with its own FerretDB and RabbitMQ, as a user starts it."""
    base = tmp_path_factory.mktemp("cluster")
    data = base / "parley-cluster"
    edge = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "PARLEY_INTERNAL_SECRET"}
    popen = subprocess.Popen(
        [
            str(PARLEY),
            "cluster",
            "--data",
            str(data),
            "--http-addr",
            edge,
            "--embedded-mongo-addr",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    assert popen.stdout is not None
    deadline = time.monotonic() + 180
    amqp_url = ""
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("RabbitMQ: "):
            amqp_url = line.split()[1]
        if "Ctrl-C stops" in line:
            break
    assert amqp_url and popen.poll() is None, "".join(output)
    running = RunningCluster(popen, data, edge, amqp_url, output)
    yield running
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        popen.wait(60)


def test_everything_parley_cluster_starts_listens_on_loopback_only(
    cluster: RunningCluster,
) -> None:
    pids = cluster.parley_pids()
    ours = [listener for listener in listeners() if listener.pids & pids]
    names = {name for listener in ours for name in listener.names}
    # What the cluster is made of is there: the test sees its sockets.
    assert {"beam.smp", "epmd", "parley-ferretdb", "nginx"} <= names, ours
    serving = {p for listener in ours for p in listener.pids} & set(cluster.services())
    assert len(serving) == 5, ours  # the four services and one delivery replica
    exposed = [listener for listener in ours if listener.host not in LOOPBACK]
    assert not exposed, exposed
    # The broker's Erlang distribution port and its epmd are among them, on loopback.
    epmd = [listener for listener in ours if "epmd" in listener.names]
    beam = [listener for listener in ours if "beam.smp" in listener.names]
    assert epmd and all(listener.port != 4369 for listener in epmd), epmd
    assert len({listener.port for listener in beam}) >= 2, beam  # AMQP and distribution


def test_every_server_works_inside_the_data_directory(cluster: RunningCluster) -> None:
    for pid in cluster.parley_pids() - {cluster.popen.pid}:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        assert cwd.is_relative_to(cluster.data), (command(pid), cwd)
    beam = [pid for pid in cluster.parley_pids() if "beam.smp" in _proc(pid, "cmdline").decode()]
    assert beam
    for pid in beam:
        dump = Path(environ(pid)["ERL_CRASH_DUMP"])
        assert dump.is_relative_to(cluster.data)


def test_the_cluster_data_directory_is_private(cluster: RunningCluster) -> None:
    assert (cluster.data / "mongo").is_dir() and (cluster.data / "rabbitmq" / "mnesia").is_dir()
    assert_private_tree(cluster.data)


async def test_the_cluster_broker_has_a_private_cookie_and_no_guest(
    cluster: RunningCluster,
) -> None:
    assert_cookie(cluster.data / "rabbitmq")
    port = int(cluster.amqp_url.rsplit(":", 1)[1].strip("/"))
    assert "guest" not in cluster.amqp_url
    await assert_guest_refused(port, cluster.amqp_url)


def internal_routes() -> list[tuple[str, str, str]]:
    """(service, method, sample path) of every ``/internal/`` route the services register."""
    routes = []
    for service, factory in SERVICE_FACTORIES.items():
        app = factory(Settings(), Deps())
        for route in app.router.routes():
            path = route.resource.canonical if route.resource else ""
            if path.startswith("/internal/") and route.method != "HEAD":
                routes.append((service, route.method, re.sub(r"\{[^}]+\}", "12", path)))
    return routes


def test_the_internal_routes_are_found() -> None:
    found = {(s, m, p) for s, m, p in internal_routes()}
    assert ("auth", "POST", "/internal/verify") in found
    assert {s for s, _, _ in found} == set(SERVICE_FACTORIES)


async def test_each_internal_route_needs_the_secret(cluster: RunningCluster) -> None:
    services = cluster.services()
    secrets_seen = {environ(pid)["PARLEY_INTERNAL_SECRET"] for pid in services}
    assert len(secrets_seen) == 1
    secret = secrets_seen.pop()
    assert len(secret) >= 32 and secret != "parley-cluster-internal"
    urls = {service: url for service, url in services.values()}
    async with aiohttp.ClientSession() as http:
        for service, method, path in internal_routes():
            url = urls[service] + path
            for headers, expected in (
                ({}, 401),
                ({INTERNAL_SECRET_HEADER: "wrong" + secret[5:]}, 403),
                ({INTERNAL_SECRET_HEADER: ""}, 403),
            ):
                async with http.request(method, url, headers=headers, json={}) as resp:
                    body = await resp.json()
                    assert resp.status == expected, (method, path, headers, body)
                    assert body["meta"]["code"] == expected and body["meta"]["message"]
            # With the secret, the route answers for itself (its own validation, not the gate).
            headers = {INTERNAL_SECRET_HEADER: secret}
            async with http.request(method, url, headers=headers, json={}) as resp:
                assert resp.status not in (401, 403, 500), (method, path, await resp.text())
        # The edge routes none of them.
        for _service, method, path in internal_routes():
            headers = {INTERNAL_SECRET_HEADER: secret}
            url = f"http://{cluster.edge}{path}"
            async with http.request(method, url, headers=headers, json={}) as resp:
                assert resp.status == 404, (method, path)


def test_stopping_the_cluster_leaves_no_process(cluster: RunningCluster) -> None:
    pids = cluster.parley_pids()
    epmd = [pid for pid in pids if "epmd" in " ".join(command(pid))]
    epmd_ports = [listener.port for listener in listeners() if listener.pids & set(epmd)]
    assert epmd and epmd_ports
    cluster.popen.send_signal(signal.SIGTERM)
    assert cluster.popen.wait(60) == 0
    deadline = time.monotonic() + 10
    while (alive := {pid for pid in pids if _proc(pid, "stat")}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, [command(pid) for pid in alive]
    assert not started_by(cluster.popen.pid, cluster.data)
    assert not any(port_open("127.0.0.1", port) for port in epmd_ports)


# ---- the tests' own broker, and restarts ----------------------------------------------------


async def test_the_test_broker_is_loopback_only_private_and_without_guest(
    rabbitmq: Process | None,
) -> None:
    if rabbitmq is None:
        pytest.skip("PARLEY_TEST_AMQP_URL: the tests use a broker they did not start")
    base = Path(rabbitmq.extra["base_dir"])
    ours = [lsn for lsn in listeners() if lsn.pids & started_by(rabbitmq.popen.pid, base)]
    assert {"beam.smp", "epmd"} <= {name for lsn in ours for name in lsn.names}, ours
    assert all(listener.host in LOOPBACK for listener in ours), ours
    assert_cookie(base)
    await assert_guest_refused(int(rabbitmq.extra["port"]), rabbitmq.extra["url"])


@pytest.mark.slow
async def test_a_restarted_broker_keeps_its_cookie_and_user_and_its_epmd_goes(
    workdir: Path,
) -> None:
    base = workdir / unique("rabbitmq-restart-")
    first = await asyncio.to_thread(start_rabbitmq, base, free_port())
    second: Process | None = None
    try:
        cookie = (base / ".erlang.cookie").read_text()
        old_epmd = first.companions[0]
        second = await asyncio.to_thread(restart_rabbitmq, first)
        assert old_epmd.popen.poll() is not None
        assert second.extra["url"] == first.extra["url"]
        assert (base / ".erlang.cookie").read_text() == cookie
        await amqp_login(second.extra["url"])
    finally:
        await asyncio.to_thread((second or first).stop)
    assert second is not None
    left = carrying(base)
    assert not left, [command(pid) for pid in left]
    assert not port_open("127.0.0.1", int(second.extra["epmd_port"]))


def test_a_node_of_an_earlier_parley_is_refused_not_reused(tmp_path: Path) -> None:
    """A node directory with Mnesia data but no password file was made with ``guest``."""
    (tmp_path / "mnesia").mkdir()
    with pytest.raises(ServerError, match="earlier Parley"):
        start_rabbitmq(tmp_path, free_port())
    assert not (tmp_path / "epmd.log").exists()


# ---- parley serve and parley run -------------------------------------------------------------


def serve(service: str, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PARLEY_INTERNAL_SECRET"}
    return subprocess.Popen(
        [str(PARLEY), "serve", service, *extra],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("secret", [None, "", "x" * 31])
def test_serve_refuses_to_start_without_a_long_internal_secret(
    secret: str | None, mongo_url: str, amqp_url: str
) -> None:
    env = {"PARLEY_MONGO_URL": mongo_url, "PARLEY_AMQP_URL": amqp_url}
    if secret is not None:
        env["PARLEY_INTERNAL_SECRET"] = secret
    process = serve("auth", "--http-addr", f"127.0.0.1:{free_port()}", env=env)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "PARLEY_INTERNAL_SECRET" in lines[0], err
    assert "--insecure-internal" in lines[0]


async def test_serve_starts_with_insecure_internal_or_a_long_secret(
    mongo_url: str, amqp_url: str
) -> None:
    env = {"PARLEY_MONGO_URL": mongo_url, "PARLEY_AMQP_URL": amqp_url}
    for extra, secret in ((["--insecure-internal"], None), ([], "s" * 32)):
        port = free_port()
        process = serve(
            "groups",
            "--http-addr",
            f"127.0.0.1:{port}",
            *extra,
            env={**env, **({"PARLEY_INTERNAL_SECRET": secret} if secret else {})},
        )
        try:
            deadline = time.monotonic() + 60
            while not port_open("127.0.0.1", port):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{port}/internal/groups/1?appid=1"
            status = await asyncio.to_thread(_status, url)
            # Open without a secret only when asked; behind the secret otherwise.
            assert status == (404 if not secret else 401), (extra, status)
        finally:
            process.terminate()
            process.communicate(timeout=30)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def parley_run(data: Path, port: int, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(str(PARLEY), "run", "--data", str(data), "--http-addr", f"127.0.0.1:{port}"),
            *("--embedded-mongo-addr", f"127.0.0.1:{free_port()}"),
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_parley_run_makes_its_data_private_and_routes_no_internal_api(
    tmp_path: Path,
) -> None:
    data = tmp_path / "parley-data"
    (data / "mongo").mkdir(parents=True)
    leftover = data / "mongo" / "ferretdb.log"  # as an earlier Parley left it
    leftover.write_text("")
    leftover.chmod(0o644)
    data.chmod(0o755)
    port = free_port()
    process = parley_run(data, port, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not port_open("127.0.0.1", port):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE(leftover.stat().st_mode) == 0o600
        assert [p.name for p in (data / "mongo").iterdir() if p.suffix == ".sqlite"]
        assert_private_tree(data)
        async with aiohttp.ClientSession() as http:
            for _service, method, path in internal_routes():
                url = f"http://127.0.0.1:{port}{path}"
                async with http.request(method, url, json={}) as resp:
                    assert resp.status == 404, (method, path)
                    assert await resp.json() == {"meta": {"code": 404}}
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert_private_tree(data)


# ---- /internal/verify refusals ---------------------------------------------------------------


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(burst=2, rate=0.5, clock=lambda: now[0])
    assert buckets.allows("a")
    buckets.spend("a")
    buckets.spend("a")
    assert not buckets.allows("a") and buckets.allows("b")
    now[0] = 1.9
    assert not buckets.allows("a")
    now[0] = 2.0
    assert buckets.allows("a")
    now[0] = 100.0
    buckets.spend("a")
    assert buckets.allows("a")  # refilled to the burst, not beyond it
    buckets.spend("a")
    assert not buckets.allows("a")


async def test_verify_refusals_are_rate_limited_per_caller(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    secret = "v" * 40
    settings = stack.settings.model_copy(
        update={
            "internal_secret": secret,
            "verify_refusal_burst": 3,
            "verify_refusal_rate": 0.01,
            "auth_cache_ttl": 0.0,
        }
    )
    server = TestServer(
        create_auth(settings, Deps(db=stack.db, bus=stack.bus)), host="127.0.0.1", port=free_port()
    )
    await server.start_server()
    url = str(server.make_url("/internal/verify"))
    headers = {INTERNAL_SECRET_HEADER: secret}
    right = {"scheme": "server", "appid": app.appid, "secret": md5_hex(app.secret)}
    wrong = {**right, "secret": md5_hex("guess")}

    async def verify(body: dict[str, Any]) -> tuple[int, Any]:
        async with stack.http.post(url, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    try:
        assert (await verify(right))[0] == 200
        for _ in range(3):
            assert (await verify(wrong))[0] == 400
        status, body = await verify(right)  # no more checks for this caller for now
        assert (status, body) == (429, {"meta": {"code": 429, "message": "too many refusals"}})
        assert (await verify({**wrong, "scheme": "appkey", "secret": "guess"}))[0] == 429
        token = await stack.token(app, 5)
        assert (await verify({"scheme": "bearer", "token": token}))[0] == 200
    finally:
        await server.close()


# ---- deployment files -----------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def shell_commands(section: str) -> list[list[str]]:
    """The commands of the ``sh`` blocks of a README section, continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            if line.strip():
                commands.append(shlex.split(line, comments=True))
    return commands


def applied_files(commands: list[list[str]]) -> list[Path]:
    """What each ``kubectl apply -f`` of the steps applies (a directory: its manifests)."""
    files = []
    for argv in commands:
        if argv[:1] != ["kubectl"] or "apply" not in argv:
            continue
        assert "-k" not in argv and "-R" not in argv and "--recursive" not in argv, argv
        for n, arg in enumerate(argv):
            if arg in ("-f", "--filename"):
                path = REPO_ROOT / argv[n + 1]
                if path.is_dir():
                    files += [p for p in sorted(path.iterdir()) if p.suffix in (".yaml", ".yml")]
                else:
                    files.append(path)
    return files


def test_the_kubernetes_steps_cannot_overwrite_a_secret() -> None:
    commands = shell_commands(readme_section("Kubernetes"))
    files = applied_files(commands)
    assert REPO_ROOT / "k8s" / "services.yaml" in files and len(files) >= 5, files
    for path in files:
        kinds = [doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert "Secret" not in kinds, path
    # The example exists (what the Deployments read), outside every file the steps apply.
    example = REPO_ROOT / "k8s" / SECRET_EXAMPLE
    assert example not in files
    secret = yaml.safe_load(example.read_text())
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", "parley-secrets")
    # The steps create the Secret before anything that reads it is applied.
    create = next(n for n, c in enumerate(commands) if c[:1] == ["kubectl"] and "secret" in c)
    first_workload = next(
        n for n, c in enumerate(commands) if c[:1] == ["kubectl"] and "k8s/services.yaml" in c
    )
    assert create < first_workload
    assert "parley-secrets" in commands[create]


def test_applied_files_sees_a_secret_in_a_directory() -> None:
    """The check above fails on a step that applies the whole k8s/ tree recursively or the
    example itself."""
    files = applied_files([["kubectl", "apply", "-f", f"k8s/{SECRET_EXAMPLE}"]])
    kinds = [d["kind"] for p in files for d in yaml.safe_load_all(p.read_text()) if d]
    assert "Secret" in kinds
    with pytest.raises(AssertionError):
        applied_files([["kubectl", "apply", "-R", "-f", "k8s"]])


def test_compose_refuses_to_start_without_the_internal_secret() -> None:
    result = compose_check(REPO_ROOT / "docker-compose.yml", env={})
    assert result.returncode != 0
    assert "PARLEY_INTERNAL_SECRET" in result.stdout + result.stderr


def test_the_compose_edge_resolves_service_names_again(tmp_path: Path) -> None:
    config = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    assert config == render_compose_nginx()
    assert re.search(r"^\s*resolver 127\.0\.0\.11 valid=\d+s", config, re.M)
    # A named upstream would be resolved once, at start.
    assert not re.search(r"^\s*upstream\s", config, re.M)
    passes = re.findall(r"proxy_pass (\S+);", config)
    assert passes and all(p.startswith("http://$parley_") for p in passes), passes
    nginx = "/usr/sbin/nginx"
    (tmp_path / "nginx.conf").write_text(config)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---- the repository ------------------------------------------------------------------------


def test_no_crash_dump_is_committed() -> None:
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert files
    dumps = [f for f in files if re.search(r"(^|/)(MnesiaCore\.|erl_crash\.dump)", f)]
    assert not dumps, dumps
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "MnesiaCore.*" in ignored and "erl_crash.dump" in ignored
