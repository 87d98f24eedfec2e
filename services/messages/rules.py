"""The messages service's pure rules: which notification a group event stores, for whom
(spec S6/S7); the content limit, S13's receivers, S20's store filter. No storage and no I/O
here; ``domain.py`` stores and announces what these return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from shared.errors import InvalidParam
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
from shared.limits import check_count

from .repository import Entry

# Wire-protocol command numbers of stored kinds (wire protocol §2.7).
CMD_PEER = 4
CMD_GROUP_NOTIFICATION = 7
CMD_GROUP = 8
CMD_SYSTEM = 21
CMD_CUSTOMER = 64


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


class MessagePolicy(Protocol):
    """The settings the messages domain decides with, each the ``PARLEY_*`` of its name
    (``Settings`` is one)."""

    @property
    def max_content_bytes(self) -> int: ...
    @property
    def max_members_per_request(self) -> int: ...
    @property
    def disabled_app_ids(self) -> frozenset[int]: ...
    @property
    def kefu_appid(self) -> int: ...


def check_content(policy: MessagePolicy, content: str) -> None:
    """A message's content is at most ``max_content_bytes`` in UTF-8 (spec S11-S16)."""
    if len(content.encode()) > policy.max_content_bytes:
        raise InvalidParam()


def system_receivers(
    policy: MessagePolicy, receiver: int | None, receivers: Sequence[int]
) -> list[int]:
    """S13: ``receiver``, then ``receivers`` (at most ``max_members_per_request``); none at
    all is 400 ``invalid param``."""
    check_count(receivers, policy.max_members_per_request)
    listed = ([receiver] if receiver is not None else []) + list(receivers)
    if not listed:
        raise InvalidParam()
    return listed


def store_messages(entries: list[Entry], kefu_appid: int, sellers: set[int]) -> list[Entry]:
    """S20 ``?store=``: only customer-service messages (cmd 64) with an agent of the store, an
    agent being a user of the customer-service app ``kefu_appid``."""
    return [
        e
        for e in entries
        if e.cmd == CMD_CUSTOMER
        and (
            (e.receiver_appid == kefu_appid and e.receiver in sellers)
            or (e.sender_appid == kefu_appid and e.sender in sellers)
        )
    ]
