"""The ``parley`` command as a user runs it: ``parley run`` starts its own FerretDB, creates a
demo app and prints a curl command that works; management commands work while it runs."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo.errors import PyMongoError

from parley.cli import SERVICE_ORDER, DefaultsFormatter, _with_auth, build_parser
from parley.servers import REPO_ROOT, free_port, port_open
from shared.errors import store_unavailable
from shared.mongo import make_client
from shared.routing import SERVICES
from shared.settings import Settings

from .conftest import PARLEY, start_parley_run


def parley(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PARLEY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        check=False,
    )


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """``parley run`` in a subprocess: (base URL, its output so far, data dir)."""
    http, mongo = free_port(), free_port()
    process, _, _ = start_parley_run(tmp_path, http, mongo)
    try:
        yield f"http://127.0.0.1:{http}", f"mongodb://127.0.0.1:{mongo}/", tmp_path / "data"
    finally:
        process.terminate()
        process.wait(30)
    # On exit it stops the FerretDB it started, and itself.
    assert not port_open("127.0.0.1", mongo)
    assert not port_open("127.0.0.1", http)


def test_parley_run_prints_a_working_tour(running: tuple[str, str, Path], tmp_path: Path) -> None:
    base, mongo_url, data = running
    output = (tmp_path / "run.out").read_text()
    assert "Created a demo app" in output
    curl_line = next(line for line in output.splitlines() if line.strip().startswith("curl "))
    granted = subprocess.run(shlex.split(curl_line), capture_output=True, text=True, check=True)
    token = json.loads(granted.stdout)["data"]["token"]
    assert re.fullmatch(r"[A-Za-z0-9]{30}", token)
    again = subprocess.run(shlex.split(curl_line), capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == {"data": {"token": token}}

    # The README's third step: change a setting (200, empty body).
    user = re.search(r"-u (\S+)", curl_line)
    assert user is not None
    changed = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-u",
            user.group(1),
            "-X",
            "POST",
            "-d",
            '{"mute": true}',
            f"{base}/users/1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert changed.stdout == "200"
    assert (data / "mongo").is_dir()

    # Management commands work while it runs.
    created = parley("app", "create", "--name", "second", "--json", "--mongo-url", mongo_url)
    assert created.returncode == 0, created.stderr
    app = json.loads(created.stdout)
    assert set(app) == {"appid", "key", "secret"}
    listed = parley("app", "list", "--json", "--mongo-url", mongo_url)
    assert [a["name"] for a in json.loads(listed.stdout)] == ["demo", "second"]

    # Without --json it prints the -u value of server calls too, as `parley run` does.
    third = parley("app", "create", "--name", "third", "--mongo-url", mongo_url)
    assert third.returncode == 0, third.stderr
    printed = re.search(r"curl -u (\d+):([0-9a-f]{32}) ", third.stdout)
    assert printed is not None, third.stdout
    secret = re.search(r"secret: (\S+)", third.stdout)
    assert secret is not None
    assert printed.group(2) == hashlib.md5(secret.group(1).encode()).hexdigest()
    granted_third = subprocess.run(
        [
            "curl",
            "-s",
            "-u",
            f"{printed.group(1)}:{printed.group(2)}",
            "-d",
            '{"uid":5}',
            f"{base}/auth/grant",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "token" in json.loads(granted_third.stdout)["data"]

    # A customer-service desk for it, and a visitor through the running Parley.
    store = parley(
        "store",
        "create",
        "--app",
        str(app["appid"]),
        "--name",
        "desk",
        "--json",
        "--mongo-url",
        mongo_url,
    )
    assert store.returncode == 0, store.stderr
    store_id = json.loads(store.stdout)["store_id"]
    agent = parley(
        "store",
        "add-agent",
        "--store",
        str(store_id),
        "--name",
        "ann@example.com",
        "--json",
        "--mongo-url",
        mongo_url,
    )
    assert agent.returncode == 0, agent.stderr
    seller_id = json.loads(agent.stdout)["seller_id"]
    again = parley(
        "store", "create", "--app", str(app["appid"]), "--name", "x", "--mongo-url", mongo_url
    )
    assert again.returncode == 1 and "already has a store" in again.stderr
    missing = parley("store", "create", "--app", "999", "--name", "x", "--mongo-url", mongo_url)
    assert missing.returncode == 1 and "no app 999" in missing.stderr
    registered = subprocess.run(
        [
            "curl",
            "-s",
            "-d",
            json.dumps({"appid": app["appid"], "customer_id": "c1"}),
            f"{base}/auth/customer",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    visitor = json.loads(registered.stdout)["data"]
    assert visitor["store_id"] == store_id
    chosen = subprocess.run(
        [
            "curl",
            "-s",
            "-H",
            f"Authorization: Bearer {visitor['token']}",
            f"{base}/supporters?store_id={store_id}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(chosen.stdout)["data"]["seller_id"] == seller_id


def test_second_start_reuses_the_data(tmp_path: Path) -> None:
    http, mongo = free_port(), free_port()
    args = [
        "run",
        "--http-addr",
        f"127.0.0.1:{http}",
        "--data",
        str(tmp_path / "d"),
        "--embedded-mongo-addr",
        f"127.0.0.1:{mongo}",
    ]
    outputs = []
    for _ in range(2):
        process = subprocess.Popen(
            [*PARLEY, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
        )
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "curl" in line:
                break
        process.terminate()
        process.wait(30)
        outputs.append("".join(lines))
    assert "Created a demo app" in outputs[0]
    assert "Created a demo app" not in outputs[1]
    secret = re.search(r"secret: (\S+)", outputs[0])
    assert secret is not None and secret.group(1) in outputs[1]


def test_gateway_config_command() -> None:
    others = [f"--upstream={s}=10.1.3.{n}:8080" for n, s in enumerate(SERVICES) if s != "auth"]
    result = parley(
        "gateway-config",
        "--format",
        "nginx",
        "--upstream",
        "auth=10.1.2.3:8081",
        "--upstream",
        "auth=10.1.2.4:8081",
        *others,
        "--listen",
        "127.0.0.1:9000",
    )
    assert result.returncode == 0, result.stderr
    assert "server 10.1.2.3:8081" in result.stdout and "server 10.1.2.4:8081" in result.stdout
    assert "listen 127.0.0.1:9000;" in result.stdout
    assert result.stderr == ""

    # A service left without upstream: refused, naming the services and their routes.
    partial = parley("gateway-config", "--upstream", "auth=10.1.2.3:8081")
    assert partial.returncode == 2 and partial.stdout == ""
    assert "no --upstream for groups, messages, customer" in partial.stderr
    assert "POST /groups" in partial.stderr and len(partial.stderr.splitlines()) == 1
    nothing = parley("gateway-config")
    assert nothing.returncode == 2 and "auth, groups, messages, customer" in nothing.stderr
    # ... unless asked for: then it still says what is unrouted.
    forced = parley("gateway-config", "--upstream", "auth=10.1.2.3:8081", "--partial")
    assert forced.returncode == 0 and "parley_auth" in forced.stdout
    assert "parley_groups" not in forced.stdout and "no --upstream for" in forced.stderr
    bad = parley("gateway-config", "--upstream", "nope=1.2.3.4:1")
    assert bad.returncode == 2
    ingress = parley("gateway-config", "--format", "ingress")
    assert ingress.stdout == (REPO_ROOT / "k8s" / "ingress.yaml").read_text()


def test_serve_needs_a_broker() -> None:
    result = parley("serve", "auth", "--mongo-url", "mongodb://127.0.0.1:1/")
    assert result.returncode == 2
    assert "--amqp-url" in result.stderr


def test_version() -> None:
    result = parley("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"parley \d+\.\d+\.\d+\n", result.stdout)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_shows_its_default() -> None:
    checked = 0
    for parser in _parsers(build_parser()):
        assert parser.formatter_class is DefaultsFormatter, parser.prog
        formatter = DefaultsFormatter(parser.prog)
        for action in parser._actions:
            if (
                not action.option_strings
                or action.required
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                or action.const is True  # a flag: off unless given
            ):
                continue
            text = formatter._get_help_string(action) or ""
            assert "default" in text, f"{parser.prog} {action.option_strings}: {text!r}"
            checked += 1
    assert checked > 30
    shown = parley("run", "--help").stdout
    assert "(default: 127.0.0.1:27018)" in " ".join(shown.split())
    assert "(default: ./parley-data)" in shown


def test_the_service_order_is_the_runners() -> None:
    from parley.allinone import SERVICE_FACTORIES

    assert tuple(SERVICE_FACTORIES) == SERVICE_ORDER


def test_management_commands_fail_fast_without_a_store() -> None:
    nowhere = f"mongodb://127.0.0.1:{free_port()}/"
    # What the commands run, timed in this process: the interpreter's start-up, slow on a
    # loaded machine, is not the command's doing.
    settings = Settings(mongo_url=nowhere)
    for action in ("list", "create"):
        started = time.monotonic()
        with pytest.raises(PyMongoError) as failure:
            asyncio.run(_with_auth(settings, action, "x"))
        elapsed = time.monotonic() - started
        print(f"app {action}: gave up after {elapsed:.1f}s")
        assert store_unavailable(failure.value)
        assert elapsed < 3.0
    for argv in (
        ["app", "list", "--mongo-url", nowhere],
        ["app", "create", "--name", "x", "--mongo-url", nowhere],
        ["store", "create", "--app", "1", "--name", "x", "--mongo-url", nowhere],
    ):
        result = parley(*argv)
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"cannot reach MongoDB at {nowhere} (no answer in 2s)" in lines[0]


def test_bench_shows_setup_progress_and_removes_its_app(
    running: tuple[str, str, Path],
) -> None:
    base, mongo_url, _ = running
    argv = ["--url", base, "--mongo-url", mongo_url, "--duration", "0.3", "--concurrency", "2"]
    result = parley("bench", *argv, "--families", "grant,groups,history", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "setup: granting tokens 200/200" in result.stderr
    assert "setup: posting messages to read 100/100" in result.stderr
    removed = re.search(r"bench: removed app (\d+) and its data", result.stderr)
    assert removed is not None, result.stderr
    appid = int(removed.group(1))
    listed = json.loads(parley("app", "list", "--json", "--mongo-url", mongo_url).stdout)
    assert [a["name"] for a in listed] == ["demo"]
    leftovers = asyncio.run(_documents_of(mongo_url, appid))
    assert leftovers == {}, leftovers

    kept = parley("bench", *argv, "--families", "grant", "--keep", timeout=180)
    assert kept.returncode == 0, kept.stderr
    assert "removed" not in kept.stderr
    listed = json.loads(parley("app", "list", "--json", "--mongo-url", mongo_url).stdout)
    assert [a["name"] for a in listed] == ["demo", "bench"]


async def _documents_of(mongo_url: str, appid: int) -> dict[str, int]:
    client = make_client(mongo_url)
    try:
        db = client["parley"]
        counts = {}
        for name in await db.list_collection_names():
            query = {"_id": appid} if name == "auth_apps" else {"appid": appid}
            if n := await db[name].count_documents(query):
                counts[name] = n
        return counts
    finally:
        await client.close()


def test_scripts_run_says_how_to_get_parley_on_the_path() -> None:
    path = [
        d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "parley").exists()
    ]
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "run"), "--help"],
        env={**os.environ, "PATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: parley run" in result.stdout
    assert f"export PATH={REPO_ROOT}/.venv/bin:$PATH" in result.stderr
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## The `parley` command", 1)[1].split("## Settings", 1)[0]
    assert "`.venv/bin/parley" in table
