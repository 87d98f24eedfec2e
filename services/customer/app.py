"""The customer service: visitor tokens (S17 ``/auth/customer``, X2 ``/customer/register``),
choosing an agent (S18 ``/supporters``), agent presence, and the internal API the messages
service resolves customer ids and store agents with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict

from shared.auth import app_key_auth, client_auth
from shared.errors import REQUIRE_STORE_ID, ParleyError
from shared.http import data, parse_model, path_id, query_id, read_json, required_query_id
from shared.ids import Id, Text, parse_id
from shared.internal import HttpTokenIssuer, TokenIssuer
from shared.jsonio import json_response
from shared.lifecycle import Consumer, ServiceSpec, consumers_ctx, resource_ctx
from shared.logs import request_id_of
from shared.openapi import Operation, Query
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    Deps,
    cors_preflight,
    outbox_ctx,
    service_app,
    service_steps,
)

from .domain import CustomerDomain, LocalCustomerDirectory
from .repository import INDEXES

SERVICE = "customer"
log = structlog.get_logger("parley.customer")
CUSTOMER = web.AppKey("customer_domain", CustomerDomain)
TOKENS = web.AppKey("token_issuer", TokenIssuer)


def domain(request: web.Request) -> CustomerDomain:
    return request.app[CUSTOMER]


def _customer_id(value: Any) -> str | None:
    """A string; integers are accepted and written in decimal (spec S17)."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError("customer_id must be a string")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    appid: Id
    customer_id: Annotated[str | None, BeforeValidator(_customer_id)] = None
    name: Text | None = None
    avatar: Text | None = None


async def _register(
    request: web.Request, authenticated: int | None, *, keep_profile: bool = False
) -> web.Response:
    """X2/S17 (see ``CustomerDomain.do_register``)."""
    body = parse_model(RegisterRequest, await read_json(request))
    registration = await domain(request).do_register(
        body.appid,
        body.customer_id,
        body.name,
        body.avatar,
        authenticated=authenticated,
        keep_profile=keep_profile,
        rid=request_id_of(request),
    )
    return data(
        {
            "token": registration.token,
            "store_id": registration.store_id,
            "client_id": registration.client_id,
        }
    )


async def customer_token(request: web.Request) -> web.Response:
    """S17: no credentials by default; app-key Basic, when sent (or required), is checked. As
    anyone may call it, it never erases a visitor's stored name or avatar."""
    authenticated = None
    if domain(request).needs_app_key("Authorization" in request.headers):
        authenticated = await app_key_auth(request)
    return await _register(request, authenticated, keep_profile=True)


async def customer_register(request: web.Request) -> web.Response:
    """X2: app-key Basic; the body's appid must be the authenticated one."""
    return await _register(request, await app_key_auth(request))


async def supporters(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    raw = request.query.get("store_id") or request.query.get("store") or ""
    try:
        store_id = parse_id(raw) if raw else 0
    except ValueError as exc:
        raise ParleyError(REQUIRE_STORE_ID) from exc
    if store_id == 0:
        raise ParleyError(REQUIRE_STORE_ID)
    chosen = await domain(request).supporter(
        owner.appid, owner.uid, store_id, request_id_of(request)
    )
    return data(
        {"seller_id": chosen.seller_id, "name": chosen.name, "status": chosen.status, "avatar": ""}
    )


# ---- internal API -------------------------------------------------------------------------


class PresenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["online", "offline"]


async def internal_customer(request: web.Request) -> web.Response:
    appid = required_query_id(request, "appid")
    customer_id = request.query.get("customer_id", "")
    client_id = await domain(request).client_id(appid, customer_id) if customer_id else None
    if client_id is None:
        raise web.HTTPNotFound()
    return json_response({"client_id": client_id})


async def internal_store_sellers(request: web.Request) -> web.Response:
    store_id = path_id(request, "store_id")
    appid = required_query_id(request, "appid")
    sellers = await domain(request).store_sellers(appid, store_id)
    if not sellers:
        raise web.HTTPNotFound()
    return json_response({"sellers": sellers})


async def internal_presence(request: web.Request) -> web.Response:
    """An agent's status; with ``?appid=``, only an agent of that app's store is found."""
    seller_id = path_id(request, "seller_id")
    appid = query_id(request, "appid")
    body = parse_model(PresenceRequest, await read_json(request))
    if not await domain(request).set_presence(appid, seller_id, body.status):
        raise web.HTTPNotFound()
    return json_response({"seller_id": seller_id, "status": body.status})


# ---- the API description (for /openapi.json) ------------------------------------------------


class CustomerToken(BaseModel):
    token: str
    store_id: int
    client_id: int


class Supporter(BaseModel):
    seller_id: int
    name: str
    status: str
    avatar: str


STORE_ID = Query("store_id", int, "the store (also accepted as `store`)", required=True)

API: dict[str, Operation] = {
    "customer_token": Operation(
        "A visitor's token (S17); app-key credentials when sent or required.",
        "optional_appkey",
        RegisterRequest,
        CustomerToken,
    ),
    "customer_register": Operation(
        "Register a visitor (X2).", "appkey", RegisterRequest, CustomerToken
    ),
    "supporters": Operation(
        "The agent serving the caller in a store (S18).",
        "bearer",
        data=Supporter,
        query=(STORE_ID,),
    ),
}


HANDLERS = {
    "customer_token": customer_token,
    "customer_register": customer_register,
    "supporters": supporters,
    "cors_preflight": cors_preflight,
    "internal_customer": internal_customer,
    "internal_store_sellers": internal_store_sellers,
    "internal_presence": internal_presence,
}

# Agent presence reported by delivery servers.
CONSUMERS = (
    Consumer(
        "customer.presence",
        ("agent.presence",),
        lambda app: app[CUSTOMER].on_presence_event,
        timeout=30.0,
    ),
)


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        customer = CustomerDomain(app[DB], app[BUS], settings, app[TOKENS])
        migrated = await customer.repo.migrate()
        if migrated:
            log.info("customer data rewritten as logs from the previous shape", **migrated)
        app[CUSTOMER] = customer
        if deps.customers is None:
            deps.customers = LocalCustomerDirectory(customer)
        yield

    app.cleanup_ctx.extend(
        service_steps(
            deps,
            SERVICE,
            INDEXES,
            resource_ctx(
                TOKENS,
                lambda settings: HttpTokenIssuer(settings.auth_url, settings.internal_secret),
                lambda: deps.tokens,
            ),
            domain_ctx,
            consumers_ctx(*CONSUMERS),
            outbox_ctx(lambda app: app[CUSTOMER].repo.revlogs()),
        )
    )
    return app


SPEC = ServiceSpec(
    SERVICE,
    create_app,
    provides=frozenset({"customers"}),
    needs=frozenset({"verifier", "tokens"}),
)
