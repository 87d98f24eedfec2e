"""The groups service: server-side group management (S3-S10, Basic), client-side group
management (S21-S28 and X3, Bearer) with spec §6's rules, ``group.*`` events, and the internal
API the messages service reads current membership from."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from shared.auth import client_auth, server_auth
from shared.errors import (
    MASTER_MUST_BE_SELF,
    NO_ACTION,
    NO_AUTHORITY,
    NO_MEMBERS_TO_DELETE,
    PATCH_NOTHING,
    SETTING_OTHER_FORBIDDEN,
    InvalidParam,
    ParleyError,
)
from shared.http import (
    check_count,
    check_length,
    data,
    empty_ok,
    parse_model,
    path_id,
    query_id,
    read_json,
    required_query_id,
    success,
)
from shared.ids import Flag, Id, IdOrZero, Text, parse_positive_id
from shared.jsonio import json_response
from shared.lifecycle import Consumer, ServiceSpec, consumers_ctx
from shared.logs import request_id_of
from shared.openapi import Operation, Query
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    SETTINGS,
    Deps,
    bus_ctx,
    database_ctx,
    outbox_ctx,
    service_app,
    verifier_ctx,
)

from .domain import Check, GroupsDomain, LocalGroupDirectory, MemberSettings, MemberSpec, snapshot
from .repository import INDEXES, Group, GroupsRepository

log = structlog.get_logger("parley.groups")

SERVICE = "groups"
GROUPS = web.AppKey("groups_domain", GroupsDomain)
TOO_MANY_GROUPS = "too many groups created, retry later"


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


CREATION_LIMITER = web.AppKey("group_creation_limiter", CreationLimiter)


def domain(request: web.Request) -> GroupsDomain:
    return request.app[GROUPS]


# ---- request bodies -----------------------------------------------------------------------


class CreateGroupRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    master: Id
    name: Text
    super: Flag = False
    members: list[Any]
    group_id: IdOrZero | None = None  # honoured when > 0 (spec S3)


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text | None = None
    notice: Text | None = None


class ServerMemberSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    do_not_disturb: Flag | None = None
    nickname: Text | None = None
    mute: Flag | None = None


class ClientMemberSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    quiet: Flag | None = None  # the reference's alias of do_not_disturb
    do_not_disturb: Flag | None = None
    nickname: Text | None = None


def parse_member(entry: Any) -> tuple[MemberSpec, int | dict[str, Any]]:
    """A uid (integer or digit string) or an object ``{uid, name?, avatar?}``; uids are
    positive. Returns the member and its normalised form for the ``create`` notification."""
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


def parse_members(
    entries: list[Any], settings: Settings
) -> tuple[list[MemberSpec], list[int | dict[str, Any]]]:
    """Member entries, at most ``PARLEY_MAX_MEMBERS_PER_REQUEST`` of them, their names and
    avatars within their limits."""
    check_count(entries, settings.max_members_per_request)
    parsed = [parse_member(entry) for entry in entries]
    for spec, _ in parsed:
        check_length(spec.name, settings.max_name_length)
        check_length(spec.avatar, settings.max_avatar_length)
    return [spec for spec, _ in parsed], [given for _, given in parsed]


def check_group_size(
    settings: Settings, specs: Sequence[MemberSpec], *, group: Group | None, is_super: bool
) -> None:
    """The group (``group``; None for a new one) stays within its member limit once ``specs``
    join. For an existing group this runs as a rule of the change itself (``size_rule``), on
    the state the change is written on, so concurrent additions cannot overshoot it."""
    current = set(group.members) if group is not None else set()
    after = len(current | {spec.uid for spec in specs})
    limit = settings.max_super_group_members if is_super else settings.max_group_members
    if after > limit:
        raise InvalidParam()


def size_rule(settings: Settings, specs: Sequence[MemberSpec], first: Check | None = None) -> Check:
    """``first`` (a §6 rule), then the member limit, as one rule of an add."""

    def check(group: Group) -> None:
        if first is not None:
            first(group)
        check_group_size(settings, specs, group=group, is_super=group.super)

    return check


def parse_add_body(body: Any, settings: Settings) -> tuple[list[MemberSpec], dict[str, Any] | None]:
    """S6's three forms: ``{"members": [...], "inviter": {...}?}``, one member object, or a
    bare array. Of the inviter, only ``uid`` and ``name`` are kept."""
    inviter: dict[str, Any] | None = None
    if isinstance(body, list):
        entries = body
    elif isinstance(body, dict) and "members" in body:
        entries = body["members"]
        if not isinstance(entries, list):
            raise InvalidParam()
        raw = body.get("inviter")
        if raw is not None:
            if not isinstance(raw, dict):
                raise InvalidParam()
            inviter = {}
            if "uid" in raw:
                try:
                    inviter["uid"] = parse_positive_id(raw["uid"])
                except ValueError as exc:
                    raise InvalidParam() from exc
            if "name" in raw:
                name = raw["name"]
                if not isinstance(name, str):
                    raise InvalidParam()
                check_length(name, settings.max_name_length)
                inviter["name"] = name
    elif isinstance(body, dict):
        entries = [body]
    else:
        raise InvalidParam()
    return parse_members(entries, settings)[0], inviter


def parse_remove_body(body: Any, settings: Settings) -> list[MemberSpec]:
    """S8/S27: an array of uids and/or member objects; empty (or ``{}``) is refused."""
    if body == [] or body == {}:
        raise ParleyError(NO_MEMBERS_TO_DELETE)
    if not isinstance(body, list):
        raise InvalidParam()
    return parse_members(body, settings)[0]


def check_group_texts(settings: Settings, name: str | None, notice: str | None = None) -> None:
    check_length(name, settings.max_name_length)
    check_length(notice, settings.max_notice_length)


# ---- rendering ----------------------------------------------------------------------------


async def render_group(
    request: web.Request, group: Group, caller: int, *, members: bool, quiet: bool
) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "id": group.gid,
        "appid": group.appid,
        "master": group.master,
        "super": 1 if group.super else 0,
        "name": group.name,
        "notice": group.notice,
    }
    if members:
        uids = group.uids
        names = await domain(request).user_names(group.appid, uids)
        listed = []
        for uid in uids:
            nickname = group.members[uid].nickname
            item: dict[str, Any] = {
                "uid": uid,
                "name": names.get(uid, ""),
                # The in-group nickname when set, else the user's name (spec S22).
                "nickname": nickname or names.get(uid, ""),
                "avatar": "",
            }
            if nickname:
                item["nickname_in_group"] = nickname
            listed.append(item)
        rendered["members"] = listed
    if quiet:
        member = group.members.get(caller)
        rendered["do_not_disturb"] = bool(member and member.dnd)
    return rendered


# ---- server API (S3–S10) ------------------------------------------------------------------


async def create_group(request: web.Request) -> web.Response:
    appid = await server_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    settings = request.app[SETTINGS]
    check_group_texts(settings, body.name)
    specs, given = parse_members(body.members, settings)
    check_group_size(settings, specs, group=None, is_super=body.super)
    group_id = body.group_id if settings.external_group_id and (body.group_id or 0) > 0 else None
    gid = await domain(request).create(
        appid, body.master, body.name, body.super, specs, given, group_id, request_id_of(request)
    )
    return data({"group_id": gid})


async def rename_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    body = parse_model(RenameRequest, await read_json(request))
    check_group_texts(request.app[SETTINGS], body.name, body.notice)
    rid = request_id_of(request)
    if body.name is not None:
        await domain(request).rename(appid, gid, body.name, rid)
    elif body.notice is not None:  # an extension (spec S4 MAY)
        await domain(request).set_notice(appid, gid, body.notice, rid)
    else:
        raise InvalidParam()
    return empty_ok()


async def disband_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    await domain(request).disband(appid, gid, request_id_of(request))
    return success()


async def add_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    settings = request.app[SETTINGS]
    specs, inviter = parse_add_body(await read_json(request), settings)
    if not specs:
        return empty_ok()  # before the group is even looked up (spec S6)
    await domain(request).add_members(
        appid, gid, specs, inviter, request_id_of(request), check=size_rule(settings, specs)
    )
    return success()


async def remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    appid = await server_auth(request)
    await domain(request).remove_members(appid, gid, [MemberSpec(mid)], request_id_of(request))
    return success()


async def remove_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    specs = parse_remove_body(await read_json(request), request.app[SETTINGS])
    await domain(request).remove_members(appid, gid, specs, request_id_of(request))
    return success()


async def upgrade_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    await domain(request).upgrade(appid, gid, request_id_of(request))
    return success()


async def member_settings(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    appid = await server_auth(request)
    body = parse_model(ServerMemberSettingsRequest, await read_json(request))
    check_length(body.nickname, request.app[SETTINGS].max_nickname_length)
    change = MemberSettings(body.do_not_disturb, body.nickname, body.mute)
    if change.is_empty():
        raise ParleyError(NO_ACTION)
    await domain(request).member_settings(appid, gid, mid, change, request_id_of(request))
    return success()


# ---- client API (S21–S28, X3) -------------------------------------------------------------


async def client_create_group(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    if body.master != owner.uid:
        raise ParleyError(MASTER_MUST_BE_SELF)
    settings = request.app[SETTINGS]
    if body.super and not settings.client_super_groups:
        raise ParleyError(NO_AUTHORITY)
    check_group_texts(settings, body.name)
    specs, given = parse_members(body.members, settings)
    if owner.uid not in {s.uid for s in specs}:
        specs.append(MemberSpec(owner.uid))  # the creator is a member (spec S21)
    check_group_size(settings, specs, group=None, is_super=body.super)
    if not request.app[CREATION_LIMITER].take(owner.appid, owner.uid):
        raise ParleyError(TOO_MANY_GROUPS)
    gid = await domain(request).create(
        owner.appid, owner.uid, body.name, body.super, specs, given, None, request_id_of(request)
    )
    return data({"group_id": gid})


async def client_list_groups(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    fields = {f.strip() for f in request.query.get("fields", "").split(",")}
    groups = [
        await render_group(
            request, group, owner.uid, members="members" in fields, quiet="quiet" in fields
        )
        for group in await domain(request).list_for(owner.appid, owner.uid)
    ]
    return data(groups)


async def client_get_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    group = await domain(request).get(owner.appid, gid)
    GroupsDomain.require_member(owner.uid)(group)
    return data(await render_group(request, group, owner.uid, members=True, quiet=True))


async def client_patch_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    body = parse_model(RenameRequest, await read_json(request))
    if body.name is None and body.notice is None:
        raise ParleyError(PATCH_NOTHING)
    check_group_texts(request.app[SETTINGS], body.name, body.notice)
    groups = domain(request)
    member = GroupsDomain.require_member(owner.uid)
    rid = request_id_of(request)
    if body.name is not None:  # name wins over notice (spec S23)
        await groups.rename(owner.appid, gid, body.name, rid, check=member)
    else:
        check = member
        if request.app[SETTINGS].notice_by_master_only:
            master = GroupsDomain.require_master(owner.uid)

            def check(group: Group) -> None:
                member(group)
                master(group)

        await groups.set_notice(owner.appid, gid, body.notice or "", rid, check=check)
    return success()


async def client_disband_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    await domain(request).disband(
        owner.appid, gid, request_id_of(request), check=GroupsDomain.require_master(owner.uid)
    )
    return success()


async def client_add_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    settings = request.app[SETTINGS]
    specs, _ = parse_add_body(await read_json(request), settings)  # the body's inviter is not taken
    if not specs:
        return empty_ok()
    groups = domain(request)
    member = GroupsDomain.require_member(owner.uid)
    member(await groups.get(owner.appid, gid))  # refused before the inviter's name is read
    names = await groups.user_names(owner.appid, [owner.uid])
    inviter = {"uid": owner.uid, "name": names.get(owner.uid, "")}
    await groups.add_members(
        owner.appid,
        gid,
        specs,
        inviter,
        request_id_of(request),
        check=size_rule(settings, specs, member),
    )
    return success()


async def client_remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    master_must_disband = request.app[SETTINGS].master_must_disband

    def check(group: Group) -> None:
        is_master = group.master == owner.uid
        if mid != owner.uid and not is_master:
            raise ParleyError(NO_AUTHORITY)
        if mid == owner.uid and not group.is_member(owner.uid):
            raise ParleyError(NO_AUTHORITY)  # only a member can leave (spec §6)
        if mid == owner.uid and is_master and master_must_disband and set(group.members) - {mid}:
            raise ParleyError(NO_AUTHORITY)  # the master disbands instead (spec S26)

    await domain(request).remove_members(
        owner.appid, gid, [MemberSpec(mid)], request_id_of(request), check=check
    )
    return success()


async def client_remove_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    groups = domain(request)
    master = GroupsDomain.require_master(owner.uid)
    master(await groups.get(owner.appid, gid))  # refused before the body is read
    specs = parse_remove_body(await read_json(request), request.app[SETTINGS])
    if owner.uid in {s.uid for s in specs}:
        raise ParleyError(NO_AUTHORITY)  # the master leaves by disbanding (spec S27)
    await groups.remove_members(owner.appid, gid, specs, request_id_of(request), check=master)
    return success()


async def client_member_settings(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    if mid != owner.uid:
        raise ParleyError(SETTING_OTHER_FORBIDDEN)
    body = parse_model(ClientMemberSettingsRequest, await read_json(request))
    check_length(body.nickname, request.app[SETTINGS].max_nickname_length)
    dnd = body.quiet if body.quiet is not None else body.do_not_disturb
    change = MemberSettings(do_not_disturb=dnd, nickname=body.nickname)
    if change.is_empty():
        raise ParleyError(NO_ACTION)
    await domain(request).member_settings(
        owner.appid,
        gid,
        mid,
        change,
        request_id_of(request),
        check=GroupsDomain.require_member(owner.uid),
    )
    return success()


# ---- internal API -------------------------------------------------------------------------


async def internal_get_group(request: web.Request) -> web.Response:
    """The group as it is now (or as of ``revision``), for the messages service (404: none in
    that app, or that revision is not committed)."""
    gid = path_id(request, "gid")
    appid = required_query_id(request, "appid")
    revision = query_id(request, "revision")
    groups = domain(request)
    group = (
        await groups.find(appid, gid)
        if revision is None
        else await groups.repo.get_at(appid, gid, revision)
    )
    if group is None:
        raise web.HTTPNotFound()
    return json_response(snapshot(group).model_dump())


# ---- the API description (for /openapi.json) ------------------------------------------------


class MemberObject(BaseModel):
    uid: Id
    name: str | None = None
    avatar: str | None = None


class AddMembersObject(BaseModel):
    members: list[Id | MemberObject]
    inviter: dict[str, Any] | None = None


# S6/S25: an array of members, ``{"members": [...], "inviter": {...}}``, or one member object.
AddMembersBody = list[Id | MemberObject] | AddMembersObject | MemberObject
RemoveMembersBody = list[Id | MemberObject]


class GroupId(BaseModel):
    group_id: int


class MemberView(BaseModel):
    uid: int
    name: str
    nickname: str
    avatar: str
    nickname_in_group: str | None = None


class GroupView(BaseModel):
    id: int
    appid: int
    master: int
    super: Literal[0, 1]
    name: str
    notice: str
    members: list[MemberView] | None = None
    do_not_disturb: bool | None = None


FIELDS = Query("fields", str, "comma-separated extras: members, quiet")

API: dict[str, Operation] = {
    "create_group": Operation("Create a group (S3).", "server", CreateGroupRequest, GroupId),
    "rename_group": Operation(
        "Rename a group (S4); 200 with an empty body.", "server", RenameRequest, answer="empty"
    ),
    "disband_group": Operation("Disband a group (S5).", "server", answer="success"),
    "add_members": Operation("Add members (S6).", "server", AddMembersBody, answer="success"),
    "remove_member": Operation("Remove one member (S7).", "server", answer="success"),
    "remove_members": Operation(
        "Remove members (S8).", "server", RemoveMembersBody, answer="success"
    ),
    "upgrade_group": Operation("Make a group a super group (S9).", "server", answer="success"),
    "member_settings": Operation(
        "A member's settings in a group (S10).",
        "server",
        ServerMemberSettingsRequest,
        answer="success",
    ),
    "client_create_group": Operation(
        "Create a group as its master (S21).", "bearer", CreateGroupRequest, GroupId
    ),
    "client_list_groups": Operation(
        "The caller's groups (S22).", "bearer", data=list[GroupView], query=(FIELDS,)
    ),
    "client_get_group": Operation("One group of the caller's (X3).", "bearer", data=GroupView),
    "client_patch_group": Operation(
        "Rename a group or set its notice (S23).", "bearer", RenameRequest, answer="success"
    ),
    "client_disband_group": Operation("Disband a group (S24).", "bearer", answer="success"),
    "client_add_members": Operation(
        "Add members (S25).", "bearer", AddMembersBody, answer="success"
    ),
    "client_remove_member": Operation(
        "Remove a member, or leave (S26).", "bearer", answer="success"
    ),
    "client_remove_members": Operation(
        "Remove members (S27).", "bearer", RemoveMembersBody, answer="success"
    ),
    "client_member_settings": Operation(
        "The caller's settings in a group (S28).",
        "bearer",
        ClientMemberSettingsRequest,
        answer="success",
    ),
}


HANDLERS = {
    "create_group": create_group,
    "rename_group": rename_group,
    "disband_group": disband_group,
    "add_members": add_members,
    "remove_member": remove_member,
    "remove_members": remove_members,
    "upgrade_group": upgrade_group,
    "member_settings": member_settings,
    "client_create_group": client_create_group,
    "client_list_groups": client_list_groups,
    "client_get_group": client_get_group,
    "client_patch_group": client_patch_group,
    "client_disband_group": client_disband_group,
    "client_add_members": client_add_members,
    "client_remove_member": client_remove_member,
    "client_remove_members": client_remove_members,
    "client_member_settings": client_member_settings,
    "internal_get_group": internal_get_group,
}

# The user-name view: names shown in member lists and quit_group notifications.
CONSUMERS = (
    Consumer(
        "groups.user-names",
        ("token.granted", "user.settings.changed"),
        lambda app: app[GROUPS].on_user_event,
        timeout=30.0,
    ),
)


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        repo = GroupsRepository(app[DB])
        migrated = await repo.migrate()
        if migrated:
            log.info("groups rewritten as logs from the previous shape", count=migrated)
        groups = GroupsDomain(repo, app[BUS])
        app[GROUPS] = groups
        app[CREATION_LIMITER] = CreationLimiter(app[SETTINGS].client_groups_per_minute)
        if deps.groups is None:
            deps.groups = LocalGroupDirectory(groups)
        yield

    app.cleanup_ctx.extend(
        [
            database_ctx(deps, INDEXES),
            bus_ctx(deps, SERVICE),
            verifier_ctx(deps),
            domain_ctx,
            consumers_ctx(*CONSUMERS),
            outbox_ctx(lambda app: [app[GROUPS].repo.log]),
        ]
    )
    return app


SPEC = ServiceSpec(
    SERVICE, create_app, provides=frozenset({"groups"}), needs=frozenset({"verifier"})
)
