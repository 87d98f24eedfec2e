"""The auth service: apps, permanent tokens (S1), user settings (S2), and the internal
credential-verification API that every other service calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from shared.auth import VERIFIER, CachingVerifier, server_auth
from shared.errors import ParleyError
from shared.events import DoNotDisturb
from shared.http import data, empty_ok, parse_model, path_id, read_json, read_model
from shared.ids import Flag, Id, Text
from shared.internal import UidTaken
from shared.jsonio import json_response
from shared.lifecycle import ServiceSpec
from shared.logs import request_id_of
from shared.openapi import Operation
from shared.ratelimit import TokenBuckets
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    SETTINGS,
    Deps,
    outbox_ctx,
    service_app,
    service_steps,
)

from .domain import AuthDomain, LocalTokenIssuer, LocalVerifier, SettingsChange
from .repository import INDEXES, AuthRepository

SERVICE = "auth"
log = structlog.get_logger("parley.auth")
AUTH = web.AppKey("auth_domain", AuthDomain)
# Refused app-secret checks on /internal/verify, per caller address.
VERIFY_REFUSALS = web.AppKey("verify_refusals", TokenBuckets)
TOO_MANY_REFUSALS = "too many refusals"


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    uid: Id
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

    def change(self) -> SettingsChange:
        dnd = self.do_not_disturb
        return SettingsChange(
            name=self.name,
            forbidden=self.forbidden,
            do_not_disturb=DoNotDisturb(peer_uid=dnd.peer_uid, on=dnd.on) if dnd else None,
            mute=self.mute,
        )


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: Literal["server", "appkey", "bearer"]
    appid: int | None = None
    secret: str | None = None
    ip: str | None = None
    token: str | None = None


class TokenData(BaseModel):
    token: str


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
    await domain(request).change_settings(appid, uid, body.change(), request_id_of(request))
    return empty_ok()


async def internal_verify(request: web.Request) -> web.Response:
    """Internal API (not routed by the edge): verify credentials for another service."""
    body = parse_model(VerifyRequest, await read_json(request))
    verifier = request.app[VERIFIER]
    if body.scheme == "bearer":
        owner = await verifier.resolve_token(body.token or "")
        return json_response({"appid": owner.appid, "uid": owner.uid})
    if body.appid is None or body.secret is None:
        raise ParleyError("invalid param")
    # App secrets are checked at a bounded rate of refusals per caller: once a caller's
    # bucket is empty, it gets 429 without a check until the bucket refills.
    refusals, caller = request.app[VERIFY_REFUSALS], request.remote
    if not refusals.allows(caller):
        raise ParleyError(TOO_MANY_REFUSALS, status=429)
    try:
        if body.scheme == "server":
            await verifier.verify_server(body.appid, body.secret, body.ip)
        else:
            await verifier.verify_app_key(body.appid, body.secret)
    except ParleyError:
        refusals.spend(caller)
        raise
    return json_response({"appid": body.appid})


class CustomerTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appid: int
    uid: int
    name: str | None = None  # None: keep the stored one
    avatar: str | None = None


async def internal_customer_token(request: web.Request) -> web.Response:
    """Internal API for the customer service: a visitor's token (409: the uid is a user's)."""
    body = parse_model(CustomerTokenRequest, await read_json(request))
    try:
        token = await domain(request).customer_token(
            body.appid, body.uid, body.name, body.avatar, request_id_of(request)
        )
    except UidTaken:
        return json_response({"meta": {"code": 409, "message": "uid taken"}}, status=409)
    return json_response({"token": token})


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the public API, from the routing table and every service's
    ``API`` (the auth service serves it for the edge)."""
    from services.openapi import document  # every service's models: imported on first use

    return json_response(document())


API: dict[str, Operation] = {
    "grant": Operation(
        "Grant a user's permanent token (S1); the same token on every later grant.",
        "server",
        request=GrantRequest,
        data=TokenData,
    ),
    "user_settings": Operation(
        "Change a user's settings (S2, X1); 200 with an empty body.",
        "server",
        request=SettingsRequest,
        answer="empty",
    ),
    "openapi": Operation("This document (OpenAPI 3.1).", "none", answer="document"),
}


HANDLERS = {
    "grant": grant,
    "user_settings": user_settings,
    "openapi": openapi,
    "internal_verify": internal_verify,
    "internal_customer_token": internal_customer_token,
}


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)
    app[VERIFY_REFUSALS] = TokenBuckets(settings.verify_refusal_burst, settings.verify_refusal_rate)

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
            deps.verifier = local  # the other services of this process verify in-process
        if deps.tokens is None:
            deps.tokens = LocalTokenIssuer(auth)
        yield

    app.cleanup_ctx.extend(
        service_steps(
            deps,
            SERVICE,
            INDEXES,
            domain_ctx,
            outbox_ctx(lambda app: app[AUTH].repo.revlogs()),
            verify=False,
        )
    )
    return app


SPEC = ServiceSpec(SERVICE, create_app, provides=frozenset({"verifier", "tokens"}))
