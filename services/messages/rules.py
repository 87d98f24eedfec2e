"""The messages service's pure rules: which notification a group event stores, for whom
(spec S6/S7). No storage and no I/O here; ``domain.py`` stores and announces what these return.
"""

from __future__ import annotations

from typing import Any

from shared.events import (
    AddedMember,
    GroupCreated,
    GroupDisbanded,
    GroupEvent,
    GroupMemberAdded,
    GroupMemberNicknameChanged,
    GroupMemberRemoved,
    GroupMembersAdded,
    GroupMembersRemoved,
    GroupNoticeChanged,
    GroupRenamed,
    GroupUpgraded,
    RemovedMember,
)


def notification_for(event: GroupEvent) -> tuple[dict[str, Any], list[int], bool] | None:
    """(the op object, its recipients, whether to store it per inbox even for a super group)."""
    common = {"group_id": event.gid, "timestamp": event.timestamp}
    named = {**common, "group_name": event.name}
    members = list(event.members)
    if isinstance(event, GroupCreated):
        op = {
            "create": {
                **common,
                "master": event.master,
                "name": event.name,
                "members": event.members_given,
            }
        }
        return op, members, False
    if isinstance(event, GroupRenamed):
        return {"update_name": {**common, "name": event.name}}, members, False
    if isinstance(event, GroupNoticeChanged):
        return {"update_notice": {**common, "notice": event.notice}}, members, False
    if isinstance(event, GroupDisbanded):
        # The group's queue is gone with it: every former member gets it in their own inbox.
        return {"disband": named}, members, True
    if isinstance(event, GroupUpgraded):
        return {"upgrade": {**named, "super": 1}}, members, False
    if isinstance(event, GroupMemberAdded):
        body: dict[str, Any] = {**named, "member_id": event.member_id}
        if event.member_name:
            body["name"] = event.member_name
        if event.avatar:
            body["avatar"] = event.avatar
        if event.inviter is not None:
            body["inviter"] = event.inviter
        return {"add_member": body}, _with(members, event.member_id), False
    if isinstance(event, GroupMemberRemoved):
        body = {**named, "member_id": event.member_id}
        if event.member_name:
            body["name"] = event.member_name
        if event.avatar:
            body["avatar"] = event.avatar
        return {"quit_group": body}, _with(members, event.member_id), False
    if isinstance(event, GroupMemberNicknameChanged):
        body = {**named, "nickname": event.nickname, "member_id": event.member_id}
        return {"update_member_nickname": body}, members, False
    return None  # mute and do-not-disturb changes notify nobody


def member_notifications(
    event: GroupMembersAdded | GroupMembersRemoved, members: list[int]
) -> list[tuple[dict[str, Any], list[int], bool]]:
    """One ``add_member`` or ``quit_group`` op per listed member (spec S6/S7), each to the
    group's ``members`` and that member."""
    named = {"group_id": event.gid, "timestamp": event.timestamp, "group_name": event.name}
    built: list[tuple[dict[str, Any], list[int], bool]] = []
    listed: list[AddedMember] | list[RemovedMember]
    listed = event.added if isinstance(event, GroupMembersAdded) else event.removed
    for m in listed:
        body: dict[str, Any] = {**named, "member_id": m.member_id}
        if m.member_name:
            body["name"] = m.member_name
        if m.avatar:
            body["avatar"] = m.avatar
        if isinstance(event, GroupMembersAdded):
            if event.inviter is not None:
                body["inviter"] = event.inviter
            built.append(({"add_member": body}, _with(members, m.member_id), False))
        else:
            built.append(({"quit_group": body}, _with(members, m.member_id), False))
    return built


def _with(members: list[int], uid: int) -> list[int]:
    return members if uid in members else sorted([*members, uid])
