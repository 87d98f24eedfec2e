"""Service-to-service reads that must be current, not eventually consistent.

Events tell services what changed; a few checks need the owner's truth *now*: the messages
service asks the groups service for a group's members when a group message arrives (so a
member added by a 200 gets the very next message), and the customer service asks the auth
service to issue customer tokens. Each need is an interface here with an HTTP implementation
(the owner's internal API, never routed by the edge); a service in the same process provides
an in-process implementation instead (see ``Deps``).
"""

from __future__ import annotations

import abc
from typing import Any

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict

from shared.errors import ParleyError

log = structlog.get_logger("parley.internal")

INTERNAL_SECRET_HEADER = "X-Parley-Internal"


class InternalClient:
    """JSON over HTTP to another service's ``/internal/...`` API."""

    def __init__(self, base_url: str, *, secret: str = "", timeout: float = 5.0) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {INTERNAL_SECRET_HEADER: secret} if secret else {}
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=256),
        )

    async def call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, body). 200 and 404 come back as they are; a 400 or 429 with the envelope
        raises that ``ParleyError``; anything else is 503 ``... unavailable``."""
        try:
            async with self._session.request(
                method, self._base + path, json=json, params=params, headers=self._headers
            ) as resp:
                body = await resp.json(content_type=None) if resp.content_length != 0 else None
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.error("internal API unreachable", url=self._base + path, error=repr(exc))
            raise ParleyError("service unavailable", status=503) from exc
        if status in (200, 404, 409):
            return status, body
        if status in (400, 429) and isinstance(body, dict) and isinstance(body.get("meta"), dict):
            raise ParleyError(str(body["meta"].get("message", "")), status, **_extra(body))
        log.error("internal API answered unexpectedly", url=self._base + path, status=status)
        raise ParleyError("service unavailable", status=503)

    async def close(self) -> None:
        await self._session.close()


def _extra(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "meta"}


class OverInternalApi:
    """The base of an interface answered by another service's internal API at ``base_url``:
    one client, closed with it."""

    def __init__(self, base_url: str, secret: str = "") -> None:
        self._client = InternalClient(base_url, secret=secret)

    async def close(self) -> None:
        await self._client.close()


# ---- groups --------------------------------------------------------------------------------


class GroupSnapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    gid: int
    appid: int
    name: str
    super: bool
    members: list[int]
    muted: list[int]
    revision: int


class GroupDirectory(abc.ABC):
    @abc.abstractmethod
    async def get_group(
        self, appid: int, gid: int, revision: int | None = None
    ) -> GroupSnapshot | None:
        """The live group ``gid`` of app ``appid`` as it is now (or as of ``revision``), or
        None."""

    async def close(self) -> None:
        return None


class HttpGroupDirectory(OverInternalApi, GroupDirectory):
    async def get_group(
        self, appid: int, gid: int, revision: int | None = None
    ) -> GroupSnapshot | None:
        params = {"appid": str(appid)}
        if revision is not None:
            params["revision"] = str(revision)
        status, body = await self._client.call("GET", f"/internal/groups/{gid}", params=params)
        return GroupSnapshot.model_validate(body) if status == 200 else None


# ---- customers -----------------------------------------------------------------------------


class CustomerDirectory(abc.ABC):
    @abc.abstractmethod
    async def client_id(self, appid: int, customer_id: str) -> int | None:
        """The IM uid (client_id) of a host app's customer, or None if never registered."""

    @abc.abstractmethod
    async def store_sellers(self, appid: int, store_id: int) -> list[int]:
        """The seller (agent) ids of a store of app ``appid``; [] for another app's store."""

    async def close(self) -> None:
        return None


class HttpCustomerDirectory(OverInternalApi, CustomerDirectory):
    async def client_id(self, appid: int, customer_id: str) -> int | None:
        status, body = await self._client.call(
            "GET", "/internal/customers", params={"appid": str(appid), "customer_id": customer_id}
        )
        return int(body["client_id"]) if status == 200 else None

    async def store_sellers(self, appid: int, store_id: int) -> list[int]:
        status, body = await self._client.call(
            "GET", f"/internal/stores/{store_id}/sellers", params={"appid": str(appid)}
        )
        return [int(s) for s in body["sellers"]] if status == 200 else []


# ---- tokens --------------------------------------------------------------------------------


class UidTaken(Exception):
    """The uid belongs to a user who is not a customer: customers never share a uid."""


class TokenIssuer(abc.ABC):
    @abc.abstractmethod
    async def customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None
    ) -> str:
        """The permanent token of customer ``uid`` (created on first use); stores name and
        avatar (None: keep the stored one). Raises ``UidTaken`` if ``uid`` is an ordinary user
        of the app."""

    async def close(self) -> None:
        return None


class HttpTokenIssuer(OverInternalApi, TokenIssuer):
    async def customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None
    ) -> str:
        status, body = await self._client.call(
            "POST",
            "/internal/customer-token",
            json={"appid": appid, "uid": uid, "name": name, "avatar": avatar},
        )
        if status == 409:
            raise UidTaken(uid)
        if status != 200:
            raise ParleyError("service unavailable", status=503)
        return str(body["token"])
