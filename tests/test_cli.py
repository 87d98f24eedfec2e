"""The ``parley`` command as a user runs it: ``parley run`` starts its own FerretDB, creates a
demo app and prints a curl command that works; management commands work while it runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from parley.servers import REPO_ROOT, free_port, port_open

PARLEY = [sys.executable, "-m", "parley.cli"]


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
    out = tmp_path / "run.out"
    with open(out, "w") as sink:
        process = subprocess.Popen(
            [
                *PARLEY,
                "run",
                "--http-addr",
                f"127.0.0.1:{http}",
                "--data",
                str(tmp_path / "data"),
                "--embedded-mongo-addr",
                f"127.0.0.1:{mongo}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while "curl" not in out.read_text():
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
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
    result = parley(
        "gateway-config",
        "--format",
        "nginx",
        "--upstream",
        "auth=10.1.2.3:8081",
        "--upstream",
        "auth=10.1.2.4:8081",
        "--listen",
        "127.0.0.1:9000",
    )
    assert result.returncode == 0, result.stderr
    assert "server 10.1.2.3:8081" in result.stdout and "server 10.1.2.4:8081" in result.stdout
    assert "listen 127.0.0.1:9000;" in result.stdout
    bad = parley("gateway-config", "--upstream", "nope=1.2.3.4:1")
    assert bad.returncode == 2
    ingress = parley("gateway-config", "--format", "ingress")
    assert ingress.stdout == (REPO_ROOT / "k8s" / "ingress.yaml").read_text()


def test_serve_needs_a_broker() -> None:
    result = parley("serve", "auth", "--mongo-url", "mongodb://127.0.0.1:1/")
    assert result.returncode == 2
    assert "--amqp-url" in result.stderr
