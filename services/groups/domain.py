"""The groups domain: groups, members, member settings, and the client-side authorization
rules of spec §6. No HTTP here. Each change is one revision of the group's log
(``repository.py``): the rule checks run against the state the revision is written on, so a
check and its change cannot be separated by a concurrent writer, and the revision carries the
change's ``group.*`` events (published right after, relayed if need be).

The rules are functions: ``check_*`` refuse a request with the spec's error (the limits of
``GroupPolicy`` and spec §6), and the rules that depend on the group are ``Check``s
(``require_member``, ``removal_rule``, ...) run inside the change. Each endpoint is one
``do_*`` operation: its checks, then the change that writes and announces."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from shared.bus import Bus
from shared.errors import (
    GROUP_NON_EXISTS,
    InvalidParam,
    ParleyError,
)
from shared.events import (
    AddedMember,
    Event,
    GroupCreated,
    GroupDisbanded,
    GroupMemberDoNotDisturbChanged,
    GroupMemberMuted,
    GroupMemberNicknameChanged,
    GroupMembersAdded,
    GroupMembersRemoved,
    GroupNoticeChanged,
    GroupRenamed,
    GroupUpgraded,
    RemovedMember,
)
from shared.internal import GroupDirectory, GroupSnapshot
from shared.mongo import Document
from shared.revlog import Conflict, Versioned

from .model import Group
from .repository import GroupsRepository, group_key, to_group
from .rules import (
    TOO_MANY_GROUPS,
    Check,
    CreationLimiter,
    GroupPolicy,
    Inviter,
    MemberSettings,
    MemberSpec,
    NewGroup,
    check_client_create,
    check_group_size,
    check_inviter,
    check_member_settings,
    check_members,
    check_not_removing_self,
    check_patch,
    check_texts,
    notice_rule,
    removal_rule,
    require_master,
    require_member,
    size_rule,
)

Compute = Callable[[Group], tuple[Document, list[Event]]]


class _IdTaken(Exception):
    pass


def _base(group: Group, **changes: Any) -> dict[str, Any]:
    """The fields every group event carries, as of after the change."""
    return {
        "appid": group.appid,
        "gid": group.gid,
        "name": changes.get("name", group.name),
        "super": changes.get("super", group.super),
        "revision": group.revision + 1,
    }


def snapshot(group: Group) -> GroupSnapshot:
    return GroupSnapshot(
        gid=group.gid,
        appid=group.appid,
        name=group.name,
        super=group.super,
        members=group.uids,
        muted=group.muted,
        revision=group.revision,
    )


def _distinct(members: Sequence[MemberSpec]) -> list[MemberSpec]:
    """The first mention of each uid, in request order."""
    return list({m.uid: m for m in reversed(members)}.values())[::-1]


class GroupsDomain:
    def __init__(self, repo: GroupsRepository, bus: Bus | None, policy: GroupPolicy) -> None:
        self.repo = repo
        self.bus = bus
        self.policy = policy
        self.creations = CreationLimiter(policy.client_groups_per_minute)

    # ---- reads ----

    async def get(self, appid: int, gid: int) -> Group:
        group = await self.repo.get(appid, gid)
        if group is None:
            raise ParleyError(GROUP_NON_EXISTS)
        return group

    async def find_group(self, appid: int, gid: int, revision: int | None = None) -> Group | None:
        """The group as it is now, or as of ``revision`` (None: no such group in the app, or
        that revision is not committed)."""
        if revision is not None:
            return await self.repo.get_at(appid, gid, revision)
        return await self.repo.get(appid, gid)

    async def get_as_member(self, appid: int, gid: int, caller: int) -> Group:
        """X3: the group, for one of its members."""
        group = await self.get(appid, gid)
        require_member(caller)(group)
        return group

    async def list_for(self, appid: int, uid: int) -> list[Group]:
        return await self.repo.list_for(appid, uid)

    async def user_names(self, appid: int, uids: Sequence[int]) -> dict[int, str]:
        return await self.repo.names(appid, uids)

    # ---- changes ----

    async def _change(
        self, appid: int, gid: int, compute: Compute, rid: str, check: Check | None
    ) -> None:
        """One revision of the group: ``check`` (a §6 rule) and ``compute`` run against the
        state the revision is written on. 400 ``group non exists`` for a missing group."""

        def step(current: Versioned) -> tuple[Document, list[Event]]:
            group = to_group(current)
            if group is None:
                raise ParleyError(GROUP_NON_EXISTS)
            if check is not None:
                check(group)
            return compute(group)

        try:
            await self.repo.log.change(group_key(appid, gid), step, bus=self.bus, request_id=rid)
        except Conflict:
            raise ParleyError("group busy, retry", status=503) from None

    async def create(
        self, appid: int, new: NewGroup, group_id: int | None = None, rid: str = ""
    ) -> int:
        """S3/S21. The master is a member only if listed (the client route lists the caller)."""
        master, name, is_super = new.master, new.name, new.is_super
        uids = sorted({m.uid for m in new.members})
        now = int(time.time())
        for _ in range(5):
            gid = group_id if group_id else await self.repo.next_gid()
            state: Document = {
                "appid": appid,
                "gid": gid,
                "master": master,
                "name": name,
                "notice": "",
                "super": is_super,
                "deleted": False,
                "m": {str(uid): [now, None, False, False] for uid in uids},
            }
            event = GroupCreated(
                appid=appid,
                gid=gid,
                name=name,
                super=is_super,
                members=uids,
                revision=1,
                master=master,
                members_given=new.given,
            )

            def step(
                current: Versioned, state: Document = state, event: Event = event
            ) -> tuple[Document, list[Event]]:
                if current.rev > 0:
                    raise _IdTaken()  # an external id (EXTERNAL_GROUP_ID) holds this number
                return {"op": "create", "s": state}, [event]

            try:
                await self.repo.log.change(
                    group_key(appid, gid), step, bus=self.bus, request_id=rid, new=True
                )
            except _IdTaken:
                if group_id:
                    raise ParleyError("group already exists") from None
                continue
            return gid
        raise ParleyError("group id allocation failed", status=503)

    async def rename(
        self, appid: int, gid: int, name: str, rid: str = "", check: Check | None = None
    ) -> None:
        def compute(group: Group) -> tuple[Document, list[Event]]:
            event = GroupRenamed(**_base(group, name=name), members=group.uids)
            return {"op": "set", "f": {"name": name}}, [event]

        await self._change(appid, gid, compute, rid, check)

    async def set_notice(
        self, appid: int, gid: int, notice: str, rid: str = "", check: Check | None = None
    ) -> None:
        def compute(group: Group) -> tuple[Document, list[Event]]:
            event = GroupNoticeChanged(**_base(group), members=group.uids, notice=notice)
            return {"op": "set", "f": {"notice": notice}}, [event]

        await self._change(appid, gid, compute, rid, check)

    async def disband(
        self, appid: int, gid: int, rid: str = "", check: Check | None = None
    ) -> None:
        """S5/S24. The event carries the members just before: they all get ``disband``."""

        def compute(group: Group) -> tuple[Document, list[Event]]:
            event = GroupDisbanded(**_base(group), members=group.uids)
            return {"op": "disband", "u": group.uids}, [event]

        await self._change(appid, gid, compute, rid, check)

    async def upgrade(self, appid: int, gid: int, rid: str = "") -> None:
        """S9; idempotent (an upgrade of a super group repeats the event)."""

        def compute(group: Group) -> tuple[Document, list[Event]]:
            event = GroupUpgraded(**_base(group, super=True), members=group.uids)
            return {"op": "set", "f": {"super": True}}, [event]

        await self._change(appid, gid, compute, rid, None)

    async def add_members(
        self,
        appid: int,
        gid: int,
        members: Sequence[MemberSpec],
        inviter: dict[str, Any] | None = None,
        rid: str = "",
        check: Check | None = None,
    ) -> None:
        """S6/S25: new members join (fresh: join time now, not muted, no nickname); existing
        ones are left alone. One event lists every listed member: each gets its ``add_member``
        notification."""
        listed = _distinct(members)

        def compute(group: Group) -> tuple[Document, list[Event]]:
            now = int(time.time())
            joined = [m.uid for m in listed if not group.is_member(m.uid)]
            event = GroupMembersAdded(
                **_base(group),
                added=[
                    AddedMember(
                        member_id=m.uid,
                        member_name=m.name or None,
                        avatar=m.avatar or None,
                        joined=not group.is_member(m.uid),
                    )
                    for m in listed
                ],
                inviter=inviter,
            )
            return {"op": "add", "m": {str(uid): now for uid in joined}}, [event]

        await self._change(appid, gid, compute, rid, check)

    async def remove_members(
        self,
        appid: int,
        gid: int,
        members: Sequence[MemberSpec],
        rid: str = "",
        check: Check | None = None,
    ) -> None:
        """S7/S8/S26/S27: idempotent; each listed uid gets its ``quit_group`` notification. A
        name not given in the request is the user's stored name, when known."""
        listed = _distinct(members)
        known = await self.repo.names(appid, [m.uid for m in listed if m.name is None])

        def compute(group: Group) -> tuple[Document, list[Event]]:
            removed = [m.uid for m in listed if group.is_member(m.uid)]
            event = GroupMembersRemoved(
                **_base(group),
                removed=[
                    RemovedMember(
                        member_id=m.uid,
                        member_name=(m.name if m.name is not None else known.get(m.uid)) or None,
                        avatar=m.avatar or None,
                        was_member=group.is_member(m.uid),
                    )
                    for m in listed
                ],
            )
            return {"op": "remove", "u": removed}, [event]

        await self._change(appid, gid, compute, rid, check)

    async def member_settings(
        self,
        appid: int,
        gid: int,
        uid: int,
        settings: MemberSettings,
        rid: str = "",
        check: Check | None = None,
    ) -> None:
        """S10/S28: every key present, in the order do_not_disturb, nickname, mute."""

        def compute(group: Group) -> tuple[Document, list[Event]]:
            if not group.is_member(uid):
                raise InvalidParam()
            base = {**_base(group), "members": group.uids, "member_id": uid}
            fields: dict[str, Any] = {}
            events: list[Event] = []
            if settings.do_not_disturb is not None:
                fields["dnd"] = settings.do_not_disturb
                events.append(
                    GroupMemberDoNotDisturbChanged(**base, do_not_disturb=settings.do_not_disturb)
                )
            if settings.nickname is not None:
                fields["nickname"] = settings.nickname
                events.append(GroupMemberNicknameChanged(**base, nickname=settings.nickname))
            if settings.mute is not None:
                fields["mute"] = settings.mute
                events.append(GroupMemberMuted(**base, mute=settings.mute))
            return {"op": "member", "uid": uid, "f": fields}, events

        await self._change(appid, gid, compute, rid, check)

    # ---- the API's operations: the limits and spec §6's rules, then the change ----

    async def do_create_group(
        self, appid: int, new: NewGroup, group_id: int | None, rid: str = ""
    ) -> int:
        """S3: a caller-supplied ``group_id`` is honoured when > 0 and the policy says so."""
        check_texts(self.policy, new.name)
        check_members(self.policy, new.members)
        check_group_size(self.policy, new.members, group=None, is_super=new.is_super)
        external = group_id if self.policy.external_group_id and (group_id or 0) > 0 else None
        return await self.create(appid, new, external, rid)

    async def do_client_create_group(
        self, appid: int, caller: int, new: NewGroup, rid: str = ""
    ) -> int:
        """S21: the caller is the master and a member; at most
        ``client_groups_per_minute`` creations per caller."""
        self.check_client_create(caller, new.master, new.is_super)
        check_texts(self.policy, new.name)
        check_members(self.policy, new.members)
        if caller not in {s.uid for s in new.members}:
            # The creator is a member (spec S21).
            new = replace(new, members=[*new.members, MemberSpec(caller)])
        check_group_size(self.policy, new.members, group=None, is_super=new.is_super)
        if not self.creations.take(appid, caller):
            raise ParleyError(TOO_MANY_GROUPS)
        return await self.create(appid, new, None, rid)

    def check_client_create(self, caller: int, master: int, is_super: bool) -> None:
        """S21's rules on the request itself (checked before its members are parsed)."""
        check_client_create(self.policy, caller, master, is_super)

    async def do_update_group(
        self, appid: int, gid: int, name: str | None, notice: str | None, rid: str = ""
    ) -> None:
        """S4: a new name, else a new notice (an extension, spec S4 MAY)."""
        check_texts(self.policy, name, notice)
        if name is not None:
            await self.rename(appid, gid, name, rid)
        elif notice is not None:
            await self.set_notice(appid, gid, notice, rid)
        else:
            raise InvalidParam()

    async def do_client_update_group(
        self, appid: int, caller: int, gid: int, name: str | None, notice: str | None, rid: str = ""
    ) -> None:
        """S23: a member renames; the notice follows ``notice_rule``; name wins over notice."""
        check_patch(name, notice)
        check_texts(self.policy, name, notice)
        if name is not None:
            await self.rename(appid, gid, name, rid, check=require_member(caller))
        else:
            await self.set_notice(
                appid, gid, notice or "", rid, check=notice_rule(self.policy, caller)
            )

    async def do_client_disband(self, appid: int, caller: int, gid: int, rid: str = "") -> None:
        """S24: the master disbands."""
        await self.disband(appid, gid, rid, check=require_master(caller))

    async def do_add_members(
        self,
        appid: int,
        gid: int,
        members: Sequence[MemberSpec],
        inviter: Inviter | None,
        rid: str = "",
    ) -> bool:
        """S6; False (and nothing looked up) when no member is listed."""
        check_inviter(self.policy, inviter)
        check_members(self.policy, members)
        if not members:
            return False
        invited = inviter.as_dict() if inviter is not None else None
        await self.add_members(
            appid, gid, members, invited, rid, check=size_rule(self.policy, members)
        )
        return True

    async def do_client_add_members(
        self,
        appid: int,
        caller: int,
        gid: int,
        members: Sequence[MemberSpec],
        given_inviter: Inviter | None = None,
        rid: str = "",
    ) -> bool:
        """S25: a member invites; the inviter is the caller, with their stored name (an
        inviter in the body is checked like S6's, then not taken). False (and nothing looked
        up) when no member is listed."""
        check_inviter(self.policy, given_inviter)
        check_members(self.policy, members)
        if not members:
            return False
        member = require_member(caller)
        member(await self.get(appid, gid))  # refused before the inviter's name is read
        names = await self.user_names(appid, [caller])
        inviter = {"uid": caller, "name": names.get(caller, "")}
        await self.add_members(
            appid, gid, members, inviter, rid, check=size_rule(self.policy, members, member)
        )
        return True

    async def do_remove_members(
        self, appid: int, gid: int, members: Sequence[MemberSpec], rid: str = ""
    ) -> None:
        """S7/S8."""
        check_members(self.policy, members)
        await self.remove_members(appid, gid, members, rid)

    async def do_client_remove_member(
        self, appid: int, caller: int, gid: int, mid: int, rid: str = ""
    ) -> None:
        """S26: leave, or (the master) remove one member."""
        check = removal_rule(self.policy, caller, mid)
        await self.remove_members(appid, gid, [MemberSpec(mid)], rid, check=check)

    async def check_master_of(self, appid: int, gid: int, caller: int) -> None:
        """S27's first rule, checked before the request's body is read."""
        require_master(caller)(await self.get(appid, gid))

    async def do_client_remove_members(
        self, appid: int, caller: int, gid: int, members: Sequence[MemberSpec], rid: str = ""
    ) -> None:
        """S27: the master removes members, never themself."""
        check_members(self.policy, members)
        check_not_removing_self(caller, members)
        await self.remove_members(appid, gid, members, rid, check=require_master(caller))

    async def do_member_settings(
        self, appid: int, gid: int, mid: int, change: MemberSettings, rid: str = ""
    ) -> None:
        """S10."""
        check_member_settings(self.policy, change)
        await self.member_settings(appid, gid, mid, change, rid)

    async def do_client_member_settings(
        self, appid: int, caller: int, gid: int, change: MemberSettings, rid: str = ""
    ) -> None:
        """S28: a member's own settings (``check_own_settings`` runs before the body is read)."""
        check_member_settings(self.policy, change)
        await self.member_settings(appid, gid, caller, change, rid, check=require_member(caller))

    # ---- the user-name view (auth events) ----

    async def on_user_event(self, event: Event) -> None:
        name = getattr(event, "user_name", None)
        if name is None:
            name = getattr(event, "name", None)
        uid = getattr(event, "uid", None)
        if isinstance(name, str) and isinstance(uid, int):
            await self.repo.remember_name(event.appid, uid, name, event.occurred_at)


class LocalGroupDirectory(GroupDirectory):
    """The groups domain as a ``GroupDirectory``, for the messages service in-process. The
    snapshot of a revision is kept, so a big group is not converted again for each message."""

    def __init__(self, domain: GroupsDomain) -> None:
        self._domain = domain
        self._snapshots: dict[tuple[int, int], GroupSnapshot] = {}

    async def get_group(
        self, appid: int, gid: int, revision: int | None = None
    ) -> GroupSnapshot | None:
        if revision is not None:
            at = await self._domain.find_group(appid, gid, revision)
            return snapshot(at) if at is not None else None
        group = await self._domain.find_group(appid, gid)
        if group is None:
            self._snapshots.pop((appid, gid), None)
            return None
        known = self._snapshots.get((appid, gid))
        if known is not None and known.revision == group.revision:
            return known
        if len(self._snapshots) > 10_000:
            self._snapshots.clear()
        self._snapshots[(appid, gid)] = result = snapshot(group)
        return result
