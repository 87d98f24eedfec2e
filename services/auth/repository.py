"""The auth service's collections: apps, users (token and settings), and its counters.

* ``auth_apps``: ``{_id: appid, name, key, secret, store_id, created_at}``
* ``auth_users``: ``{_id: "<appid>:<uid>", appid, uid, token?, name, forbidden, mute,
  notification_on, dnd_peers: {"<peer_uid>": true}}``; one document per (appid, uid), so the
  token is unique per user by construction, and every change is one atomic update.
* ``auth_counters``: ``{_id: "appid", seq}`` for appids.

Both document kinds carry the embedded outbox (``shared/outbox.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import IndexModel, ReturnDocument
from pymongo.errors import DuplicateKeyError

from shared.events import Event
from shared.internal import UidTaken
from shared.mongo import Collection, Database, Document, next_sequence
from shared.outbox import OUTBOX_INDEX, new_with_outbox, with_outbox

APPS = "auth_apps"
USERS = "auth_users"
COUNTERS = "auth_counters"

INDEXES: dict[str, list[IndexModel]] = {
    APPS: [OUTBOX_INDEX],
    USERS: [
        IndexModel([("appid", 1), ("uid", 1)], unique=True, name="appid_uid"),
        IndexModel([("token", 1)], name="token"),
        OUTBOX_INDEX,
    ],
    COUNTERS: [],
}


def user_key(appid: int, uid: int) -> str:
    return f"{appid}:{uid}"


class AuthRepository:
    def __init__(self, db: Database) -> None:
        self.apps: Collection = db[APPS]
        self.users: Collection = db[USERS]
        self.counters: Collection = db[COUNTERS]

    def outbox_collections(self) -> list[Collection]:
        return [self.apps, self.users]

    # ---- apps ----

    async def next_appid(self) -> int:
        return await next_sequence(self.counters, "appid")

    async def insert_app(self, app: Document, events: Sequence[Event]) -> None:
        update = with_outbox({"$set": app}, events)
        await self.apps.update_one({"_id": app["_id"]}, update, upsert=True)

    async def get_app(self, appid: int) -> Document | None:
        return await self.apps.find_one({"_id": appid}, {"outbox": 0})

    async def list_apps(self) -> list[Document]:
        return await self.apps.find({}, {"outbox": 0}).sort("_id", 1).to_list()

    # ---- users ----

    async def set_token_name(
        self, appid: int, uid: int, new_token: str, name: str, events: Sequence[Event], rid: str
    ) -> str:
        """The user's token, minting ``new_token`` if it has none; sets the name. One write.

        Concurrent first grants race on the document's ``_id``: exactly one insert wins and the
        others, refused with a duplicate key, read the winner's token (spec §2.2, Parley)."""
        key = user_key(appid, uid)
        existing = {"$set": {"name": name}}
        for _ in range(5):
            doc = await self.users.find_one_and_update(
                {"_id": key, "token": {"$exists": True}, "customer": {"$ne": True}},
                with_outbox(existing, events, rid),
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return str(doc["token"])
            try:
                await self.users.update_one(
                    {"_id": key, "token": {"$exists": False}},
                    with_outbox(
                        {"$set": {"appid": appid, "uid": uid, "token": new_token, "name": name}},
                        events,
                        rid,
                    ),
                    upsert=True,
                )
                return new_token
            except DuplicateKeyError:
                pass  # someone else created it first: read theirs
            current = await self.users.find_one({"_id": key}, {"customer": 1})
            if current is not None and current.get("customer"):
                raise UidTaken(uid)
        raise RuntimeError("token creation did not settle")

    async def customer_token(
        self,
        appid: int,
        uid: int,
        new_token: str,
        profile: dict[str, str],
        events: Sequence[Event],
        rid: str,
    ) -> str:
        """A customer's token, minted on first use; ``profile`` (name, avatar) is replaced.
        A uid that is an ordinary user is never turned into a customer (``UidTaken``)."""
        key = user_key(appid, uid)
        for _ in range(5):
            doc = await self.users.find_one_and_update(
                {"_id": key, "customer": True},
                with_outbox({"$set": dict(profile)}, events, rid),
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return str(doc["token"])
            try:
                await self.users.insert_one(
                    new_with_outbox(
                        {
                            "_id": key,
                            "appid": appid,
                            "uid": uid,
                            "token": new_token,
                            "customer": True,
                            **profile,
                        },
                        events,
                        rid,
                    )
                )
                return new_token
            except DuplicateKeyError:
                current = await self.users.find_one({"_id": key}, {"customer": 1})
                if current is not None and not current.get("customer"):
                    raise UidTaken(uid) from None
        raise RuntimeError("customer token creation did not settle")

    async def update_user(
        self, appid: int, uid: int, update: dict[str, Any], events: Sequence[Event], rid: str
    ) -> None:
        """Apply ``update`` to the user, creating the user document if needed (one write)."""
        key = user_key(appid, uid)
        merged = with_outbox(update, events, rid)
        merged["$set"].update({"appid": appid, "uid": uid})
        for _ in range(2):
            try:
                await self.users.update_one({"_id": key}, merged, upsert=True)
                return
            except DuplicateKeyError:
                continue  # a concurrent first write created it: now it is a plain update
        raise RuntimeError("user update did not settle")

    async def get_user(self, appid: int, uid: int) -> Document | None:
        return await self.users.find_one({"_id": user_key(appid, uid)}, {"outbox": 0})

    async def find_token(self, token: str) -> Document | None:
        return await self.users.find_one({"token": token}, {"appid": 1, "uid": 1})
