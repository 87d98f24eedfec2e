"""What an operator sees: ``/metrics`` on every process (never through the edge), the access
log, and the client-disconnect log line."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from shared.logs import configure_logging

from .conftest import Stack


def metrics_url(stack: Stack, service: str) -> str:
    """Where a service's process serves /metrics: the all-in-one app, or the service's own
    ``parley serve`` process (never the edge)."""
    if stack.mode != "distributed":
        return stack.base_url + "/metrics"
    process = next(p for p in stack.processes if p.name == f"parley-{service}")
    argv = [str(a) for a in process.popen.args]  # type: ignore[union-attr]
    return f"http://{argv[argv.index('--http-addr') + 1]}/metrics"


async def scrape(
    stack: Stack, service: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with stack.http.get(metrics_url(stack, service)) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_store_commands_events_and_dead_letters(
    stack: Stack,
) -> None:
    app = await stack.new_app()
    queue = f"{stack.settings.amqp_exchange}.messages.group-notifications"
    before_auth = await scrape(stack, "auth")
    before_messages = await scrape(stack, "messages")

    for uid in (1, 2, 3):
        status, _, _ = await stack.request(
            "POST", "/auth/grant", json={"uid": uid}, headers=app.server_auth
        )
        assert status == 200
    status, _, _ = await stack.request(
        "POST", "/auth/grant", json={"uid": "x"}, headers=app.server_auth
    )
    assert status == 400
    # A malformed event on the messages service's queue: dead-lettered at once.
    await stack.bus.publish("group.created", b"{not json", message_id=uuid.uuid4().hex)

    deadline = asyncio.get_running_loop().time() + 10
    while True:
        after_messages = await scrape(stack, "messages")
        dead = value(after_messages, "parley_events_dead_lettered_total", queue=queue) - value(
            before_messages, "parley_events_dead_lettered_total", queue=queue
        )
        if dead >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, "no dead letter counted"
        await asyncio.sleep(0.1)
    assert dead == 1
    consumed = ("parley_events_consumed_total", {"queue": queue, "outcome": "dead"})
    assert value(after_messages, consumed[0], **consumed[1]) > value(
        before_messages, consumed[0], **consumed[1]
    )
    letters = await stack.bus.take_dead_letters(1000)
    assert any(letter.body == b"{not json" for letter in letters)

    after = await scrape(stack, "auth")
    ok = {"route": "/auth/grant", "method": "POST", "status": "200"}
    bad = {**ok, "status": "400"}
    assert (
        value(after, "parley_http_requests_total", **ok)
        - value(before_auth, "parley_http_requests_total", **ok)
        == 3
    )
    assert (
        value(after, "parley_http_requests_total", **bad)
        - value(before_auth, "parley_http_requests_total", **bad)
        == 1
    )
    latency = (
        "parley_http_request_duration_seconds_count",
        {"route": "/auth/grant", "method": "POST"},
    )
    assert (
        value(after, latency[0], **latency[1]) - value(before_auth, latency[0], **latency[1]) == 4
    )
    # Every change is an insert (of its revision) on every store.
    assert value(after, "parley_store_command_duration_seconds_count", command="insert") > value(
        before_auth, "parley_store_command_duration_seconds_count", command="insert"
    )
    published = ("parley_events_published_total", {"routing_key": "token.granted"})
    assert (
        value(after, published[0], **published[1])
        - value(before_auth, published[0], **published[1])
        >= 3
    )
    if stack.mode != "local":
        assert value(after, "parley_event_publish_confirm_seconds_count") > 0
    assert ("parley_outbox_backlog", (("collection", "auth_user_pending"),)) in after
    assert ("parley_pending_messages", ()) in after_messages


async def test_the_edge_does_not_route_operations_paths(stack: Stack) -> None:
    if stack.mode != "distributed":
        pytest.skip("the all-in-one app is its own edge; these are its operations paths")
    for path in ("/metrics", "/readyz", "/internal/verify"):
        status, body, _ = await stack.request("GET", path)
        assert (status, body) == (404, {"meta": {"code": 404}}), path


async def test_readyz_names_what_it_checked(stack: Stack) -> None:
    url = metrics_url(stack, "messages").removesuffix("/metrics") + "/readyz"
    async with stack.http.get(url) as resp:
        assert resp.status == 200
        body = await resp.json()
    expected = {"mongodb"} | ({"rabbitmq"} if stack.mode != "local" else set())
    assert body == {"status": "ready", "checks": dict.fromkeys(expected, "ok")}


async def test_one_access_line_per_request_without_secrets(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    configure_logging(level="info", cache=False)
    try:
        with structlog.testing.capture_logs() as logs:
            _, granted, _ = await stack.request(
                "POST",
                "/auth/grant",
                json={"uid": 4, "user_name": "secret-name"},
                headers={**app.server_auth, "X-Request-ID": "rid-1"},
            )
            await stack.request("GET", "/groups/abc")
    finally:
        configure_logging(level="warning", cache=False)
    access = [line for line in logs if line["event"] == "access"]
    assert len(access) == 2, access
    grant, missing = access
    assert {k: grant[k] for k in ("method", "route", "status", "request_id", "appid")} == {
        "method": "POST",
        "route": "/auth/grant",
        "status": 200,
        "request_id": "rid-1",
        "appid": app.appid,
    }
    assert grant["ms"] >= 0
    assert (missing["route"], missing["status"]) == ("unmatched", 404)
    text = repr(access)
    for secret in (granted["data"]["token"], app.secret, "secret-name"):
        assert secret not in text


async def test_a_client_that_disconnects_is_one_info_line(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    host, port = stack.base_url.removeprefix("http://").split(":")
    configure_logging(level="info", cache=False)
    try:
        with structlog.testing.capture_logs() as logs:
            _, writer = await asyncio.open_connection(host, int(port))
            auth = app.server_auth["Authorization"]
            writer.write(
                (
                    "POST /auth/grant HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                    f"Authorization: {auth}\r\n\r\n" + '{"uid": 1'
                ).encode()
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.transport.abort()  # gone before the body is complete
            for _ in range(100):
                if any(line["event"] == "access" for line in logs):
                    break
                await asyncio.sleep(0.1)
    finally:
        configure_logging(level="warning", cache=False)
    assert not [line for line in logs if line["log_level"] in ("error", "critical")], logs
    gone = [line for line in logs if line["event"] == "client disconnected"]
    assert len(gone) == 1 and gone[0]["log_level"] == "info"
    assert "exc_info" not in gone[0]
    access = [line for line in logs if line["event"] == "access"]
    assert [(a["route"], a["status"]) for a in access] == [("/auth/grant", 499)]
