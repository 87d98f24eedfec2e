"""The groups service's storage: every change is one insert (``shared/revlog.py``).

* ``groups_log_revs|heads|pending``: each group is the log of its revisions, keyed
  ``"<appid>:<gid>"`` (so another app's gid is simply not there). A delta is one of::

      {op: "create", s: <state>}              {op: "set", f: {name?, notice?, super?}}
      {op: "add", m: {"<uid>": ts}}           {op: "remove", u: [uid, ...]}
      {op: "member", uid, f: {nickname?, mute?, dnd?}}
      {op: "disband", u: [the members just before]}

  and the state is ``{appid, gid, master, name, notice, super, deleted, m: {"<uid>": [ts,
  nickname, mute, dnd]}}``. A change of n members writes O(n) bytes; the head snapshot (the
  whole state, ~40 bytes a member) is rewritten every 16 revisions.
* ``groups_mine_revs|heads``: each user's groups, keyed ``"<appid>:<uid>"``: deltas
  ``{add: [gid...], remove: [gid...]}`` written after a group revision commits (and again by
  the relay if the process stopped in between: set operations, so a replay changes nothing).
* ``groups_users``: the service's view of user names, fed by the auth service's events.
* ``groups_counters``: group-id blocks claimed by insert (``shared/idblocks.py``).

Every read and write is a lookup or an insert by a string ``_id``: nothing reads a collection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime

from pymongo import IndexModel
from pymongo.errors import DuplicateKeyError

from shared.events import utcnow
from shared.idblocks import IdBlocks
from shared.mongo import Collection, Database, Document, by_ids
from shared.revlog import Revision, RevLog, Versioned

from .model import Group, Member

LOG = "groups_log"
MINE = "groups_mine"
USERS = "groups_users"
# Group-id blocks; its ``{_id: "gid", seq}`` document is the previous ``$inc`` counter.
IDS = "groups_counters"
# Groups of the previous shape (one document per group), read once by ``migrate``.
LEGACY_GROUPS = "groups_groups"

INDEXES: dict[str, list[IndexModel]] = {}

GID_BLOCK = 16
GROUP_CACHE_SIZE = 10_000
MIGRATED = "migrated:groups_groups"


def group_key(appid: int, gid: int) -> str:
    return f"{appid}:{gid}"


def fold_group(state: Document | None, delta: Document) -> Document | None:
    """The group's state after ``delta`` (a pure function; ``state`` is never modified)."""
    op = delta["op"]
    if op == "create":
        return dict(delta["s"])
    if state is None:
        return None
    if op == "disband":
        return {**state, "deleted": True, "m": {}}
    if op == "set":
        return {**state, **delta["f"]}
    members = dict(state["m"])
    if op == "add":
        for uid, ts in delta["m"].items():
            members.setdefault(uid, [ts, None, False, False])
    elif op == "remove":
        for uid in delta["u"]:
            members.pop(str(uid), None)
    elif op == "member":
        entry = members.get(str(delta["uid"]))
        if entry is not None:
            ts, nickname, mute, dnd = entry
            fields = delta["f"]
            members[str(delta["uid"])] = [
                ts,
                fields.get("nickname", nickname),
                fields.get("mute", mute),
                fields.get("dnd", dnd),
            ]
    else:
        raise ValueError(f"unknown group delta {op!r}")
    return {**state, "m": members}


def fold_mine(state: Document | None, delta: Document) -> Document:
    gids = set(state["g"]) if state else set()
    gids |= set(delta.get("add", ()))
    gids -= set(delta.get("remove", ()))
    return {"g": sorted(gids)}


def to_group(versioned: Versioned) -> Group | None:
    state = versioned.state
    if state is None or state.get("deleted"):
        return None
    return Group(
        appid=state["appid"],
        gid=state["gid"],
        master=state["master"],
        name=state["name"],
        notice=state.get("notice", ""),
        super=state["super"],
        revision=versioned.rev,
        members={
            int(uid): Member(uid=int(uid), ts=e[0], nickname=e[1], mute=e[2], dnd=e[3])
            for uid, e in state["m"].items()
        },
    )


def membership_changes(delta: Document) -> tuple[list[int], list[int]]:
    """(uids that joined, uids that left) by a group delta."""
    op = delta["op"]
    if op == "create":
        return [int(uid) for uid in delta["s"]["m"]], []
    if op == "add":
        return [int(uid) for uid in delta["m"]], []
    if op in ("remove", "disband"):
        return [], [int(uid) for uid in delta["u"]]
    return [], []


class GroupsRepository:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.log = RevLog(db, LOG, fold_group, after_commit=self._index_members)
        self.mine = RevLog(db, MINE, fold_mine, snapshot_every=4)
        self.users: Collection = db[USERS]
        self.gids = IdBlocks(db[IDS], "gid", size=GID_BLOCK)
        # Typed groups by key, as of a revision: a big group is converted once per revision.
        self._groups: dict[str, Group] = {}

    # ---- groups ----

    async def next_gid(self) -> int:
        return await self.gids.next_id()

    async def read(self, appid: int, gid: int) -> Versioned:
        return await self.log.read(group_key(appid, gid))

    async def get(self, appid: int, gid: int) -> Group | None:
        """The live group as of its latest revision (one lookup when this process knows it)."""
        return self._typed(await self.read(appid, gid))

    def _typed(self, versioned: Versioned) -> Group | None:
        known = self._groups.get(versioned.key)
        if known is not None and known.revision == versioned.rev:
            return known
        group = to_group(versioned)
        if len(self._groups) >= GROUP_CACHE_SIZE:
            self._groups.pop(next(iter(self._groups)))
        if group is None:
            self._groups.pop(versioned.key, None)
        else:
            self._groups[versioned.key] = group
        return group

    async def get_at(self, appid: int, gid: int, revision: int) -> Group | None:
        """The group as of ``revision`` (None: not committed, or not a live group then)."""
        versioned = await self.log.read_at(group_key(appid, gid), revision)
        return to_group(versioned) if versioned is not None else None

    async def list_for(self, appid: int, uid: int) -> list[Group]:
        mine = await self.mine.read(f"{appid}:{uid}")
        gids = mine.state["g"] if mine.state else []
        read = await self.log.read_many([group_key(appid, int(gid)) for gid in gids])
        groups = [self._typed(versioned) for versioned in read.values()]
        return [g for g in groups if g is not None and g.is_member(uid)]

    async def _index_members(self, revision: Revision) -> None:
        """After a group revision: record the joins and departures in each user's list."""
        joined, left = membership_changes(revision.delta)
        if not joined and not left:
            return
        appid, _, gid = revision.key.partition(":")
        deltas = {f"{appid}:{uid}": {"add": [int(gid)]} for uid in joined}
        deltas |= {f"{appid}:{uid}": {"remove": [int(gid)]} for uid in left}
        await self.mine.append_many(deltas)

    async def migrate(self) -> int:
        """Rewrite groups stored in the previous shape (``groups_groups``: one document per
        group, updated in place) as logs: revision 1 is the group as it was, with no events
        (they were published then). Idempotent: a group whose log exists is skipped, and a
        finished migration leaves a marker so later starts do not read the old collection."""
        ids: Collection = self.db[IDS]
        if await ids.find_one({"_id": MIGRATED}) is not None:
            return 0
        migrated = 0
        async for doc in self.db[LEGACY_GROUPS].find({}, {"outbox": 0}):
            state = legacy_state(doc)
            key = group_key(state["appid"], state["gid"])
            try:
                await self.log.revs.insert_one(
                    {"_id": f"{key}:1", "d": {"op": "create", "s": state}, "ev": [], "at": utcnow()}
                )
            except DuplicateKeyError:
                continue
            if not state["deleted"]:
                await self.mine.append_many(
                    {f"{state['appid']}:{uid}": {"add": [state["gid"]]} for uid in state["m"]}
                )
            migrated += 1
        with contextlib.suppress(DuplicateKeyError):
            await ids.insert_one({"_id": MIGRATED, "groups": migrated, "at": utcnow()})
        return migrated

    # ---- the user-name view ----

    async def remember_name(self, appid: int, uid: int, name: str, at: datetime) -> None:
        """Keep the newest name seen for a user (older or repeated events change nothing)."""
        key = f"{appid}:{uid}"
        for _ in range(3):
            doc = await self.users.find_one({"_id": key})
            if doc is not None and doc.get("at") is not None and doc["at"] >= at:
                return
            if doc is None:
                with contextlib.suppress(DuplicateKeyError):
                    await self.users.insert_one(
                        {"_id": key, "appid": appid, "uid": uid, "name": name, "at": at}
                    )
                    return
                continue
            await self.users.update_one({"_id": key}, {"$set": {"name": name, "at": at}})
            return

    async def names(self, appid: int, uids: Sequence[int]) -> dict[int, str]:
        docs = (await by_ids(self.users, [f"{appid}:{uid}" for uid in uids])).values()
        return {int(d["uid"]): str(d.get("name", "")) for d in docs}


def legacy_state(doc: Document) -> Document:
    """A group document of the previous shape as a state of the log."""
    return {
        "appid": doc["appid"],
        "gid": doc["_id"],
        "master": doc["master"],
        "name": doc["name"],
        "notice": doc.get("notice", ""),
        "super": bool(doc.get("super")),
        "deleted": bool(doc.get("deleted")),
        "m": {
            str(uid): [m.get("ts", 0), m.get("nickname"), bool(m.get("mute")), bool(m.get("dnd"))]
            for uid, m in (doc.get("members") or {}).items()
        },
    }
