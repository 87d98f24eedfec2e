"""The groups service's request bodies: pydantic models and pure parsers of the shapes a
model cannot say (S6's three forms, member entries that are uids or objects). Parsing checks
shape and types only; the limits and spec §6's rules are the domain's (``domain.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.errors import NO_MEMBERS_TO_DELETE, InvalidParam, ParleyError
from shared.ids import Flag, Id, IdOrZero, Text, parse_positive_id

from .rules import Inviter, MemberSettings, MemberSpec, NewGroup


class CreateGroupRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    master: Id
    name: Text
    super: Flag = False
    members: list[Any]
    group_id: IdOrZero | None = None  # honoured when > 0 (spec S3)

    def new_group(self) -> NewGroup:
        """The group described, its member entries parsed (``parse_members``)."""
        members = parse_members(self.members)
        return NewGroup(self.master, self.name, self.super, members.specs, members.given)


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text | None = None
    notice: Text | None = None


class ServerMemberSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    do_not_disturb: Flag | None = None
    nickname: Text | None = None
    mute: Flag | None = None

    def change(self) -> MemberSettings:
        return MemberSettings(self.do_not_disturb, self.nickname, self.mute)


class ClientMemberSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    quiet: Flag | None = None  # the reference's alias of do_not_disturb
    do_not_disturb: Flag | None = None
    nickname: Text | None = None

    def change(self) -> MemberSettings:
        dnd = self.quiet if self.quiet is not None else self.do_not_disturb
        return MemberSettings(do_not_disturb=dnd, nickname=self.nickname)


@dataclass(frozen=True)
class Members:
    """Parsed member entries: the members, and their normalised form for the ``create``
    notification (a uid, or ``{uid, name?, avatar?}``)."""

    specs: list[MemberSpec]
    given: list[int | dict[str, Any]]


@dataclass(frozen=True)
class AddBody:
    """S6/S25: the members to add and the body's inviter (if any)."""

    members: list[MemberSpec]
    inviter: Inviter | None


def parse_member(entry: Any) -> tuple[MemberSpec, int | dict[str, Any]]:
    """A uid (integer or digit string) or an object ``{uid, name?, avatar?}``; uids are
    positive. Returns the member and its normalised form."""
    given: int | dict[str, Any]
    try:
        if isinstance(entry, dict):
            uid = parse_positive_id(entry.get("uid"))
            name, avatar = entry.get("name"), entry.get("avatar")
            if name is not None and not isinstance(name, str):
                raise ValueError("name")
            if avatar is not None and not isinstance(avatar, str):
                raise ValueError("avatar")
            given = {"uid": uid, **{k: v for k, v in (("name", name), ("avatar", avatar)) if v}}
            spec = MemberSpec(uid, name, avatar)
        else:
            uid = parse_positive_id(entry)
            spec, given = MemberSpec(uid), uid
    except ValueError as exc:
        raise InvalidParam() from exc
    return spec, given


def parse_members(entries: list[Any]) -> Members:
    parsed = [parse_member(entry) for entry in entries]
    return Members([spec for spec, _ in parsed], [given for _, given in parsed])


def parse_inviter(raw: Any) -> Inviter:
    """Of the body's inviter, only ``uid`` (a positive id) and ``name`` (a string) are kept."""
    if not isinstance(raw, dict):
        raise InvalidParam()
    uid: int | None = None
    if "uid" in raw:
        try:
            uid = parse_positive_id(raw["uid"])
        except ValueError as exc:
            raise InvalidParam() from exc
    name = raw.get("name")
    if "name" in raw and not isinstance(name, str):
        raise InvalidParam()
    return Inviter(uid, name)


def parse_add_body(body: Any) -> AddBody:
    """S6's three forms: ``{"members": [...], "inviter": {...}?}``, one member object, or a
    bare array."""
    inviter: Inviter | None = None
    if isinstance(body, list):
        entries = body
    elif isinstance(body, dict) and "members" in body:
        entries = body["members"]
        if not isinstance(entries, list):
            raise InvalidParam()
        if body.get("inviter") is not None:
            inviter = parse_inviter(body["inviter"])
    elif isinstance(body, dict):
        entries = [body]
    else:
        raise InvalidParam()
    return AddBody(parse_members(entries).specs, inviter)


def parse_remove_body(body: Any) -> list[MemberSpec]:
    """S8/S27: an array of uids and/or member objects; empty (or ``{}``) is refused."""
    if body == [] or body == {}:
        raise ParleyError(NO_MEMBERS_TO_DELETE)
    if not isinstance(body, list):
        raise InvalidParam()
    return parse_members(body).specs
