"""S1 ``POST /auth/grant`` and S2 ``POST|PATCH /users/{uid}`` over real HTTP through the edge,
in every mode (all-in-one with the in-process bus, all-in-one on RabbitMQ, distributed behind
nginx), with the events each request published."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

import pytest

from services.auth.admin import AuthAdmin, User
from shared.events import TokenGranted, UserSettingsChanged

from .conftest import App, Stack, basic, md5_hex, one_mode

INVALID_APPID = {"meta": {"code": 400, "message": "非法的appid"}}
INVALID_PARAM = {"meta": {"code": 400, "message": "invalid param"}}
JSON_DECODE = {"meta": {"code": 400, "message": "json decode error"}}
TOKEN_RE = re.compile(r"^[A-Za-z0-9]{30}$")


async def grant(stack: Stack, app: App, body: Any, **kw: Any) -> tuple[int, Any]:
    status, payload, _ = await stack.request(
        "POST", "/auth/grant", json=body, headers=app.server_auth, **kw
    )
    return status, payload


async def user_doc(stack: Stack, appid: int, uid: int) -> User | None:
    return await AuthAdmin(stack.db, stack.settings).user(appid, uid)


async def uids(stack: Stack, appid: int) -> list[int]:
    return await AuthAdmin(stack.db, stack.settings).uids(appid)


# ---- S1: grant ----------------------------------------------------------------------------


async def test_grant_returns_a_permanent_token_and_publishes(stack: Stack) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        status, body = await grant(stack, app, {"uid": 13635273143, "user_name": "alice"})
        assert status == 200
        assert set(body) == {"data"} and set(body["data"]) == {"token"}
        token = body["data"]["token"]
        assert TOKEN_RE.match(token)

        status, again = await grant(stack, app, {"uid": "13635273143"})  # digit string id
        assert (status, again) == (200, {"data": {"token": token}})

        received = await events.wait_for(2)
        assert [type(e) for e in received] == [TokenGranted, TokenGranted]
        assert [(e.appid, e.uid, e.user_name) for e in received] == [  # type: ignore[attr-defined]
            (app.appid, 13635273143, "alice"),
            (app.appid, 13635273143, ""),
        ]
        assert len({e.event_id for e in received}) == 2
        assert await events.published() == received

    doc = await user_doc(stack, app.appid, 13635273143)
    assert doc is not None
    assert doc.token == token and doc.name == ""  # a grant without user_name stores ""
    assert await AuthAdmin(stack.db, stack.settings).unannounced(app.appid, 13635273143) == []


async def test_grant_ignores_content_type_and_extra_fields(stack: Stack) -> None:
    app = await stack.new_app()
    status, body, _ = await stack.request(
        "POST",
        "/auth/grant",
        data=b'{"uid": 7, "platform_id": 1, "device_id": "d"}',
        headers={**app.server_auth, "Content-Type": "text/plain"},
    )
    assert status == 200 and TOKEN_RE.match(body["data"]["token"])


@one_mode
@pytest.mark.parametrize(
    "header",
    [
        None,  # missing
        "Bearer abc",  # another scheme
        "Basic",  # no value
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"abc:ffff").decode(),  # non-numeric appid
        "Basic " + base64.b64encode(b"999999999:ffff").decode(),  # unknown appid
    ],
)
async def test_grant_refuses_malformed_credentials(stack: Stack, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    status, body, resp = await stack.request(
        "POST", "/auth/grant", json={"uid": 1}, headers=headers
    )
    assert (status, body) == (400, INVALID_APPID)
    assert resp.content_type == "application/json"


@one_mode
async def test_grant_checks_the_secret(stack: Stack) -> None:
    app = await stack.new_app()
    other = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        for credential in (
            md5_hex("wrong"),
            app.secret,  # the raw secret instead of its MD5
            md5_hex(other.secret),  # another app's secret
        ):
            status, body, _ = await stack.request(
                "POST",
                "/auth/grant",
                json={"uid": 5},
                headers={"Authorization": basic(app.appid, credential)},
            )
            assert (status, body) == (400, INVALID_APPID)
        # Upper-case hex is the same MD5.
        status, _, _ = await stack.request(
            "POST",
            "/auth/grant",
            json={"uid": 5},
            headers={"Authorization": basic(app.appid, md5_hex(app.secret).upper())},
        )
        assert status == 200
        assert [type(e) for e in await events.published()] == [TokenGranted]


@one_mode
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", JSON_DECODE),
        (b"{not json", JSON_DECODE),
        (b"\xff\xfe", JSON_DECODE),
        (b"{}", INVALID_PARAM),
        (b"[1]", INVALID_PARAM),
        (b'{"uid": null}', INVALID_PARAM),
        (b'{"uid": true}', INVALID_PARAM),
        (b'{"uid": 1.5}', INVALID_PARAM),
        (b'{"uid": "12x"}', INVALID_PARAM),
        (b'{"uid": "-3"}', INVALID_PARAM),
        (b'{"uid": 0}', INVALID_PARAM),
        (b'{"uid": -1}', INVALID_PARAM),
        (b'{"uid": 99999999999999999999}', INVALID_PARAM),
        (b'{"uid": 3, "user_name": 5}', INVALID_PARAM),
    ],
)
async def test_grant_refuses_bad_bodies_and_changes_nothing(
    stack: Stack, raw: bytes, expected: dict[str, Any]
) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        status, body, _ = await stack.request(
            "POST", "/auth/grant", data=raw, headers=app.server_auth
        )
        assert (status, body) == (400, expected)
        assert await events.published(0.3) == []
    assert await uids(stack, app.appid) == []


async def test_concurrent_first_grants_return_one_token(stack: Stack) -> None:
    app = await stack.new_app()
    results = await asyncio.gather(*(grant(stack, app, {"uid": 42}) for _ in range(20)))
    assert {status for status, _ in results} == {200}
    tokens = {body["data"]["token"] for _, body in results}
    assert len(tokens) == 1
    doc = await user_doc(stack, app.appid, 42)
    assert doc is not None and doc.token in tokens
    assert await uids(stack, app.appid) == [42]


# ---- S2: user settings --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_each_setting_alone(stack: Stack, method: str) -> None:
    app = await stack.new_app()
    uid = 77
    cases: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
        ({"name": "Bob"}, {"name": "Bob"}, {"name": "Bob"}),
        ({"forbidden": True}, {"forbidden": True}, {"forbidden": True}),
        ({"forbidden": 0}, {"forbidden": False}, {"forbidden": False}),
        ({"mute": True}, {"mute": True, "notification_on": False}, {"mute": True}),
        ({"mute": False}, {"mute": False, "notification_on": True}, {"mute": False}),
        (
            {"do_not_disturb": {"peer_uid": 9, "on": True}},
            {"dnd_peers": {9}},
            {"do_not_disturb": {"peer_uid": 9, "on": True}},
        ),
        (
            {"do_not_disturb": {"peer_uid": "9", "on": 0}},
            {"dnd_peers": set()},
            {"do_not_disturb": {"peer_uid": 9, "on": False}},
        ),
    ]
    async with stack.recorder(app.appid) as events:
        for n, (body, stored, payload) in enumerate(cases, start=1):
            status, text, resp = await stack.request(
                method, f"/users/{uid}", json=body, headers=app.server_auth
            )
            assert (status, text) == (200, ""), body
            assert resp.content_length in (0, None)
            doc = await user_doc(stack, app.appid, uid)
            assert doc is not None
            for key, value in stored.items():
                assert getattr(doc, key) == value, (body, key)
            received = await events.wait_for(n)
            event = received[-1]
            assert isinstance(event, UserSettingsChanged)
            assert event.appid == app.appid and event.uid == uid
            assert event.model_dump(include=set(payload), mode="json") == payload
        assert len(await events.published()) == len(cases)


async def test_settings_apply_every_known_key_in_one_request(stack: Stack) -> None:
    app = await stack.new_app()
    body = {"name": "Carol", "mute": True, "do_not_disturb": {"peer_uid": 3, "on": True}}
    status, _, _ = await stack.request("POST", "/users/5", json=body, headers=app.server_auth)
    assert status == 200
    doc = await user_doc(stack, app.appid, 5)
    assert doc is not None
    assert (doc.name, doc.mute, doc.dnd_peers) == ("Carol", True, frozenset({3}))


async def test_settings_keep_the_token_and_name_from_grant(stack: Stack) -> None:
    app = await stack.new_app()
    _, granted = await grant(stack, app, {"uid": 8, "user_name": "dave"})
    await stack.request("POST", "/users/8", json={"mute": True}, headers=app.server_auth)
    doc = await user_doc(stack, app.appid, 8)
    assert doc is not None
    assert (doc.token, doc.name) == (granted["data"]["token"], "dave")
    _, again = await grant(stack, app, {"uid": 8, "user_name": "dave"})
    assert again == granted


@one_mode
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", JSON_DECODE),
        (b"nope", JSON_DECODE),
        (b"{}", INVALID_PARAM),
        (b'{"unknown": 1}', INVALID_PARAM),
        (b"[]", INVALID_PARAM),
        (b'{"name": 5}', INVALID_PARAM),
        (b'{"forbidden": "yes"}', INVALID_PARAM),
        (b'{"mute": 2}', INVALID_PARAM),
        (b'{"do_not_disturb": {"on": true}}', INVALID_PARAM),
        (b'{"do_not_disturb": {"peer_uid": "x", "on": true}}', INVALID_PARAM),
        (b'{"do_not_disturb": {"peer_uid": 3, "on": "on"}}', INVALID_PARAM),
        (b'{"do_not_disturb": 1}', INVALID_PARAM),
        (b'{"name": "ok", "mute": "bad"}', INVALID_PARAM),  # one bad key refuses them all
    ],
)
async def test_settings_refuse_bad_bodies_and_change_nothing(
    stack: Stack, raw: bytes, expected: dict[str, Any]
) -> None:
    app = await stack.new_app()
    async with stack.recorder(app.appid) as events:
        status, body, _ = await stack.request("POST", "/users/6", data=raw, headers=app.server_auth)
        assert (status, body) == (400, expected)
        assert await events.published(0.3) == []
    assert await user_doc(stack, app.appid, 6) is None


@one_mode
async def test_settings_need_server_credentials(stack: Stack) -> None:
    app = await stack.new_app()
    for headers in ({}, {"Authorization": basic(app.appid, md5_hex("x"))}):
        status, body, _ = await stack.request(
            "POST", "/users/6", json={"name": "x"}, headers=headers
        )
        assert (status, body) == (400, INVALID_APPID)
    assert await user_doc(stack, app.appid, 6) is None


async def test_settings_path_must_be_a_number(stack: Stack) -> None:
    app = await stack.new_app()
    for path in ("/users/abc", "/users/-1", "/users/"):
        status, body, _ = await stack.request(
            "POST", path, json={"name": "x"}, headers=app.server_auth
        )
        assert (status, body) == (404, {"meta": {"code": 404}}), path


# ---- routing ------------------------------------------------------------------------------


async def test_unknown_path_and_wrong_method(stack: Stack) -> None:
    status, body, resp = await stack.request("GET", "/no/such/path")
    assert (status, body) == (404, {"meta": {"code": 404}})
    assert resp.content_type == "application/json"
    status, body, _ = await stack.request("GET", "/auth/grant")
    assert (status, body) == (405, {"meta": {"code": 405}})
    status, body, _ = await stack.request("PUT", "/users/1", json={})
    assert (status, body) == (405, {"meta": {"code": 405}})


async def test_request_id_is_echoed(stack: Stack) -> None:
    _, _, resp = await stack.request("GET", "/no/such", headers={"X-Request-ID": "trace-123"})
    assert resp.headers.get("X-Request-ID") == "trace-123"


# ---- tenancy ------------------------------------------------------------------------------


async def test_apps_cannot_reach_each_others_users(stack: Stack) -> None:
    a, b = await stack.new_app("a"), await stack.new_app("b")
    _, a_grant = await grant(stack, a, {"uid": 100, "user_name": "a-user"})
    async with stack.recorder(a.appid) as a_events:
        # B's credentials act in B's namespace only: same uid, another user, another token.
        _, b_grant = await grant(stack, b, {"uid": 100, "user_name": "b-user"})
        assert b_grant["data"]["token"] != a_grant["data"]["token"]
        status, _, _ = await stack.request(
            "POST", "/users/100", json={"name": "renamed-by-b"}, headers=b.server_auth
        )
        assert status == 200
        # B's key material with A's appid is refused.
        for credential in (md5_hex(b.secret), b.key):
            status, body, _ = await stack.request(
                "POST",
                "/users/100",
                json={"name": "x"},
                headers={"Authorization": basic(a.appid, credential)},
            )
            assert (status, body) == (400, INVALID_APPID)
        assert await a_events.published() == []  # nothing happened in app A
    a_doc = await user_doc(stack, a.appid, 100)
    b_doc = await user_doc(stack, b.appid, 100)
    assert a_doc is not None and b_doc is not None
    assert (a_doc.name, a_doc.token) == ("a-user", a_grant["data"]["token"])
    assert (b_doc.name, b_doc.token) == ("renamed-by-b", b_grant["data"]["token"])
