"""Unit tests of pure functions and domain rules: milliseconds each, no servers."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from services.messages.rules import member_notifications
from shared.auth import parse_basic
from shared.bus import topic_matches
from shared.errors import INVALID_APPID, ParleyError
from shared.events import AddedMember, GroupMembersAdded, GroupMembersRemoved, RemovedMember
from shared.ids import parse_id
from shared.routing import path_regex


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, 7), ("42", 42), ("0", 0), (-3, -3), (2**63 - 1, 2**63 - 1), ("007", 7)],
)
def test_parse_id_accepts_integers_and_decimal_strings(value: Any, expected: int) -> None:
    assert parse_id(value) == expected


@pytest.mark.parametrize(
    "value", [True, False, 1.0, "1.5", "-3", "", " 1", "١٢", None, [1], 2**63, "9" * 30]
)
def test_parse_id_refuses_everything_else(value: Any) -> None:
    with pytest.raises(ValueError, match="id"):
        parse_id(value)


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_parse_basic_reads_appid_and_credential() -> None:
    credentials = parse_basic(basic("12:abc:def"))
    assert (credentials.appid, credentials.secret) == (12, "abc:def")
    assert parse_basic("basic " + basic("3:x")[6:]).appid == 3  # scheme case-insensitive


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer x", "Basic", "Basic !!!", basic("12"), basic("x:secret"), "Basic " + "é"],
)
def test_parse_basic_refuses_malformed_headers(header: str | None) -> None:
    with pytest.raises(ParleyError) as refused:
        parse_basic(header)
    assert (refused.value.status, refused.value.message) == (400, INVALID_APPID)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("#", "group.member.added", True),
        ("group.#", "group.created", True),
        ("group.#", "group", True),
        ("group.*", "group.member.added", False),
        ("group.*.added", "group.member.added", True),
        ("message.group_notification", "message.group", False),
        ("*.created", "app.created", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_topic_matching_follows_amqp(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_path_regex_matches_parameters_one_segment_each() -> None:
    regex = re.compile(path_regex("/groups/{gid}/members/{uid}"))
    assert regex.match("/groups/12/members/7")
    assert not regex.match("/groups/12/members")
    assert not regex.match("/groups/12/members/7/x")
    constrained = re.compile(path_regex(r"/groups/{gid:\d+}"))
    assert constrained.match("/groups/12") and not constrained.match("/groups/ab")


def test_member_notifications_one_per_member_to_the_members_and_that_member() -> None:
    common: dict[str, Any] = {
        "appid": 1,
        "gid": 9,
        "name": "g",
        "super": False,
        "revision": 3,
        "occurred_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    added = GroupMembersAdded(
        **common,
        added=[
            AddedMember(member_id=5, member_name="eve", joined=True),
            AddedMember(member_id=6, joined=True),
        ],
        inviter={"uid": 1, "name": "ann"},
    )
    built = member_notifications(added, [1, 2, 5, 6])
    assert [op["add_member"]["member_id"] for op, _, _ in built] == [5, 6]
    assert built[0][0]["add_member"]["name"] == "eve" and built[0][0]["add_member"]["inviter"] == {
        "uid": 1,
        "name": "ann",
    }
    assert all(recipients == [1, 2, 5, 6] for _, recipients, _ in built)
    removed = GroupMembersRemoved(**common, removed=[RemovedMember(member_id=2, was_member=True)])
    ((op, recipients, per_inbox),) = member_notifications(removed, [1, 5, 6])
    assert op["quit_group"]["member_id"] == 2
    assert recipients == [1, 2, 5, 6] and per_inbox is False  # the one who left hears it too
