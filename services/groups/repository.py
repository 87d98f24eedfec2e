"""The groups service's collections.

* ``groups_groups``: one document per group, members embedded, so every change (and its
  event, in the embedded outbox) is one atomic single-document write::

      {_id: gid, appid, master, name, notice, super, deleted, revision,
       members: {"<uid>": {ts, nickname, mute, dnd}}, member_uids: [uid, ...]}

  Changes are compare-and-set on ``revision``: read, compute, write with ``revision`` in the
  filter, retry on conflict. A disbanded group is kept with ``deleted: true`` and no members.
* ``groups_users``: the service's view of user names, fed by the auth service's events.
* ``groups_counters``: ``{_id: "gid", seq}`` for group ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pymongo import IndexModel
from pymongo.errors import DuplicateKeyError

from shared.errors import GROUP_NON_EXISTS, ParleyError
from shared.events import Event
from shared.mongo import Collection, Database, Document, next_sequence
from shared.outbox import OUTBOX_INDEX, new_with_outbox, with_outbox

GROUPS = "groups_groups"
USERS = "groups_users"
COUNTERS = "groups_counters"

INDEXES: dict[str, list[IndexModel]] = {
    GROUPS: [
        IndexModel([("appid", 1), ("member_uids", 1)], name="appid_member"),
        OUTBOX_INDEX,
    ],
    USERS: [],
    COUNTERS: [],
}

MAX_ATTEMPTS = 20


class GroupExists(Exception):
    pass


Change = tuple[dict[str, Any], list[Event]]


class GroupsRepository:
    def __init__(self, db: Database) -> None:
        self.groups: Collection = db[GROUPS]
        self.users: Collection = db[USERS]
        self.counters: Collection = db[COUNTERS]

    def outbox_collections(self) -> list[Collection]:
        return [self.groups]

    async def next_gid(self) -> int:
        while True:
            gid = await next_sequence(self.counters, "gid")
            # An external id (EXTERNAL_GROUP_ID) may already hold this number: skip it.
            if await self.groups.count_documents({"_id": gid}, limit=1) == 0:
                return gid

    async def insert(self, group: Document, events: Sequence[Event], rid: str) -> None:
        try:
            await self.groups.insert_one(new_with_outbox(group, events, rid))
        except DuplicateKeyError as exc:
            raise GroupExists(group["_id"]) from exc

    async def get(self, appid: int, gid: int) -> Document | None:
        return await self.groups.find_one(
            {"_id": gid, "appid": appid, "deleted": False}, {"outbox": 0}
        )

    async def list_for(self, appid: int, uid: int) -> list[Document]:
        return (
            await self.groups.find(
                {"appid": appid, "member_uids": uid, "deleted": False}, {"outbox": 0}
            )
            .sort("_id", 1)
            .to_list()
        )

    async def mutate(
        self,
        appid: int,
        gid: int,
        change: Callable[[Document], Change],
        rid: str,
    ) -> tuple[Document, list[Event]]:
        """Apply ``change(group) -> ($set fields, events)`` atomically against the group's
        current revision; 400 ``group non exists`` if it is missing (or another app's)."""
        for _ in range(MAX_ATTEMPTS):
            doc = await self.get(appid, gid)
            if doc is None:
                raise ParleyError(GROUP_NON_EXISTS)
            sets, events = change(doc)
            update = with_outbox({"$set": sets, "$inc": {"revision": 1}}, events, rid)
            written = await self.groups.update_one(
                {"_id": gid, "appid": appid, "deleted": False, "revision": doc["revision"]},
                update,
            )
            if written.matched_count == 1:
                return doc, events
        raise ParleyError("group busy, retry", status=503)

    # ---- the user-name view ----

    async def remember_name(self, appid: int, uid: int, name: str, at: datetime) -> None:
        """Keep the newest name seen for a user (older or repeated events change nothing)."""
        key = f"{appid}:{uid}"
        with contextlib.suppress(DuplicateKeyError):  # the view already holds a newer name
            await self.users.update_one(
                {"_id": key, "$or": [{"at": {"$lt": at}}, {"at": {"$exists": False}}]},
                {"$set": {"appid": appid, "uid": uid, "name": name, "at": at}},
                upsert=True,
            )

    async def names(self, appid: int, uids: Sequence[int]) -> dict[int, str]:
        if not uids:
            return {}
        keys = [f"{appid}:{uid}" for uid in uids]
        return {
            int(doc["uid"]): str(doc.get("name", ""))
            async for doc in self.users.find({"_id": {"$in": keys}})
        }
