"""Input that is decodable but not storable, or not decodable at all, on every endpoint: 400 in
the envelope, nothing stored, no event, and no request header echoed into an answer or a log.
One mode suffices: every refusal happens before anything reaches the bus."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
import structlog
from yarl import URL

from services.auth.admin import AuthAdmin
from shared.logs import configure_logging

from .conftest import App, Stack
from .probes import INVALID_PARAM, JSON_DECODE_ERROR, nothing_written
from .test_customer import app_key, desk

INVALID_APPID = {"meta": {"code": 400, "message": "非法的appid"}}
INVALID_TOKEN = {
    "error": "非法的access token",
    "meta": {"code": 400, "message": "非法的access token"},
}
LONE = "\ud83d"  # half of an emoji, as a JavaScript back-end cutting a string produces


async def raw_request(stack: Stack, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (headers aiohttp's client would refuse to send) and read the answer."""
    url = URL(stack.base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def http_request(method: str, path: str, headers: list[bytes], body: bytes = b"") -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1".encode(),
        b"Host: parley",
        b"Connection: close",
        f"Content-Length: {len(body)}".encode(),
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---- Authorization headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "authorization", "expected"),
    [
        ("/auth/grant", b"Basic \xc3\xa9", INVALID_APPID),  # "Basic é" in UTF-8
        ("/auth/grant", b"Basic \xe9", INVALID_APPID),  # ... in Latin-1
        ("/auth/grant", b"Basic !!not-base64!!", INVALID_APPID),
        ("/auth/grant", b"Basic " + base64.b64encode(b"\xff\xfe:x"), INVALID_APPID),
        ("/auth/grant", b"Basic " + base64.b64encode(b"7\xff:x"), INVALID_APPID),
        ("/customer/register", b"Basic \xc3\xa9", INVALID_APPID),
        ("/client/groups", b"Bearer \xff", INVALID_TOKEN),
        ("/client/groups", b"Bearer \xc3\xa9t\xc3\xa9", INVALID_TOKEN),
        ("/messages/offline", b"Bearer \xff", INVALID_TOKEN),
        ("/messages/offline", b"Basic \xff", INVALID_APPID),
    ],
)
async def test_undecodable_authorization_is_refused(
    own_stack: Stack, path: str, authorization: bytes, expected: dict[str, Any]
) -> None:
    stack = own_stack
    app = await stack.new_app()
    body = json.dumps({"uid": 1, "appid": app.appid}).encode()
    method = "GET" if path in ("/client/groups", "/messages/offline") else "POST"
    async with nothing_written(stack, app.appid):
        status, headers, answer = await raw_request(
            stack, http_request(method, path, [b"Authorization: " + authorization], body)
        )
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer) == expected


async def test_a_malformed_header_is_never_echoed(own_stack: Stack, caplog: Any) -> None:
    """aiohttp answers a request it cannot parse itself; Parley's server makes that answer the
    envelope, and neither it nor any log line quotes the request."""
    stack = own_stack
    secret = "SeCrEtToKeN"
    configure_logging(level="debug", cache=False)
    try:
        with structlog.testing.capture_logs() as logs, caplog.at_level(logging.DEBUG):
            status, headers, answer = await raw_request(
                stack,
                http_request(
                    "GET", "/client/groups", [f"Authorization: Bearer {secret}\x01x".encode()]
                ),
            )
    finally:
        configure_logging(level="warning", cache=False)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer) == {"meta": {"code": 400, "message": "bad request"}}
    assert secret not in answer.decode("latin-1")
    assert secret not in repr(logs) and secret not in caplog.text
    assert any(line.get("event") == "malformed request refused" for line in logs)


async def test_request_ids_are_ascii_or_replaced(own_stack: Stack) -> None:
    stack = own_stack
    status, headers, _ = await raw_request(
        stack, http_request("GET", "/healthz", [b"X-Request-ID: caf\xc3\xa9-\xff"])
    )
    assert status == 200
    request_id = headers["x-request-id"]
    assert request_id.isascii() and len(request_id) == 32  # a fresh one
    status, headers, _ = await raw_request(
        stack, http_request("GET", "/healthz", [b"X-Request-ID: trace-42"])
    )
    assert headers["x-request-id"] == "trace-42"


# ---- JSON Parley refuses to decode ------------------------------------------------------------


async def body_routes(stack: Stack, app: App) -> list[tuple[str, str, dict[str, str]]]:
    """Every endpoint that reads a JSON body, with credentials that get it to the body."""
    await desk(stack, app, ["ann"])
    status, reply, _ = await stack.request(
        "POST",
        "/groups",
        json={"master": 1, "name": "g", "members": [1, 2]},
        headers=app.server_auth,
    )
    assert status == 200, reply
    gid = reply["data"]["group_id"]
    await stack.wait_inbox(app.appid, "u:2", 1)
    server, alice = app.server_auth, await stack.client(app, 1)
    return [
        ("POST", "/auth/grant", server),
        ("POST", "/users/5", server),
        ("PATCH", "/users/5", server),
        ("POST", "/groups", server),
        ("PATCH", f"/groups/{gid}", server),
        ("POST", f"/groups/{gid}/members", server),
        ("DELETE", f"/groups/{gid}/members", server),
        ("PATCH", f"/groups/{gid}/members/2", server),
        ("POST", "/client/groups", alice),
        ("PATCH", f"/client/groups/{gid}", alice),
        ("POST", f"/client/groups/{gid}/members", alice),
        ("DELETE", f"/client/groups/{gid}/members", alice),
        ("PATCH", f"/client/groups/{gid}/members/1", alice),
        ("POST", "/messages/peers", server),
        ("POST", "/messages/groups", server),
        ("POST", "/messages/systems", server),
        ("POST", "/messages/notifications", server),
        ("POST", "/messages/groups/notifications", server),
        ("POST", "/messages/rooms", server),
        ("POST", "/auth/customer", app_key(app)),
        ("POST", "/customer/register", app_key(app)),
        ("POST", "/v2/customer/register", app_key(app)),
    ]


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    "body",
    [
        nested(10_000),
        '{"uid": ' + nested(65) + "}",
        '{"uid": 1, "x": ' + "{" + '"a":{' * 200 + "}" * 201 + "}",
        '{"uid": ' + "7" * 5000 + "}",
        '{"uid": 1, "x": -' + "9" * 65 + "}",
        '{"uid": 1, "x": NaN}',
        '{"uid": 1, "x": 1e400}',
    ],
    ids=["deep-10000", "deep-65", "deep-objects", "int-5000", "int-65", "nan", "float-range"],
)
async def test_json_beyond_bounds_is_refused_on_every_endpoint(own_stack: Stack, body: str) -> None:
    stack = own_stack
    app = await stack.new_app()
    routes = await body_routes(stack, app)
    async with nothing_written(stack, app.appid):
        for method, path, headers in routes:
            status, reply, _ = await stack.request(method, path, data=body, headers=headers)
            assert (status, reply) == (400, JSON_DECODE_ERROR), (method, path)


async def test_json_at_the_bounds_is_accepted(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    body = '{"uid": 1, "user_name": "x", "extra": ' + nested(63) + ', "n": ' + "9" * 64 + "}"
    status, reply, _ = await stack.request(
        "POST", "/auth/grant", data=body, headers=app.server_auth
    )
    assert status == 200, reply


# ---- lone surrogates -----------------------------------------------------------------------


async def test_lone_surrogates_in_every_text_field(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    routes = await body_routes(stack, app)
    by_path = {(method, path): headers for method, path, headers in routes}
    gid = next(int(p.split("/")[2]) for _, p, _ in routes if p.startswith("/groups/"))
    member = {"uid": 3, "name": "m", "avatar": "a"}
    fields: list[tuple[str, str, Any]] = [
        ("POST", "/auth/grant", {"uid": 5, "user_name": LONE}),
        ("POST", "/users/5", {"name": LONE}),
        ("PATCH", "/users/5", {"name": LONE}),
        ("POST", "/groups", {"master": 1, "name": LONE, "members": [1]}),
        ("POST", "/groups", {"master": 1, "name": "g", "members": [{**member, "name": LONE}]}),
        ("POST", "/groups", {"master": 1, "name": "g", "members": [{**member, "avatar": LONE}]}),
        ("PATCH", f"/groups/{gid}", {"name": LONE}),
        ("PATCH", f"/groups/{gid}", {"notice": LONE}),
        ("POST", f"/groups/{gid}/members", {"members": [{**member, "name": LONE}]}),
        ("POST", f"/groups/{gid}/members", {"members": [{**member, "avatar": LONE}]}),
        ("POST", f"/groups/{gid}/members", {"members": [3], "inviter": {"uid": 1, "name": LONE}}),
        ("POST", f"/groups/{gid}/members", {"uid": 3, "name": LONE}),
        ("DELETE", f"/groups/{gid}/members", [{"uid": 2, "name": LONE}]),
        ("PATCH", f"/groups/{gid}/members/2", {"nickname": LONE}),
        ("POST", "/client/groups", {"master": 1, "name": LONE, "members": [2]}),
        (
            "POST",
            "/client/groups",
            {"master": 1, "name": "g", "members": [{**member, "name": LONE}]},
        ),
        ("PATCH", f"/client/groups/{gid}", {"name": LONE}),
        ("PATCH", f"/client/groups/{gid}", {"notice": LONE}),
        ("POST", f"/client/groups/{gid}/members", [{**member, "name": LONE}]),
        ("DELETE", f"/client/groups/{gid}/members", [{"uid": 2, "name": LONE}]),
        ("PATCH", f"/client/groups/{gid}/members/1", {"nickname": LONE}),
        ("POST", "/messages/peers", {"sender": 1, "receiver": 2, "content": LONE}),
        ("POST", "/messages/groups", {"sender": 1, "receiver": gid, "content": LONE}),
        ("POST", "/messages/systems", {"receiver": 2, "content": LONE}),
        ("POST", "/messages/notifications", {"receiver": 2, "content": LONE}),
        ("POST", "/messages/groups/notifications", {"group_id": gid, "content": LONE}),
        ("POST", "/messages/rooms", {"sender": 1, "receiver": 9, "content": LONE}),
    ]
    for path in ("/auth/customer", "/customer/register", "/v2/customer/register"):
        for field in ("customer_id", "name", "avatar"):
            fields.append(("POST", path, {"appid": app.appid, "customer_id": "c", field: LONE}))
    # Not only the fields an endpoint reads: a key, or a field it ignores.
    fields.append(("POST", "/auth/grant", {"uid": 5, LONE: 1}))
    fields.append(
        ("POST", "/messages/peers", {"sender": 1, "receiver": 2, "content": "x", "y": LONE})
    )
    assert {(m, p) for m, p, _ in fields} == set(by_path)  # every JSON endpoint is covered
    async with nothing_written(stack, app.appid):
        for method, path, body in fields:
            status, reply, _ = await stack.request(
                method, path, json=body, headers=by_path[(method, path)]
            )
            assert (status, reply) == (400, INVALID_PARAM), (method, path, body)
    # A valid pair (a whole emoji) is text like any other.
    status, _, _ = await stack.request(
        "POST",
        "/messages/peers",
        json={"sender": 1, "receiver": 2, "content": "\ud83d\ude00"},
        headers=app.server_auth,
    )
    assert status == 200
    entries = await stack.wait_inbox(app.appid, "u:2", 2)
    assert entries[-1]["content"] == "😀"


async def test_register_writes_no_mapping_for_a_refused_visitor(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    async with nothing_written(stack, app.appid):
        status, reply, _ = await stack.request(
            "POST",
            "/customer/register",
            json={"appid": app.appid, "customer_id": "c-9", "name": LONE},
            headers=app_key(app),
        )
        assert (status, reply) == (400, INVALID_PARAM)
    assert await stack.db["customer_clients"].find_one({"_id": f"{app.appid}:c-9"}) is None


# ---- /auth/customer keeps what it is not given ----------------------------------------------


async def test_auth_customer_keeps_a_visitors_name(own_stack: Stack) -> None:
    stack = own_stack
    app = await stack.new_app()
    await desk(stack, app, ["ann"])
    first = {"appid": app.appid, "customer_id": "v-1", "name": "Vi", "avatar": "v.png"}
    status, reply, _ = await stack.request("POST", "/auth/customer", json=first)
    assert status == 200, reply
    client_id = reply["data"]["client_id"]

    async def profile() -> tuple[str, str]:
        user = await AuthAdmin(stack.db, stack.settings).user(app.appid, client_id)
        assert user is not None
        return user.name, user.avatar

    status, again, _ = await stack.request(
        "POST", "/auth/customer", json={"appid": app.appid, "customer_id": "v-1"}
    )
    assert (status, again) == (200, reply)
    assert await profile() == ("Vi", "v.png")
    status, _, _ = await stack.request(
        "POST", "/auth/customer", json={"appid": app.appid, "customer_id": "v-1", "name": "Vo"}
    )
    assert status == 200
    assert await profile() == ("Vo", "v.png")
    # /customer/register (app-key credentials) replaces both, as the reference did (spec X2).
    status, _, _ = await stack.request(
        "POST",
        "/customer/register",
        json={"appid": app.appid, "customer_id": "v-1"},
        headers=app_key(app),
    )
    assert status == 200
    assert await profile() == ("", "")
