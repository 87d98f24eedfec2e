"""The auth domain: apps, permanent tokens and user settings. No HTTP here.

Every write goes through one function that also records its event (in the same document
write, see ``shared/outbox.py``) and then delivers it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

from shared.auth import TokenOwner, Verifier
from shared.bus import Bus
from shared.errors import INVALID_APPID, INVALID_IP, InvalidParam, InvalidToken, ParleyError
from shared.events import AppCreated, DoNotDisturb, TokenGranted, UserSettingsChanged, utcnow
from shared.internal import TokenIssuer, UidTaken
from shared.outbox import deliver
from shared.settings import Settings

from .repository import AuthRepository, user_key

TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 30
APP_CREDENTIAL_LENGTH = 32


def new_token(length: int = TOKEN_LENGTH) -> str:
    """30 characters drawn uniformly from [A-Za-z0-9] with a CSPRNG (spec S1)."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


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
    def __init__(self, repo: AuthRepository, bus: Bus | None, settings: Settings) -> None:
        self.repo = repo
        self.bus = bus
        self.settings = settings

    # ---- apps ----

    async def create_app(self, name: str) -> AppCredentials:
        appid = await self.repo.next_appid()
        creds = AppCredentials(
            appid, name, new_token(APP_CREDENTIAL_LENGTH), new_token(APP_CREDENTIAL_LENGTH)
        )
        event = AppCreated(appid=appid, name=name)
        await self.repo.insert_app(
            {
                "_id": appid,
                "name": name,
                "key": creds.key,
                "secret": creds.secret,
                "store_id": 0,
                "created_at": utcnow(),
            },
            [event],
        )
        await deliver(self.repo.apps, appid, [event], self.bus)
        return creds

    async def list_apps(self) -> list[AppCredentials]:
        return [
            AppCredentials(int(d["_id"]), d.get("name", ""), d["key"], d["secret"])
            for d in await self.repo.list_apps()
        ]

    # ---- credentials ----

    async def verify_server(self, appid: int, secret_md5: str, client_ip: str | None) -> None:
        app = await self.repo.get_app(appid)
        if app is None or not hmac.compare_digest(
            md5_hex(app["secret"]).encode(), secret_md5.lower().encode()
        ):
            raise ParleyError(INVALID_APPID)
        allowed = self.settings.ip_permissions.get(appid)
        if allowed and client_ip and client_ip not in allowed:
            raise ParleyError(INVALID_IP)

    async def verify_app_key(self, appid: int, key: str) -> None:
        app = await self.repo.get_app(appid)
        if app is None or not hmac.compare_digest(
            app["key"].lower().encode(), key.lower().encode()
        ):
            raise ParleyError(INVALID_APPID)

    async def resolve_token(self, token: str) -> TokenOwner:
        doc = await self.repo.find_token(token)
        if doc is None:
            raise InvalidToken()
        return TokenOwner(appid=int(doc["appid"]), uid=int(doc["uid"]))

    # ---- users ----

    async def grant(self, appid: int, uid: int, user_name: str, request_id: str = "") -> str:
        """S1: the user's permanent token (created on first grant); ``user_name`` is stored."""
        event = TokenGranted(appid=appid, uid=uid, user_name=user_name)
        try:
            token = await self.repo.set_token_name(
                appid, uid, new_token(), user_name, [event], request_id
            )
        except UidTaken:
            # The uid is a customer-service visitor's client id: never hand out their token.
            raise InvalidParam() from None
        await deliver(self.repo.users, user_key(appid, uid), [event], self.bus, request_id)
        return token

    async def change_settings(
        self, appid: int, uid: int, change: SettingsChange, request_id: str = ""
    ) -> None:
        """S2: apply every recognised key present, in the spec's order, in one write."""
        sets: dict[str, object] = {}
        unsets: dict[str, str] = {}
        if change.name is not None:
            sets["name"] = change.name
        if change.forbidden is not None:
            sets["forbidden"] = change.forbidden
        if change.do_not_disturb is not None:
            field = f"dnd_peers.{change.do_not_disturb.peer_uid}"
            if change.do_not_disturb.on:
                sets[field] = True
            else:
                unsets[field] = ""
        if change.mute is not None:
            sets["mute"] = change.mute
            # What a delivery server reads: desktop sessions suppress phone pushes unless on.
            sets["notification_on"] = not change.mute
        event = UserSettingsChanged(
            appid=appid,
            uid=uid,
            name=change.name,
            forbidden=change.forbidden,
            do_not_disturb=change.do_not_disturb,
            mute=change.mute,
        )
        update: dict[str, dict[str, object]] = {"$set": sets}
        if unsets:
            update["$unset"] = dict(unsets)
        await self.repo.update_user(appid, uid, update, [event], request_id)
        await deliver(self.repo.users, user_key(appid, uid), [event], self.bus, request_id)

    async def customer_token(
        self, appid: int, uid: int, name: str | None, avatar: str | None, request_id: str = ""
    ) -> str:
        """The permanent token of a customer-service visitor (for the customer service). A name
        or avatar of None keeps the stored one (read just before: a concurrent change of the
        same visitor may be overwritten with the value read)."""
        if name is None or avatar is None:
            stored = await self.repo.get_user(appid, uid) or {}
            if not stored.get("customer"):
                stored = {}
            name = str(stored.get("name", "")) if name is None else name
            avatar = str(stored.get("avatar", "")) if avatar is None else avatar
        event = TokenGranted(appid=appid, uid=uid, user_name=name, customer=True)
        token = await self.repo.customer_token(
            appid, uid, new_token(), {"name": name, "avatar": avatar}, [event], request_id
        )
        await deliver(self.repo.users, user_key(appid, uid), [event], self.bus, request_id)
        return token


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
