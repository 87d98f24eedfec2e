"""Credentials: parsing the four schemes of spec §1.2 and verifying them through the auth service.

* A, server Basic: ``Basic base64(appid ":" md5hex(secret))``, plus the per-app IP allow-list.
* B, app-key Basic: ``Basic base64(appid ":" appkey)``.
* C, client Bearer: ``Bearer <token>``.
* D, A or C (``/messages/offline`` only; no IP check).

Parsing lives here, once. Verification is the auth service's: in the same process through its
domain code (``LocalVerifier`` in ``services/auth``), elsewhere through its internal HTTP API
(``HttpVerifier``). Both sit behind ``CachingVerifier``: tokens never change and apps are
never deleted, so a short cache is safe and spares the auth service a call per request.
"""

from __future__ import annotations

import abc
import base64
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from shared.errors import (
    INVALID_APPID,
    INVALID_AUTHORIZATION,
    InvalidToken,
    ParleyError,
)
from shared.ids import parse_id
from shared.internal import InternalClient

log = structlog.get_logger("parley.auth")


@dataclass(frozen=True)
class BasicCredentials:
    appid: int
    secret: str  # the md5 hex of the app secret (scheme A) or the raw app key (scheme B)


@dataclass(frozen=True)
class TokenOwner:
    appid: int
    uid: int


def parse_basic(header: str | None) -> BasicCredentials:
    """Scheme A/B header -> (appid, credential); 400 ``非法的appid`` on anything malformed
    (non-ASCII or bad base64 included)."""
    if not header:
        raise ParleyError(INVALID_APPID)
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        raise ParleyError(INVALID_APPID)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError as exc:  # binascii.Error, non-ASCII input and UnicodeDecodeError
        raise ParleyError(INVALID_APPID) from exc
    appid_text, sep, secret = decoded.partition(":")
    if not sep:
        raise ParleyError(INVALID_APPID)
    try:
        appid = parse_id(appid_text)
    except ValueError as exc:
        raise ParleyError(INVALID_APPID) from exc
    return BasicCredentials(appid, secret)


def parse_bearer(header: str | None) -> str:
    """Scheme C header -> token; the Bearer failure body otherwise. Tokens are printable
    ASCII: anything else (a header byte that is not ASCII included) cannot be one."""
    if not header:
        raise InvalidToken()
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise InvalidToken()
    if not (token.isascii() and token.isprintable()):
        raise InvalidToken()
    return token


class Verifier(abc.ABC):
    """What the auth service answers about credentials. Each method raises the spec's
    ``ParleyError`` (``非法的appid``, ``非法的ip``, ``非法的access token``) on refusal."""

    @abc.abstractmethod
    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None: ...

    @abc.abstractmethod
    async def verify_app_key(self, appid: int, key: str) -> None: ...

    @abc.abstractmethod
    async def resolve_token(self, token: str) -> TokenOwner: ...

    async def close(self) -> None:
        return None


class CachingVerifier(Verifier):
    """Remembers answers for ``ttl`` seconds (refusals for at most one second)."""

    MAX_ENTRIES = 100_000

    def __init__(self, inner: Verifier, ttl: float) -> None:
        self._inner = inner
        self._ttl = ttl
        self._entries: dict[tuple[Any, ...], tuple[float, Any]] = {}

    async def _cached(self, key: tuple[Any, ...], call: Any) -> Any:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], ParleyError):
                raise hit[1]
            return hit[1]
        try:
            value = await call()
        except ParleyError as exc:
            self._store(key, now + min(self._ttl, 1.0), exc)
            raise
        self._store(key, now + self._ttl, value)
        return value

    def _store(self, key: tuple[Any, ...], expires: float, value: Any) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (expires, value)

    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None:
        await self._cached(
            ("A", appid, secret_md5.lower(), client_ip),
            lambda: self._inner.verify_server(appid, secret_md5, client_ip),
        )

    async def verify_app_key(self, appid: int, key: str) -> None:
        await self._cached(
            ("B", appid, key.lower()), lambda: self._inner.verify_app_key(appid, key)
        )

    async def resolve_token(self, token: str) -> TokenOwner:
        owner: TokenOwner = await self._cached(
            ("C", token), lambda: self._inner.resolve_token(token)
        )
        return owner

    async def close(self) -> None:
        await self._inner.close()


VERIFY_PATH = "/internal/verify"


class HttpVerifier(Verifier):
    """Asks the auth service's internal API: ``POST /internal/verify``."""

    def __init__(self, base_url: str, *, internal_secret: str = "") -> None:
        self._client = InternalClient(base_url, secret=internal_secret)

    async def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        status, body = await self._client.call("POST", VERIFY_PATH, json=payload)
        if status != 200 or not isinstance(body, dict):
            raise ParleyError("auth service unavailable", status=503)
        return body

    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None:
        await self._ask({"scheme": "server", "appid": appid, "secret": secret_md5, "ip": client_ip})

    async def verify_app_key(self, appid: int, key: str) -> None:
        await self._ask({"scheme": "appkey", "appid": appid, "secret": key})

    async def resolve_token(self, token: str) -> TokenOwner:
        try:
            body = await self._ask({"scheme": "bearer", "token": token})
        except ParleyError as exc:
            if exc.status == 400:
                raise InvalidToken() from exc
            raise
        return TokenOwner(appid=int(body["appid"]), uid=int(body["uid"]))

    async def close(self) -> None:
        await self._client.close()


# ---- request helpers (what handlers call) ---------------------------------------------------

VERIFIER = web.AppKey("verifier", Verifier)
CLIENT_IP_HEADER = web.AppKey("client_ip_header", str)
TRUSTED_PROXIES = web.AppKey(
    "trusted_proxies", Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
)


def _verifier(request: web.Request) -> Verifier:
    return request.config_dict[VERIFIER]


NOT_AN_ADDRESS = "(not an address)"


def client_ip(request: web.Request) -> str | None:
    """The caller's address for the IP allow-list: the client-IP header (``X-Real-IP``) when
    the connection comes from a trusted proxy (``PARLEY_TRUSTED_PROXIES``), else the
    connection's peer address. A header value that is not an address matches no allow-list
    (so an app with one answers 400 ``非法的ip``; the others do not check)."""
    peer = request.remote
    trusted = request.config_dict.get(TRUSTED_PROXIES, ())
    if not peer or not trusted:
        return peer
    try:
        peer_address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(peer_address in network for network in trusted):
        return peer
    forwarded = request.headers.get(request.config_dict[CLIENT_IP_HEADER])
    if forwarded is None:
        return peer
    try:
        return str(ipaddress.ip_address(forwarded.strip()))
    except ValueError:
        return NOT_AN_ADDRESS


async def server_auth(request: web.Request) -> int:
    """Scheme A; returns the appid."""
    creds = parse_basic(request.headers.get("Authorization"))
    await _verifier(request).verify_server(creds.appid, creds.secret, client_ip(request))
    structlog.contextvars.bind_contextvars(appid=creds.appid)
    return creds.appid


async def app_key_auth(request: web.Request) -> int:
    """Scheme B; returns the appid."""
    creds = parse_basic(request.headers.get("Authorization"))
    await _verifier(request).verify_app_key(creds.appid, creds.secret)
    structlog.contextvars.bind_contextvars(appid=creds.appid)
    return creds.appid


async def client_auth(request: web.Request) -> TokenOwner:
    """Scheme C; returns the token's (appid, uid)."""
    token = parse_bearer(request.headers.get("Authorization"))
    owner = await _verifier(request).resolve_token(token)
    structlog.contextvars.bind_contextvars(appid=owner.appid, uid=owner.uid)
    return owner


async def server_or_client_auth(request: web.Request) -> tuple[int, TokenOwner | None]:
    """Scheme D: Basic (without the IP check) or Bearer; returns (appid, token owner or None)."""
    header = request.headers.get("Authorization", "").strip()
    scheme = header.partition(" ")[0].lower()
    if scheme == "basic":
        creds = parse_basic(header)
        await _verifier(request).verify_server(creds.appid, creds.secret, None)
        structlog.contextvars.bind_contextvars(appid=creds.appid)
        return creds.appid, None
    if scheme == "bearer":
        owner = await client_auth(request)
        return owner.appid, owner
    raise ParleyError(INVALID_AUTHORIZATION)
