"""The auth domain: apps, permanent tokens and user settings. No HTTP here.

Every change is one revision of the app's or the user's log (``repository.py``), computed on
the state it follows and carrying its events, which are published right after (or by the
relay, should that fail).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.auth import TokenOwner, Verifier
from shared.bus import Bus
from shared.errors import INVALID_APPID, INVALID_IP, InvalidParam, InvalidToken, ParleyError
from shared.events import AppCreated, DoNotDisturb, Event, TokenGranted, UserSettingsChanged
from shared.internal import TokenIssuer, UidTaken
from shared.limits import check_length
from shared.mongo import Document
from shared.revlog import Compute, Conflict, Versioned

from .repository import AppRecord, AuthRepository

TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 30
APP_CREDENTIAL_LENGTH = 32


def new_token(length: int = TOKEN_LENGTH) -> str:
    """30 characters drawn uniformly from [A-Za-z0-9] with a CSPRNG (spec S1)."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class AuthPolicy(Protocol):
    """The settings the auth domain decides with, each the ``PARLEY_*`` of its name
    (``Settings`` is one)."""

    @property
    def ip_permissions(self) -> dict[int, list[str]]: ...
    @property
    def max_name_length(self) -> int: ...


@dataclass(frozen=True)
class AppCredentials:
    appid: int
    name: str
    key: str
    secret: str


@dataclass(frozen=True)
class SettingsChange:
    """The recognised keys of ``POST /users/{uid}``; None means "not in the request"."""

    name: str | None = None
    forbidden: bool | None = None
    do_not_disturb: DoNotDisturb | None = None
    mute: bool | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in (self.name, self.forbidden, self.do_not_disturb, self.mute))


class AuthDomain:
    def __init__(self, repo: AuthRepository, bus: Bus | None, policy: AuthPolicy) -> None:
        self.repo = repo
        self.bus = bus
        self.policy = policy

    # ---- apps ----

    async def create_app(self, name: str) -> AppCredentials:
        appid = await self.repo.next_appid()
        creds = AppCredentials(
            appid, name, new_token(APP_CREDENTIAL_LENGTH), new_token(APP_CREDENTIAL_LENGTH)
        )
        record = AppRecord(appid=appid, name=name, key=creds.key, secret=creds.secret)
        await self.repo.create_app(record, [AppCreated(appid=appid, name=name)], self.bus)
        return creds

    async def list_apps(self) -> list[AppCredentials]:
        return [
            AppCredentials(a.appid, a.name, a.key, a.secret) for a in await self.repo.list_apps()
        ]

    # ---- credentials ----

    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None:
        app = await self.repo.get_app(appid)
        if app is None or not hmac.compare_digest(
            md5_hex(app.secret).encode(), secret_md5.lower().encode()
        ):
            raise ParleyError(INVALID_APPID)
        allowed = self.policy.ip_permissions.get(appid)
        if allowed and client_ip and client_ip not in allowed:
            raise ParleyError(INVALID_IP)

    async def verify_app_key(self, appid: int, key: str) -> None:
        app = await self.repo.get_app(appid)
        if app is None or not hmac.compare_digest(app.key.lower().encode(), key.lower().encode()):
            raise ParleyError(INVALID_APPID)

    async def resolve_token(self, token: str) -> TokenOwner:
        owner = await self.repo.owner_of(token)
        if owner is None:
            raise InvalidToken()
        return owner

    # ---- users ----

    async def _token_change(
        self, appid: int, uid: int, compute: Compute, minted: str, request_id: str
    ) -> str:
        """Run a change that gives the user a token if it has none, and return the token.

        Concurrent first grants race on the user's first revision: one insert wins and the
        others recompute on the winner's state and return its token. The token resolves once
        the winner records it; a loser that returns it first records it too (idempotent), so
        every token handed out resolves."""
        raced = False

        def tracked(current: Versioned) -> tuple[Document, Sequence[Event]] | None:
            nonlocal raced
            raced = raced or not (current.state or {}).get("token")
            return compute(current)

        user, _ = await self.repo.change_user(appid, uid, tracked, self.bus, request_id)
        assert user is not None
        assert user.token is not None
        if raced and user.token != minted:
            # Another request's token, possibly committed a moment ago: make sure it resolves.
            await self.repo.ensure_token(user.token, appid, uid)
        return user.token

    async def grant(self, appid: int, uid: int, user_name: str, request_id: str = "") -> str:
        """S1: the user's permanent token (created on first grant); ``user_name`` is stored.
        A re-grant that changes nothing writes nothing and publishes nothing; a name longer
        than ``max_name_length`` is 400 ``invalid param``."""
        check_length(user_name, self.policy.max_name_length)
        minted = new_token()

        def compute(current: Versioned) -> tuple[Document, list[Event]] | None:
            state = current.state or {}
            if state.get("customer"):
                raise UidTaken(uid)
            event = TokenGranted(appid=appid, uid=uid, user_name=user_name)
            if not state.get("token"):
                return {"f": {"token": minted, "name": user_name}}, [event]
            if state.get("name") == user_name:
                return None
            return {"f": {"name": user_name}}, [event]

        try:
            return await self._token_change(appid, uid, compute, minted, request_id)
        except UidTaken:
            # The uid is a customer-service visitor's client id: never hand out their token.
            raise InvalidParam() from None
        except Conflict:
            raise ParleyError("user busy, retry", status=503) from None

    async def change_settings(
        self, appid: int, uid: int, change: SettingsChange, request_id: str = ""
    ) -> None:
        """S2: apply every recognised key present, in the spec's order, in one revision; a
        change of nothing, or a name longer than ``max_name_length``, is 400 ``invalid
        param``."""
        check_length(change.name, self.policy.max_name_length)
        if change.is_empty():
            raise InvalidParam()
        fields: dict[str, object] = {}
        if change.name is not None:
            fields["name"] = change.name
        if change.forbidden is not None:
            fields["forbidden"] = change.forbidden
        if change.mute is not None:
            fields["mute"] = change.mute
            # What a delivery server reads: desktop sessions suppress phone pushes unless on.
            fields["notification_on"] = not change.mute
        delta: Document = {"f": fields}
        if change.do_not_disturb is not None:
            delta["dnd"] = {str(change.do_not_disturb.peer_uid): change.do_not_disturb.on}

        def compute(current: Versioned) -> tuple[Document, list[Event]]:
            event = UserSettingsChanged(
                appid=appid,
                uid=uid,
                name=change.name,
                forbidden=change.forbidden,
                do_not_disturb=change.do_not_disturb,
                mute=change.mute,
            )
            return delta, [event]

        try:
            await self.repo.change_user(appid, uid, compute, self.bus, request_id)
        except Conflict:
            raise ParleyError("user busy, retry", status=503) from None

    async def customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None, request_id: str = ""
    ) -> str:
        """The permanent token of a customer-service visitor (for the customer service). A name
        or avatar of None keeps the stored one; a given one replaces it. A uid that is an
        ordinary user is never turned into a customer (``UidTaken``)."""
        minted = new_token()

        def compute(current: Versioned) -> tuple[Document, list[Event]] | None:
            state = current.state
            if state is not None and not state.get("customer"):
                raise UidTaken(uid)
            stored = state or {}
            profile = {
                "name": str(stored.get("name", "")) if name is None else name,
                "avatar": str(stored.get("avatar", "")) if avatar is None else avatar,
            }
            event = TokenGranted(appid=appid, uid=uid, user_name=profile["name"], customer=True)
            if state is None:
                return {"f": {"token": minted, "customer": True, **profile}}, [event]
            if all(state.get(k, "") == v for k, v in profile.items()):
                return None
            return {"f": profile}, [event]

        try:
            return await self._token_change(appid, uid, compute, minted, request_id)
        except Conflict:
            raise ParleyError("user busy, retry", status=503) from None


class LocalTokenIssuer(TokenIssuer):
    """The auth domain as a ``TokenIssuer``, for the customer service in the same process."""

    def __init__(self, domain: AuthDomain) -> None:
        self._domain = domain

    async def customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None
    ) -> str:
        return await self._domain.customer_token(appid, uid, name, avatar)


class LocalVerifier(Verifier):
    """The auth domain as a ``Verifier``, for services in the same process."""

    def __init__(self, domain: AuthDomain) -> None:
        self._domain = domain

    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None:
        await self._domain.verify_server(appid, secret_md5, client_ip)

    async def verify_app_key(self, appid: int, key: str) -> None:
        await self._domain.verify_app_key(appid, key)

    async def resolve_token(self, token: str) -> TokenOwner:
        return await self._domain.resolve_token(token)
