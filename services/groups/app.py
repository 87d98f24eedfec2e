"""The groups service: server-side group management (S3-S10, Basic), client-side group
management (S21-S28 and X3, Bearer) with spec §6's rules, ``group.*`` events, and the internal
API the messages service reads current membership from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel

from shared.auth import client_auth, server_auth
from shared.http import (
    data,
    empty_ok,
    parse_model,
    path_id,
    query_id,
    read_json,
    required_query_id,
    success,
)
from shared.ids import Id
from shared.jsonio import json_response
from shared.lifecycle import Consumer, ServiceSpec, consumers_ctx
from shared.logs import request_id_of
from shared.openapi import Operation, Query
from shared.settings import Settings
from shared.web import (
    BUS,
    DB,
    Deps,
    outbox_ctx,
    service_app,
    service_steps,
)

from .domain import GroupsDomain, LocalGroupDirectory, snapshot
from .model import Group
from .repository import INDEXES, GroupsRepository
from .requests import (
    ClientMemberSettingsRequest,
    CreateGroupRequest,
    RenameRequest,
    ServerMemberSettingsRequest,
    parse_add_body,
    parse_remove_body,
)
from .rules import MemberSpec, check_own_settings

log = structlog.get_logger("parley.groups")

SERVICE = "groups"
GROUPS = web.AppKey("groups_domain", GroupsDomain)


def domain(request: web.Request) -> GroupsDomain:
    return request.app[GROUPS]


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


async def server_group_call(request: web.Request) -> tuple[int, int, str]:
    """The path's group, then scheme A: the app, the group and the request's id."""
    gid = path_id(request, "gid")
    return await server_auth(request), gid, request_id_of(request)


async def create_group(request: web.Request) -> web.Response:
    appid = await server_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    gid = await domain(request).do_create_group(
        appid, body.new_group(), body.group_id, request_id_of(request)
    )
    return data({"group_id": gid})


async def rename_group(request: web.Request) -> web.Response:
    appid, gid, rid = await server_group_call(request)
    body = parse_model(RenameRequest, await read_json(request))
    await domain(request).do_update_group(appid, gid, body.name, body.notice, rid)
    return empty_ok()


async def disband_group(request: web.Request) -> web.Response:
    appid, gid, rid = await server_group_call(request)
    await domain(request).disband(appid, gid, rid)
    return success()


async def add_members(request: web.Request) -> web.Response:
    appid, gid, rid = await server_group_call(request)
    body = parse_add_body(await read_json(request))
    added = await domain(request).do_add_members(appid, gid, body.members, body.inviter, rid)
    return success() if added else empty_ok()  # nothing listed: empty 200 (spec S6)


async def remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    appid = await server_auth(request)
    await domain(request).remove_members(appid, gid, [MemberSpec(mid)], request_id_of(request))
    return success()


async def remove_members(request: web.Request) -> web.Response:
    appid, gid, rid = await server_group_call(request)
    members = parse_remove_body(await read_json(request))
    await domain(request).do_remove_members(appid, gid, members, rid)
    return success()


async def upgrade_group(request: web.Request) -> web.Response:
    appid, gid, rid = await server_group_call(request)
    await domain(request).upgrade(appid, gid, rid)
    return success()


async def member_settings(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    appid = await server_auth(request)
    body = parse_model(ServerMemberSettingsRequest, await read_json(request))
    await domain(request).do_member_settings(appid, gid, mid, body.change(), request_id_of(request))
    return success()


# ---- client API (S21–S28, X3) -------------------------------------------------------------


async def client_create_group(request: web.Request) -> web.Response:
    owner = await client_auth(request)
    body = parse_model(CreateGroupRequest, await read_json(request))
    groups = domain(request)
    groups.check_client_create(owner.uid, body.master, body.super)  # before members are parsed
    gid = await groups.do_client_create_group(
        owner.appid, owner.uid, body.new_group(), request_id_of(request)
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
    group = await domain(request).get_as_member(owner.appid, gid, owner.uid)
    return data(await render_group(request, group, owner.uid, members=True, quiet=True))


async def client_patch_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    body = parse_model(RenameRequest, await read_json(request))
    await domain(request).do_client_update_group(
        owner.appid, owner.uid, gid, body.name, body.notice, request_id_of(request)
    )
    return success()


async def client_disband_group(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    await domain(request).do_client_disband(owner.appid, owner.uid, gid, request_id_of(request))
    return success()


async def client_add_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    body = parse_add_body(await read_json(request))
    added = await domain(request).do_client_add_members(
        owner.appid, owner.uid, gid, body.members, body.inviter, request_id_of(request)
    )
    return success() if added else empty_ok()


async def client_remove_member(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    await domain(request).do_client_remove_member(
        owner.appid, owner.uid, gid, mid, request_id_of(request)
    )
    return success()


async def client_remove_members(request: web.Request) -> web.Response:
    gid = path_id(request, "gid")
    owner = await client_auth(request)
    groups = domain(request)
    await groups.check_master_of(owner.appid, gid, owner.uid)  # before the body is read
    members = parse_remove_body(await read_json(request))
    await groups.do_client_remove_members(
        owner.appid, owner.uid, gid, members, request_id_of(request)
    )
    return success()


async def client_member_settings(request: web.Request) -> web.Response:
    gid, mid = path_id(request, "gid"), path_id(request, "mid")
    owner = await client_auth(request)
    check_own_settings(owner.uid, mid)  # before the body is read
    body = parse_model(ClientMemberSettingsRequest, await read_json(request))
    await domain(request).do_client_member_settings(
        owner.appid, owner.uid, gid, body.change(), request_id_of(request)
    )
    return success()


# ---- internal API -------------------------------------------------------------------------


async def internal_get_group(request: web.Request) -> web.Response:
    """The group as it is now (or as of ``revision``), for the messages service (404: none in
    that app, or that revision is not committed)."""
    gid = path_id(request, "gid")
    appid = required_query_id(request, "appid")
    group = await domain(request).find_group(appid, gid, query_id(request, "revision"))
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
        groups = GroupsDomain(repo, app[BUS], settings)
        app[GROUPS] = groups
        if deps.groups is None:
            deps.groups = LocalGroupDirectory(groups)
        yield

    app.cleanup_ctx.extend(
        service_steps(
            deps,
            SERVICE,
            INDEXES,
            domain_ctx,
            consumers_ctx(*CONSUMERS),
            outbox_ctx(lambda app: [app[GROUPS].repo.log]),
        )
    )
    return app


SPEC = ServiceSpec(
    SERVICE, create_app, provides=frozenset({"groups"}), needs=frozenset({"verifier"})
)
