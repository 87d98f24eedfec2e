"""Unit tests of the domains' rules and the request parsers: spec §6 (who may do what in a
client group), the ``PARLEY_*`` limits, S13's receivers, S20's store filter, S17's profile and
app checks. Pure functions on plain values: milliseconds each, no servers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from services.auth.app import SettingsRequest
from services.customer.rules import check_profile, check_same_app
from services.groups.model import Group, Member
from services.groups.requests import (
    ClientMemberSettingsRequest,
    CreateGroupRequest,
    parse_add_body,
    parse_member,
    parse_remove_body,
)
from services.groups.rules import (
    CreationLimiter,
    Inviter,
    MemberSettings,
    MemberSpec,
    NewGroup,
    all_of,
    check_client_create,
    check_group_size,
    check_inviter,
    check_member_settings,
    check_members,
    check_not_removing_self,
    check_own_settings,
    check_patch,
    check_texts,
    notice_rule,
    removal_rule,
    require_master,
    require_member,
    size_rule,
)
from services.messages.admin import Entry
from services.messages.rules import CMD_CUSTOMER, check_content, store_messages, system_receivers
from shared.errors import (
    INVALID_APPID,
    INVALID_PARAM,
    MASTER_MUST_BE_SELF,
    NO_ACTION,
    NO_AUTHORITY,
    NO_MEMBERS_TO_DELETE,
    PATCH_NOTHING,
    SETTING_OTHER_FORBIDDEN,
    ParleyError,
)
from shared.events import DoNotDisturb


@dataclass(frozen=True)
class Policy:
    """Small limits, so each is easy to cross (the domains read only these names)."""

    max_name_length: int = 5
    max_avatar_length: int = 8
    max_notice_length: int = 6
    max_nickname_length: int = 4
    max_group_members: int = 3
    max_super_group_members: int = 4
    max_members_per_request: int = 3
    external_group_id: bool = False
    notice_by_master_only: bool = True
    master_must_disband: bool = True
    client_super_groups: bool = False
    client_groups_per_minute: int = 2
    max_content_bytes: int = 6
    disabled_app_ids: frozenset[int] = field(default_factory=frozenset)
    kefu_appid: int = 9
    customer_client_id_base: int = 1000
    customer_auth_requires_appkey: bool = False


POLICY = Policy()
MASTER, MEMBER, OUTSIDER = 1, 2, 3


def group(master: int = MASTER, members: tuple[int, ...] = (MASTER, MEMBER)) -> Group:
    return Group(
        appid=7,
        gid=70,
        master=master,
        name="team",
        notice="",
        super=False,
        revision=3,
        members={uid: Member(uid=uid, ts=0) for uid in members},
    )


def refused(check: Callable[[], object], message: str = INVALID_PARAM) -> None:
    with pytest.raises(ParleyError) as caught:
        check()
    assert (caught.value.status, caught.value.message) == (400, message)


# ---- spec §6 ------------------------------------------------------------------------------


def test_require_member_and_master() -> None:
    require_member(MEMBER)(group())
    require_master(MASTER)(group())
    refused(lambda: require_member(OUTSIDER)(group()), NO_AUTHORITY)
    refused(lambda: require_master(MEMBER)(group()), NO_AUTHORITY)
    refused(lambda: all_of(require_member(MEMBER), require_master(MEMBER))(group()), NO_AUTHORITY)


def test_client_create_is_by_the_master_and_super_only_when_allowed() -> None:
    check_client_create(POLICY, MASTER, MASTER, False)
    refused(lambda: check_client_create(POLICY, MEMBER, MASTER, False), MASTER_MUST_BE_SELF)
    refused(lambda: check_client_create(POLICY, MASTER, MASTER, True), NO_AUTHORITY)
    check_client_create(replace(POLICY, client_super_groups=True), MASTER, MASTER, True)


def test_notice_is_the_masters_unless_configured_for_any_member() -> None:
    notice_rule(POLICY, MASTER)(group())
    refused(lambda: notice_rule(POLICY, MEMBER)(group()), NO_AUTHORITY)
    anyone = replace(POLICY, notice_by_master_only=False)
    notice_rule(anyone, MEMBER)(group())
    refused(lambda: notice_rule(anyone, OUTSIDER)(group()), NO_AUTHORITY)
    # The master who has left is no longer a member: refused either way.
    refused(lambda: notice_rule(POLICY, MASTER)(group(members=(MEMBER,))), NO_AUTHORITY)


def test_a_member_leaves_and_the_master_removes() -> None:
    removal_rule(POLICY, MEMBER, MEMBER)(group())  # leaves
    removal_rule(POLICY, MASTER, MEMBER)(group())  # removes
    removal_rule(POLICY, MASTER, OUTSIDER)(group())  # removing a non-member is idempotent
    refused(lambda: removal_rule(POLICY, MEMBER, MASTER)(group()), NO_AUTHORITY)
    refused(lambda: removal_rule(POLICY, OUTSIDER, OUTSIDER)(group()), NO_AUTHORITY)


def test_the_master_disbands_rather_than_leaves_unless_configured() -> None:
    refused(lambda: removal_rule(POLICY, MASTER, MASTER)(group()), NO_AUTHORITY)
    removal_rule(POLICY, MASTER, MASTER)(group(members=(MASTER,)))  # alone: may leave
    removal_rule(replace(POLICY, master_must_disband=False), MASTER, MASTER)(group())


def test_bulk_removal_never_names_the_caller() -> None:
    check_not_removing_self(MASTER, [MemberSpec(MEMBER)])
    refused(lambda: check_not_removing_self(MASTER, [MemberSpec(MASTER)]), NO_AUTHORITY)


def test_member_settings_are_ones_own_and_change_something() -> None:
    check_own_settings(MEMBER, MEMBER)
    refused(lambda: check_own_settings(MEMBER, MASTER), SETTING_OTHER_FORBIDDEN)
    check_member_settings(POLICY, MemberSettings(nickname="abcd"))
    refused(lambda: check_member_settings(POLICY, MemberSettings()), NO_ACTION)
    refused(lambda: check_member_settings(POLICY, MemberSettings(nickname="abcde")))


def test_a_patch_names_something() -> None:
    check_patch("x", None)
    check_patch(None, "")
    refused(lambda: check_patch(None, None), PATCH_NOTHING)


# ---- the limits ---------------------------------------------------------------------------


def test_text_limits() -> None:
    check_texts(POLICY, "12345", "123456")
    refused(lambda: check_texts(POLICY, "123456"))
    refused(lambda: check_texts(POLICY, None, "1234567"))
    check_inviter(POLICY, Inviter(1, "12345"))
    check_inviter(POLICY, None)
    refused(lambda: check_inviter(POLICY, Inviter(1, "123456")))


def test_members_per_request_and_their_names_and_avatars() -> None:
    check_members(POLICY, [MemberSpec(1), MemberSpec(2, "12345", "12345678"), MemberSpec(3)])
    refused(lambda: check_members(POLICY, [MemberSpec(n) for n in range(1, 5)]))
    refused(lambda: check_members(POLICY, [MemberSpec(1, "123456")]))
    refused(lambda: check_members(POLICY, [MemberSpec(1, None, "123456789")]))


def test_group_size_counts_distinct_members_after_the_change() -> None:
    specs = [MemberSpec(MEMBER), MemberSpec(4)]
    check_group_size(POLICY, specs, group=group(), is_super=False)  # {1, 2, 4}: 3
    refused(
        lambda: check_group_size(POLICY, [MemberSpec(5), *specs], group=group(), is_super=False)
    )
    check_group_size(POLICY, [MemberSpec(5), *specs], group=group(), is_super=True)  # 4 of 4
    new = [MemberSpec(n) for n in (1, 2, 3, 3)]
    check_group_size(POLICY, new, group=None, is_super=False)
    refused(lambda: check_group_size(POLICY, [*new, MemberSpec(4)], group=None, is_super=False))


def test_size_rule_runs_the_section_6_rule_first() -> None:
    outsider_adds = size_rule(POLICY, [MemberSpec(4), MemberSpec(5)], require_member(OUTSIDER))
    refused(lambda: outsider_adds(group()), NO_AUTHORITY)
    refused(lambda: size_rule(POLICY, [MemberSpec(4), MemberSpec(5)])(group()))


def test_creations_per_caller_are_limited() -> None:
    limiter = CreationLimiter(2)
    assert [limiter.take(7, 1) for _ in range(3)] == [True, True, False]
    assert limiter.take(7, 2) and limiter.take(8, 1)  # per (appid, uid)


# ---- parsers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "spec", "given"),
    [
        (5, MemberSpec(5), 5),
        ("5", MemberSpec(5), 5),
        ({"uid": 5}, MemberSpec(5), {"uid": 5}),
        (
            {"uid": "5", "name": "ann", "avatar": ""},
            MemberSpec(5, "ann", ""),
            {"uid": 5, "name": "ann"},
        ),
    ],
)
def test_parse_member(entry: Any, spec: MemberSpec, given: Any) -> None:
    assert parse_member(entry) == (spec, given)


@pytest.mark.parametrize(
    "entry", [0, -1, "x", None, True, 1.5, {"uid": 0}, {"name": "a"}, {"uid": 1, "name": 2}]
)
def test_parse_member_refuses(entry: Any) -> None:
    refused(lambda: parse_member(entry))


def test_a_create_request_describes_a_new_group() -> None:
    body = CreateGroupRequest.model_validate(
        {"master": "1", "name": "t", "super": 1, "members": [2, {"uid": "3", "name": "c"}]}
    )
    specs = [MemberSpec(2), MemberSpec(3, "c")]
    assert body.new_group() == NewGroup(1, "t", True, specs, [2, {"uid": 3, "name": "c"}])
    bad = CreateGroupRequest.model_validate({"master": 1, "name": "t", "members": [0]})
    refused(bad.new_group)


def test_add_body_forms() -> None:
    assert parse_add_body([1, "2"]).members == [MemberSpec(1), MemberSpec(2)]
    assert parse_add_body({"uid": 3}).members == [MemberSpec(3)]
    body = parse_add_body({"members": [4], "inviter": {"uid": 1, "name": "ann", "x": 0}})
    assert body.members == [MemberSpec(4)]
    assert body.inviter is not None and body.inviter.as_dict() == {"uid": 1, "name": "ann"}
    assert parse_add_body({"members": [], "inviter": {}}).inviter == Inviter()
    assert parse_add_body({"members": [4], "inviter": None}).inviter is None
    bad_bodies: list[Any] = [
        "x",
        5,
        {"members": 4},
        {"members": [4], "inviter": 1},
        {"members": [4], "inviter": {"uid": 0}},
        {"members": [4], "inviter": {"name": None}},
    ]
    for bad in bad_bodies:
        with pytest.raises(ParleyError, match=INVALID_PARAM):
            parse_add_body(bad)


def test_remove_body() -> None:
    assert parse_remove_body([1, {"uid": 2}]) == [MemberSpec(1), MemberSpec(2)]
    refused(lambda: parse_remove_body([]), NO_MEMBERS_TO_DELETE)
    refused(lambda: parse_remove_body({}), NO_MEMBERS_TO_DELETE)
    refused(lambda: parse_remove_body({"uid": 1}))


def test_client_member_settings_quiet_is_do_not_disturb() -> None:
    change = ClientMemberSettingsRequest.model_validate({"quiet": 1, "do_not_disturb": 0})
    assert change.change() == MemberSettings(do_not_disturb=True)
    change = ClientMemberSettingsRequest.model_validate({"do_not_disturb": 0, "nickname": "n"})
    assert change.change() == MemberSettings(do_not_disturb=False, nickname="n")


def test_user_settings_request_becomes_a_change() -> None:
    request = SettingsRequest.model_validate({"do_not_disturb": {"peer_uid": 4, "on": 1}})
    assert request.change().do_not_disturb == DoNotDisturb(peer_uid=4, on=True)
    assert SettingsRequest.model_validate({"other": 1}).change().is_empty()


# ---- messages -----------------------------------------------------------------------------


def test_content_is_limited_in_utf8_bytes() -> None:
    check_content(POLICY, "abcdef")
    check_content(POLICY, "éèà")  # 6 bytes
    refused(lambda: check_content(POLICY, "abcdefg"))
    refused(lambda: check_content(POLICY, "éèàa"))


def test_system_receivers() -> None:
    assert system_receivers(POLICY, 5, [6, 7, 8]) == [5, 6, 7, 8]  # receiver is not counted
    assert system_receivers(POLICY, None, [6]) == [6]
    refused(lambda: system_receivers(POLICY, None, []))
    refused(lambda: system_receivers(POLICY, 5, [6, 7, 8, 9]))


def test_store_messages_keep_customer_service_messages_with_the_stores_agents() -> None:
    def entry(cmd: int, sender: tuple[int, int], receiver: tuple[int, int]) -> Entry:
        return Entry(
            appid=1,
            owner="u:1",
            key=1,
            msg="m",
            cmd=cmd,
            sender=sender[1],
            receiver=receiver[1],
            timestamp=0,
            content="",
            sender_appid=sender[0],
            receiver_appid=receiver[0],
        )

    to_agent = entry(CMD_CUSTOMER, (1, 100), (9, 20))
    from_agent = entry(CMD_CUSTOMER, (9, 20), (1, 100))
    other_agent = entry(CMD_CUSTOMER, (1, 100), (9, 21))
    not_kefu = entry(CMD_CUSTOMER, (1, 100), (2, 20))
    peer = entry(4, (9, 20), (9, 20))
    entries = [to_agent, peer, from_agent, other_agent, not_kefu]
    assert store_messages(entries, 9, {20}) == [to_agent, from_agent]
    assert store_messages(entries, 9, set()) == []


# ---- customer -----------------------------------------------------------------------------


def test_visitor_profile_limits() -> None:
    check_profile(POLICY, "12345", "12345", "12345678")
    check_profile(POLICY, None, None, None)
    refused(lambda: check_profile(POLICY, "123456", None, None))
    refused(lambda: check_profile(POLICY, None, "123456", None))
    refused(lambda: check_profile(POLICY, None, None, "123456789"))


def test_one_apps_key_never_registers_for_another() -> None:
    check_same_app(7, 7)
    check_same_app(7, None)  # S17 without credentials
    refused(lambda: check_same_app(7, 8), INVALID_APPID)
