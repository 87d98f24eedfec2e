"""The groups service's rules as pure functions (no store, no HTTP): the limits of
``GroupPolicy``, spec §6's client-group rules (``check_*`` refuse with the spec's error; the
rules that depend on the group are ``Check``s run inside the change), and the values requests
are parsed into. The domain applies them; unit tests call them directly."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import (
    MASTER_MUST_BE_SELF,
    NO_ACTION,
    NO_AUTHORITY,
    PATCH_NOTHING,
    SETTING_OTHER_FORBIDDEN,
    InvalidParam,
    ParleyError,
)
from shared.limits import check_count, check_length

from .model import Group

Check = Callable[[Group], None]
TOO_MANY_GROUPS = "too many groups created, retry later"


class GroupPolicy(Protocol):
    """The settings the groups domain decides with, each the ``PARLEY_*`` of its name
    (``Settings`` is one; a test may pass any object with these)."""

    @property
    def max_name_length(self) -> int: ...
    @property
    def max_avatar_length(self) -> int: ...
    @property
    def max_notice_length(self) -> int: ...
    @property
    def max_nickname_length(self) -> int: ...
    @property
    def max_group_members(self) -> int: ...
    @property
    def max_super_group_members(self) -> int: ...
    @property
    def max_members_per_request(self) -> int: ...
    @property
    def external_group_id(self) -> bool: ...
    @property
    def notice_by_master_only(self) -> bool: ...
    @property
    def master_must_disband(self) -> bool: ...
    @property
    def client_super_groups(self) -> bool: ...
    @property
    def client_groups_per_minute(self) -> int: ...


@dataclass(frozen=True)
class MemberSpec:
    """A member as a request names it: a uid, optionally with a display name and avatar."""

    uid: int
    name: str | None = None
    avatar: str | None = None


@dataclass(frozen=True)
class NewGroup:
    """A group as a create request describes it; ``given``: its members as listed (uids or
    ``{uid, name?, avatar?}``), for the ``create`` notification."""

    master: int
    name: str
    is_super: bool
    members: list[MemberSpec]
    given: list[int | dict[str, Any]]


@dataclass(frozen=True)
class MemberSettings:
    do_not_disturb: bool | None = None
    nickname: str | None = None
    mute: bool | None = None

    def is_empty(self) -> bool:
        return self.do_not_disturb is None and self.nickname is None and self.mute is None


@dataclass(frozen=True)
class Inviter:
    """Who invited the members of an add, as the ``add_member`` notification shows them
    (None: not given)."""

    uid: int | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("uid", self.uid), ("name", self.name)) if v is not None}


class CreationLimiter:
    """At most ``limit`` group creations per (appid, uid) in any 60 seconds. Counted in this
    process only: behind N replicas a client may create up to N times as many."""

    WINDOW = 60.0
    MAX_KEYS = 100_000

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._recent: dict[tuple[int, int], deque[float]] = {}

    def take(self, appid: int, uid: int) -> bool:
        """Record one creation if the caller is under the limit; False (nothing recorded)
        otherwise."""
        now = time.monotonic()
        if len(self._recent) >= self.MAX_KEYS:
            self._recent = {
                k: v for k, v in self._recent.items() if v and v[-1] > now - self.WINDOW
            }
        recent = self._recent.setdefault((appid, uid), deque())
        while recent and recent[0] <= now - self.WINDOW:
            recent.popleft()
        if len(recent) >= self._limit:
            return False
        recent.append(now)
        return True


# ---- the limits (PARLEY_MAX_*): 400 ``invalid param`` beyond them --------------------------


def check_texts(policy: GroupPolicy, name: str | None, notice: str | None = None) -> None:
    check_length(name, policy.max_name_length)
    check_length(notice, policy.max_notice_length)


def check_members(policy: GroupPolicy, members: Sequence[MemberSpec]) -> None:
    """At most ``max_members_per_request`` members in one request, their names and avatars
    within their limits."""
    check_count(members, policy.max_members_per_request)
    for spec in members:
        check_length(spec.name, policy.max_name_length)
        check_length(spec.avatar, policy.max_avatar_length)


def check_inviter(policy: GroupPolicy, inviter: Inviter | None) -> None:
    if inviter is not None:
        check_length(inviter.name, policy.max_name_length)


def check_group_size(
    policy: GroupPolicy, specs: Sequence[MemberSpec], *, group: Group | None, is_super: bool
) -> None:
    """The group (``group``; None for a new one) stays within its member limit once ``specs``
    join. For an existing group this runs as a rule of the change itself (``size_rule``), on
    the state the change is written on, so concurrent additions cannot overshoot it."""
    current = set(group.members) if group is not None else set()
    after = len(current | {spec.uid for spec in specs})
    limit = policy.max_super_group_members if is_super else policy.max_group_members
    if after > limit:
        raise InvalidParam()


def size_rule(
    policy: GroupPolicy, specs: Sequence[MemberSpec], first: Check | None = None
) -> Check:
    """``first`` (a §6 rule), then the member limit, as one rule of an add."""

    def check(group: Group) -> None:
        if first is not None:
            first(group)
        check_group_size(policy, specs, group=group, is_super=group.super)

    return check


def check_member_settings(policy: GroupPolicy, change: MemberSettings) -> None:
    """S10/S28: the nickname within its limit; a change of nothing is 400 ``no action``."""
    check_length(change.nickname, policy.max_nickname_length)
    if change.is_empty():
        raise ParleyError(NO_ACTION)


# ---- spec §6: who may do what in a client group ---------------------------------------------


def require_member(uid: int) -> Check:
    """The caller is a live member of the group."""

    def check(group: Group) -> None:
        if not group.is_member(uid):
            raise ParleyError(NO_AUTHORITY)

    return check


def require_master(uid: int) -> Check:
    """The caller is the group's master."""

    def check(group: Group) -> None:
        if group.master != uid:
            raise ParleyError(NO_AUTHORITY)

    return check


def all_of(*checks: Check) -> Check:
    def check(group: Group) -> None:
        for one in checks:
            one(group)

    return check


def check_client_create(policy: GroupPolicy, caller: int, master: int, is_super: bool) -> None:
    """S21: the caller creates as the master; super groups only when the policy allows."""
    if master != caller:
        raise ParleyError(MASTER_MUST_BE_SELF)
    if is_super and not policy.client_super_groups:
        raise ParleyError(NO_AUTHORITY)


def notice_rule(policy: GroupPolicy, caller: int) -> Check:
    """S23 ``notice``: a member, and the master unless ``notice_by_master_only`` is off."""
    if policy.notice_by_master_only:
        return all_of(require_member(caller), require_master(caller))
    return require_member(caller)


def removal_rule(policy: GroupPolicy, caller: int, mid: int) -> Check:
    """S26: a member leaves (``mid`` = caller) or the master removes one; the master may not
    leave a group that has other members when ``master_must_disband`` (they disband it)."""

    def check(group: Group) -> None:
        is_master = group.master == caller
        if mid != caller and not is_master:
            raise ParleyError(NO_AUTHORITY)
        if mid == caller and not group.is_member(caller):
            raise ParleyError(NO_AUTHORITY)  # only a member can leave
        if (
            mid == caller
            and is_master
            and policy.master_must_disband
            and set(group.members) - {mid}
        ):
            raise ParleyError(NO_AUTHORITY)

    return check


def check_not_removing_self(caller: int, members: Sequence[MemberSpec]) -> None:
    """S27: the master leaves by disbanding, never by removing themself."""
    if caller in {m.uid for m in members}:
        raise ParleyError(NO_AUTHORITY)


def check_own_settings(caller: int, mid: int) -> None:
    """S28: a client changes only its own member settings."""
    if mid != caller:
        raise ParleyError(SETTING_OTHER_FORBIDDEN)


def check_patch(name: str | None, notice: str | None) -> None:
    """S23: a patch names a name or a notice."""
    if name is None and notice is None:
        raise ParleyError(PATCH_NOTHING)
