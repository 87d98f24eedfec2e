"""The groups service: server-side group management (S3-S10, Basic), client-side group
management (S21-S28 and X3, Bearer) with spec §6's rules, ``group.*`` events, and the internal
API the messages service reads current membership from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

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
from shared.events import Event
from shared.http import (
    data,
    empty_ok,
    parse_model,
    path_id,
    read_json,
    required_query_id,
    success,
)
from shared.ids import Flag, Id, Text, parse_id
from shared.jsonio import json_response
from shared.logs import request_id_of
from shared.mongo import Document
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
    require_internal,
    service_app,
    verifier_ctx,
)

from .domain import GroupsDomain, LocalGroupDirectory, MemberSettings, MemberSpec, snapshot
from .repository import INDEXES, GroupsRepository

SERVICE = "groups"
GROUPS = web.AppKey("groups_domain", GroupsDomain)


def domain(request: web.Request) -> GroupsDomain:
    return request.app[GROUPS]


# ---- request bodies -----------------------------------------------------------------------


class CreateGroupRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    master: Id
    name: Text
    super: Flag = False
    members: list[Any]
    group_id: Id | None = None


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
            uid = parse_id(entry.get("uid"))
            name, avatar = entry.get("name"), entry.get("avatar")
            if name is not None and not isinstance(name, str):
                raise ValueError("name")
            if avatar is not None and not isinstance(avatar, str):
                raise ValueError("avatar")
            given = {"uid": uid, **{k: v for k, v in (("name", name), ("avatar", avatar)) if v}}
            spec = MemberSpec(uid, name, avatar)
        else:
            uid = parse_id(entry)
            spec, given = MemberSpec(uid), uid
    except ValueError as exc:
        raise InvalidParam() from exc
    if uid <= 0:
        raise InvalidParam()
    return spec, given


def parse_members(entries: list[Any]) -> tuple[list[MemberSpec], list[int | dict[str, Any]]]:
    parsed = [parse_member(entry) for entry in entries]
    return [spec for spec, _ in parsed], [given for _, given in parsed]


def parse_add_body(body: Any) -> tuple[list[MemberSpec], dict[str, Any] | None]:
    """S6's three forms: ``{"members": [...], "inviter": {...}?}``, one member object, or a
    bare array."""
    inviter = None
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
            inviter = dict(raw)
            if "uid" in inviter:
                try:
                    inviter["uid"] = parse_id(inviter["uid"])
                except ValueError as exc:
                    raise InvalidParam() from exc
    elif isinstance(body, dict):
        entries = [body]
    else:
        raise InvalidParam()
    return parse_members(entries)[0], inviter


def parse_remove_body(body: Any) -> list[MemberSpec]:
    """S8/S27: an array of uids and/or member objects; empty (or ``{}``) is refused."""
    if body == [] or body == {}:
        raise ParleyError(NO_MEMBERS_TO_DELETE)
    if not isinstance(body, list):
        raise InvalidParam()
    return parse_members(body)[0]


# ---- rendering ----------------------------------------------------------------------------


async def render_group(
    request: web.Request, doc: Document, caller: int, *, members: bool, quiet: bool
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "id": doc["_id"],
        "appid": doc["appid"],
        "master": doc["master"],
        "super": 1 if doc["super"] else 0,
        "name": doc["name"],
        "notice": doc.get("notice") or "",
    }
    entries: dict[str, Any] = doc.get("members", {})
    if members:
        uids = sorted(int(uid) for uid in entries)
        names = await domain(request).user_names(doc["appid"], uids)
        listed = []
        for uid in uids:
            nickname = entries[str(uid)].get("nickname")
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
        group["members"] = listed
    if quiet:
        group["do_not_disturb"] = bool(entries.get(str(caller), {}).get("dnd", False))
    return group


# ---- server API (S3–S10) ------------------------------------------------------------------


async def create_group(request: web.Request) -> web.Response:
    appid = await server_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    specs, given = parse_members(body.members)
    settings = request.app[SETTINGS]
    group_id = body.group_id if settings.external_group_id and (body.group_id or 0) > 0 else None
    gid = await domain(request).create(
        appid, body.master, body.name, body.super, specs, given, group_id, request_id_of(request)
    )
    return data({"group_id": gid})


async def rename_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    body = parse_model(RenameRequest, await read_json(request))
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
    specs, inviter = parse_add_body(await read_json(request))
    if not specs:
        return empty_ok()  # before the group is even looked up (spec S6)
    await domain(request).add_members(appid, gid, specs, inviter, request_id_of(request))
    return success()


async def remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    appid = await server_auth(request)
    await domain(request).remove_members(appid, gid, [MemberSpec(mid)], request_id_of(request))
    return success()


async def remove_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    appid = await server_auth(request)
    specs = parse_remove_body(await read_json(request))
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
    change = MemberSettings(body.do_not_disturb, body.nickname, body.mute)
    if change.is_empty():
        raise ParleyError(NO_ACTION)
    await domain(request).get(appid, gid)  # an unknown group answers before the member check
    await domain(request).member_settings(appid, gid, mid, change, request_id_of(request))
    return success()


# ---- client API (S21–S28, X3) -------------------------------------------------------------


async def client_create_group(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    if body.master != owner.uid:
        raise ParleyError(MASTER_MUST_BE_SELF)
    specs, given = parse_members(body.members)
    if owner.uid not in {s.uid for s in specs}:
        specs.append(MemberSpec(owner.uid))  # the creator is a member (spec S21)
    gid = await domain(request).create(
        owner.appid, owner.uid, body.name, body.super, specs, given, None, request_id_of(request)
    )
    return data({"group_id": gid})


async def client_list_groups(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    fields = {f.strip() for f in request.query.get("fields", "").split(",")}
    docs = await domain(request).list_for(owner.appid, owner.uid)
    groups = [
        await render_group(
            request, doc, owner.uid, members="members" in fields, quiet="quiet" in fields
        )
        for doc in docs
    ]
    return data(groups)


async def client_get_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    doc = await domain(request).get(owner.appid, gid)
    GroupsDomain.require_member(doc, owner.uid)
    return data(await render_group(request, doc, owner.uid, members=True, quiet=True))


async def client_patch_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    body = parse_model(RenameRequest, await read_json(request))
    if body.name is None and body.notice is None:
        raise ParleyError(PATCH_NOTHING)
    groups = domain(request)
    doc = await groups.get(owner.appid, gid)
    groups.require_member(doc, owner.uid)
    rid = request_id_of(request)
    if body.name is not None:  # name wins over notice (spec S23)
        await groups.rename(owner.appid, gid, body.name, rid)
    else:
        if request.app[SETTINGS].notice_by_master_only:
            groups.require_master(doc, owner.uid)
        await groups.set_notice(owner.appid, gid, body.notice or "", rid)
    return success()


async def client_disband_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    groups = domain(request)
    groups.require_master(await groups.get(owner.appid, gid), owner.uid)
    await groups.disband(owner.appid, gid, request_id_of(request))
    return success()


async def client_add_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    specs, _ = parse_add_body(await read_json(request))  # the body's inviter is not taken
    if not specs:
        return empty_ok()
    groups = domain(request)
    groups.require_member(await groups.get(owner.appid, gid), owner.uid)
    names = await groups.user_names(owner.appid, [owner.uid])
    inviter = {"uid": owner.uid, "name": names.get(owner.uid, "")}
    await groups.add_members(owner.appid, gid, specs, inviter, request_id_of(request))
    return success()


async def client_remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    groups = domain(request)
    doc = await groups.get(owner.appid, gid)
    is_master = int(doc["master"]) == owner.uid
    if mid != owner.uid and not is_master:
        raise ParleyError(NO_AUTHORITY)
    if (
        mid == owner.uid
        and is_master
        and request.app[SETTINGS].master_must_disband
        and set(doc.get("members", {})) - {str(mid)}
    ):
        raise ParleyError(NO_AUTHORITY)  # the master disbands instead (spec S26)
    await groups.remove_members(owner.appid, gid, [MemberSpec(mid)], request_id_of(request))
    return success()


async def client_remove_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    groups = domain(request)
    groups.require_master(await groups.get(owner.appid, gid), owner.uid)  # before the body
    specs = parse_remove_body(await read_json(request))
    if owner.uid in {s.uid for s in specs}:
        raise ParleyError(NO_AUTHORITY)  # the master leaves by disbanding (spec S27)
    await groups.remove_members(owner.appid, gid, specs, request_id_of(request))
    return success()


async def client_member_settings(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    if mid != owner.uid:
        raise ParleyError(SETTING_OTHER_FORBIDDEN)
    body = parse_model(ClientMemberSettingsRequest, await read_json(request))
    dnd = body.quiet if body.quiet is not None else body.do_not_disturb
    change = MemberSettings(do_not_disturb=dnd, nickname=body.nickname)
    if change.is_empty():
        raise ParleyError(NO_ACTION)
    groups = domain(request)
    groups.require_member(await groups.get(owner.appid, gid), owner.uid)
    await groups.member_settings(owner.appid, gid, mid, change, request_id_of(request))
    return success()


# ---- internal API -------------------------------------------------------------------------


async def internal_get_group(request: web.Request) -> web.Response:
    """The group as it is now, for the messages service (404: none in that app)."""
    require_internal(request)
    gid = path_id(request, "gid")
    appid = required_query_id(request, "appid")
    doc = await domain(request).repo.get(appid, gid)
    if doc is None:
        raise web.HTTPNotFound()
    return json_response(snapshot(doc).model_dump())


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
}


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, HANDLERS)
    app.router.add_get("/internal/groups/{gid:[0-9]+}", internal_get_group)

    async def domain_ctx(app: web.Application) -> AsyncIterator[None]:
        groups = GroupsDomain(GroupsRepository(app[DB]), app[BUS], app[SETTINGS])
        app[GROUPS] = groups
        if deps.groups is None:
            deps.groups = LocalGroupDirectory(groups)

        async def on_user_event(event: Event) -> None:
            await groups.on_user_event(event)

        # The user-name view: names shown in member lists and quit_group notifications.
        subscription = await app[BUS].subscribe(
            f"{settings.amqp_exchange}.groups.user-names",
            ["token.granted", "user.settings.changed"],
            on_user_event,
        )
        try:
            yield
        finally:
            await subscription.cancel()

    app.cleanup_ctx.extend(
        [
            database_ctx(deps, INDEXES),
            bus_ctx(deps, SERVICE),
            verifier_ctx(deps),
            domain_ctx,
            outbox_ctx(lambda db: GroupsRepository(db).outbox_collections()),
        ]
    )
    return app
