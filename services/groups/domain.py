"""The groups domain: groups, members, member settings, and the client-side authorization
rules of spec §6. No HTTP here. Each change is one compare-and-set write of the group document
that also carries its ``group.*`` events (delivered right after, relayed if need be)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.bus import Bus
from shared.errors import (
    GROUP_NON_EXISTS,
    NO_AUTHORITY,
    InvalidParam,
    ParleyError,
)
from shared.events import (
    Event,
    GroupCreated,
    GroupDisbanded,
    GroupEvent,
    GroupMemberAdded,
    GroupMemberDoNotDisturbChanged,
    GroupMemberMuted,
    GroupMemberNicknameChanged,
    GroupMemberRemoved,
    GroupNoticeChanged,
    GroupRenamed,
    GroupUpgraded,
    utcnow,
)
from shared.internal import GroupDirectory, GroupSnapshot
from shared.mongo import Document
from shared.outbox import deliver
from shared.settings import Settings

from .repository import GroupExists, GroupsRepository


@dataclass(frozen=True)
class MemberSpec:
    """A member as a request names it: a uid, optionally with a display name and avatar."""

    uid: int
    name: str | None = None
    avatar: str | None = None


@dataclass(frozen=True)
class MemberSettings:
    do_not_disturb: bool | None = None
    nickname: str | None = None
    mute: bool | None = None

    def is_empty(self) -> bool:
        return self.do_not_disturb is None and self.nickname is None and self.mute is None


def _uids(doc: Document) -> list[int]:
    return sorted(int(uid) for uid in doc.get("members", {}))


def _base(doc: Document, members: list[int], **changes: Any) -> dict[str, Any]:
    """The fields every group event carries, as of after the change."""
    return {
        "appid": doc["appid"],
        "gid": doc["_id"],
        "name": changes.get("name", doc["name"]),
        "super": changes.get("super", doc["super"]),
        "members": members,
        "revision": doc["revision"] + 1,
    }


def _new_member() -> dict[str, Any]:
    return {"ts": int(time.time()), "nickname": None, "mute": False, "dnd": False}


def snapshot(doc: Document) -> GroupSnapshot:
    members = doc.get("members", {})
    return GroupSnapshot(
        gid=int(doc["_id"]),
        appid=int(doc["appid"]),
        name=doc["name"],
        super=bool(doc["super"]),
        members=_uids(doc),
        muted=sorted(int(uid) for uid, m in members.items() if m.get("mute")),
        revision=int(doc["revision"]),
    )


class GroupsDomain:
    def __init__(self, repo: GroupsRepository, bus: Bus | None, settings: Settings) -> None:
        self.repo = repo
        self.bus = bus
        self.settings = settings

    async def _announce(self, gid: int, events: Sequence[Event], rid: str) -> None:
        await deliver(self.repo.groups, gid, events, self.bus, rid)

    # ---- reads ----

    async def get(self, appid: int, gid: int) -> Document:
        doc = await self.repo.get(appid, gid)
        if doc is None:
            raise ParleyError(GROUP_NON_EXISTS)
        return doc

    async def list_for(self, appid: int, uid: int) -> list[Document]:
        return await self.repo.list_for(appid, uid)

    async def user_names(self, appid: int, uids: Sequence[int]) -> dict[int, str]:
        return await self.repo.names(appid, uids)

    # ---- changes ----

    async def create(
        self,
        appid: int,
        master: int,
        name: str,
        is_super: bool,
        members: Sequence[MemberSpec],
        members_given: list[int | dict[str, Any]],
        group_id: int | None = None,
        rid: str = "",
    ) -> int:
        """S3/S21. The master is a member only if listed (the client route lists the caller)."""
        uids = sorted({m.uid for m in members})
        for _ in range(5):
            gid = group_id if group_id else await self.repo.next_gid()
            doc: Document = {
                "_id": gid,
                "appid": appid,
                "master": master,
                "name": name,
                "notice": "",
                "super": is_super,
                "deleted": False,
                "revision": 0,
                "members": {str(uid): _new_member() for uid in uids},
                "member_uids": uids,
                "created_at": utcnow(),
            }
            event = GroupCreated(**_base(doc, uids), master=master, members_given=members_given)
            try:
                await self.repo.insert(doc | {"revision": 1}, [event], rid)
            except GroupExists:
                if group_id:
                    raise ParleyError("group already exists") from None
                continue
            await self._announce(gid, [event], rid)
            return gid
        raise ParleyError("group id allocation failed", status=503)

    async def rename(self, appid: int, gid: int, name: str, rid: str = "") -> None:
        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            event = GroupRenamed(**_base(doc, _uids(doc), name=name))
            return {"name": name}, [event]

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def set_notice(self, appid: int, gid: int, notice: str, rid: str = "") -> None:
        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            return {"notice": notice}, [GroupNoticeChanged(**_base(doc, _uids(doc)), notice=notice)]

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def disband(self, appid: int, gid: int, rid: str = "") -> None:
        """S5/S24. The event carries the members just before: they all get ``disband``."""

        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            event = GroupDisbanded(**_base(doc, _uids(doc)))
            return {"deleted": True, "members": {}, "member_uids": []}, [event]

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def upgrade(self, appid: int, gid: int, rid: str = "") -> None:
        """S9; idempotent (an upgrade of a super group repeats the event)."""

        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            return {"super": True}, [GroupUpgraded(**_base(doc, _uids(doc), super=True))]

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def add_members(
        self,
        appid: int,
        gid: int,
        members: Sequence[MemberSpec],
        inviter: dict[str, Any] | None = None,
        rid: str = "",
    ) -> None:
        """S6/S25: new members join (fresh: join time now, not muted, no nickname); existing
        ones are left alone. Every listed member gets an ``add_member`` notification."""

        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            current = dict(doc.get("members", {}))
            joined = {m.uid for m in members if str(m.uid) not in current}
            for uid in joined:
                current[str(uid)] = _new_member()
            after = sorted(int(uid) for uid in current)
            events: list[Event] = []
            seen: set[int] = set()
            for m in members:
                if m.uid in seen:
                    continue
                seen.add(m.uid)
                events.append(
                    GroupMemberAdded(
                        **_base(doc, after),
                        member_id=m.uid,
                        member_name=m.name or None,
                        avatar=m.avatar or None,
                        inviter=inviter,
                        joined=m.uid in joined,
                    )
                )
            return {"members": current, "member_uids": after}, events

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def remove_members(
        self, appid: int, gid: int, members: Sequence[MemberSpec], rid: str = ""
    ) -> None:
        """S7/S8/S26/S27: idempotent; each listed uid gets its ``quit_group`` notification. A
        name not given in the request is the user's stored name, when known."""
        known = await self.repo.names(appid, [m.uid for m in members if m.name is None])

        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            current = dict(doc.get("members", {}))
            removed = {m.uid for m in members if current.pop(str(m.uid), None) is not None}
            after = sorted(int(uid) for uid in current)
            events: list[Event] = []
            for m in {m.uid: m for m in members}.values():
                name = m.name if m.name is not None else known.get(m.uid)
                events.append(
                    GroupMemberRemoved(
                        **_base(doc, after),
                        member_id=m.uid,
                        member_name=name or None,
                        avatar=m.avatar or None,
                        was_member=m.uid in removed,
                    )
                )
            return {"members": current, "member_uids": after}, events

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    async def member_settings(
        self, appid: int, gid: int, uid: int, settings: MemberSettings, rid: str = ""
    ) -> None:
        """S10/S28: every key present, in the order do_not_disturb, nickname, mute."""

        def change(doc: Document) -> tuple[dict[str, Any], list[Event]]:
            member = doc.get("members", {}).get(str(uid))
            if member is None:
                raise InvalidParam()
            base = _base(doc, _uids(doc))
            sets: dict[str, Any] = {}
            events: list[Event] = []
            if settings.do_not_disturb is not None:
                sets[f"members.{uid}.dnd"] = settings.do_not_disturb
                events.append(
                    GroupMemberDoNotDisturbChanged(
                        **base, member_id=uid, do_not_disturb=settings.do_not_disturb
                    )
                )
            if settings.nickname is not None:
                sets[f"members.{uid}.nickname"] = settings.nickname
                events.append(
                    GroupMemberNicknameChanged(**base, member_id=uid, nickname=settings.nickname)
                )
            if settings.mute is not None:
                sets[f"members.{uid}.mute"] = settings.mute
                events.append(GroupMemberMuted(**base, member_id=uid, mute=settings.mute))
            return sets, events

        _, events = await self.repo.mutate(appid, gid, change, rid)
        await self._announce(gid, events, rid)

    # ---- client-side authorization (spec §6) ----

    @staticmethod
    def require_member(doc: Document, uid: int) -> None:
        if str(uid) not in doc.get("members", {}):
            raise ParleyError(NO_AUTHORITY)

    @staticmethod
    def require_master(doc: Document, uid: int) -> None:
        if int(doc["master"]) != uid:
            raise ParleyError(NO_AUTHORITY)

    # ---- the user-name view (auth events) ----

    async def on_user_event(self, event: GroupEvent | Event) -> None:
        name = getattr(event, "user_name", None)
        if name is None:
            name = getattr(event, "name", None)
        uid = getattr(event, "uid", None)
        if isinstance(name, str) and isinstance(uid, int):
            await self.repo.remember_name(event.appid, uid, name, event.occurred_at)


class LocalGroupDirectory(GroupDirectory):
    """The groups domain as a ``GroupDirectory``, for the messages service in-process."""

    def __init__(self, domain: GroupsDomain) -> None:
        self._domain = domain

    async def get_group(self, appid: int, gid: int) -> GroupSnapshot | None:
        doc = await self._domain.repo.get(appid, gid)
        return snapshot(doc) if doc is not None else None
