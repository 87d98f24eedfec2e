"""The auth service: apps, permanent tokens (S1), user settings (S2), and the internal
credential-verification API that every other service calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict

from shared.auth import VERIFIER, CachingVerifier, server_auth
from shared.errors import ParleyError
from shared.events import DoNotDisturb
from shared.http import data, empty_ok, parse_model, path_id, read_json, read_model
from shared.ids import Flag, Id, Text
from shared.internal import UidTaken
from shared.jsonio import json_response
from shared.logs import request_id_of
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    SETTINGS,
    Deps,
    bus_ctx,
    database_ctx,
    outbox_ctx,
    require_internal,
    service_app,
)

from .domain import AuthDomain, LocalTokenIssuer, LocalVerifier, SettingsChange
from .repository import INDEXES, AuthRepository

SERVICE = "auth"
log = structlog.get_logger("parley.auth")
AUTH = web.AppKey("auth_domain", AuthDomain)


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("uid must be positive")
    return value


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    uid: Annotated[Id, AfterValidator(_positive)]
    user_name: Text = ""  # a grant without it stores "" (spec S1)


class DoNotDisturbRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    peer_uid: Id
    on: Flag


class SettingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text | None = None
    forbidden: Flag | None = None
    do_not_disturb: DoNotDisturbRequest | None = None
    mute: Flag | None = None


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: Literal["server", "appkey", "bearer"]
    appid: int | None = None
    secret: str | None = None
    ip: str | None = None
    token: str | None = None


def domain(request: web.Request) -> AuthDomain:
    return request.app[AUTH]


async def grant(request: web.Request) -> web.Response:
    appid = await server_auth(request)
    body = await read_model(request, GrantRequest)
    token = await domain(request).grant(appid, body.uid, body.user_name, request_id_of(request))
    return data({"token": token})


async def user_settings(request: web.Request) -> web.Response:
    uid = path_id(request, "uid")
    appid = await server_auth(request)
    body = await read_model(request, SettingsRequest)
    dnd = body.do_not_disturb
    change = SettingsChange(
        name=body.name,
        forbidden=body.forbidden,
        do_not_disturb=DoNotDisturb(peer_uid=dnd.peer_uid, on=dnd.on) if dnd else None,
        mute=body.mute,
    )
    if change.is_empty():
        raise ParleyError("invalid param")
    await domain(request).change_settings(appid, uid, change, request_id_of(request))
    return empty_ok()


async def internal_verify(request: web.Request) -> web.Response:
    """Internal API (not routed by the edge): verify credentials for another service."""
    require_internal(request)
    body = parse_model(VerifyRequest, await read_json(request))
    verifier = request.app[VERIFIER]
    answer: dict[str, Any]
    if body.scheme == "bearer":
        owner = await verifier.resolve_token(body.token or "")
        answer = {"appid": owner.appid, "uid": owner.uid}
    elif body.appid is None or body.secret is None:
        raise ParleyError("invalid param")
    elif body.scheme == "server":
        await verifier.verify_server(body.appid, body.secret, body.ip)
        answer = {"appid": body.appid}
    else:
        await verifier.verify_app_key(body.appid, body.secret)
        answer = {"appid": body.appid}
    return json_response(answer)


class CustomerTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appid: int
    uid: int
    name: str = ""
    avatar: str = ""


async def internal_customer_token(request: web.Request) -> web.Response:
    """Internal API for the customer service: a visitor's token (409: the uid is a user's)."""
    require_internal(request)
    body = parse_model(CustomerTokenRequest, await read_json(request))
    try:
        token = await domain(request).customer_token(
            body.appid, body.uid, body.name, body.avatar, request_id_of(request)
        )
    except UidTaken:
        return json_response({"meta": {"code": 409, "message": "uid taken"}}, status=409)
    return json_response({"token": token})


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, {"grant": grant, "user_settings": user_settings})
    app.router.add_post("/internal/verify", internal_verify)
    app.router.add_post("/internal/customer-token", internal_customer_token)

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        repo = AuthRepository(app[DB])
        migrated = await repo.migrate()
        if migrated:
            log.info("apps and users rewritten as logs from the previous shape", **migrated)
        auth = AuthDomain(repo, app[BUS], app[SETTINGS])
        app[AUTH] = auth
        local = LocalVerifier(auth)
        app[VERIFIER] = CachingVerifier(local, app[SETTINGS].auth_cache_ttl)
        if deps.verifier is None:
            deps.verifier = local  # services later in this process verify in-process
        if deps.tokens is None:
            deps.tokens = LocalTokenIssuer(auth)
        yield

    app.cleanup_ctx.extend(
        [
            database_ctx(deps, INDEXES),
            bus_ctx(deps, SERVICE),
            domain_ctx,
            outbox_ctx(lambda db: (), lambda app: app[AUTH].repo.revlogs()),
        ]
    )
    return app
