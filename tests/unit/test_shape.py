"""The handlers' shape, read from their source (no servers): a handler in ``services/*/app.py``
authenticates, parses, makes a domain call and renders. It never reads a setting (the domain
holds the policy), a raw stored document, or a repository (the domain owns its storage).

Every module-level function of a service's ``app.py`` is checked (handlers and the helpers
they use), except ``create_app``: the factory builds the domain from the settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shared.routing import SERVICES

ROOT = Path(__file__).resolve().parents[2]
HANDLER_MODULES = sorted((ROOT / "services").glob("*/app.py"))
FACTORY = "create_app"

SETTING_NAMES = {"SETTINGS", "settings", "Settings"}
SETTING_ATTRIBUTES = {"settings", "policy"}
STORE_CALLS = {
    "find",
    "find_one",
    "find_one_and_update",
    "find_one_and_delete",
    "find_one_and_replace",
    "insert_one",
    "insert_many",
    "update_one",
    "update_many",
    "replace_one",
    "delete_one",
    "delete_many",
    "count_documents",
    "aggregate",
    "bulk_write",
}
STORE_NAMES = {"DB", "db", "collection", "Collection", "Database"}


def offences(source: str, filename: str = "<source>") -> list[str]:
    """What the module-level functions of ``source`` (other than ``create_app``) do that a
    handler must not, as ``"<function>:<line>: <what>"``."""
    found: list[str] = []
    for top in ast.parse(source, filename).body:
        if not isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef) or top.name == FACTORY:
            continue
        for node in ast.walk(top):
            what = _offence(node)
            if what is not None:
                found.append(f"{top.name}:{getattr(node, 'lineno', top.lineno)}: {what}")
    return found


def _offence(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        if node.id in SETTING_NAMES:
            return f"reads a setting ({node.id})"
        if node.id.endswith("Repository"):
            return f"uses a repository ({node.id})"
        if node.id in STORE_NAMES:
            return f"reaches the store ({node.id})"
    elif isinstance(node, ast.Attribute):
        if node.attr in SETTING_ATTRIBUTES:
            return f"reads a setting (.{node.attr})"
        if node.attr == "repo" or node.attr.endswith("Repository"):
            return f"uses a repository (.{node.attr})"
        if node.attr in STORE_CALLS:
            return f"reads or writes raw documents (.{node.attr})"
        if node.attr in STORE_NAMES:
            return f"reaches the store (.{node.attr})"
    elif isinstance(node, ast.Subscript):
        index = node.slice
        if isinstance(index, ast.Constant) and index.value == "_id":
            return 'reads a raw document (["_id"])'
    return None


@pytest.mark.parametrize("path", HANDLER_MODULES, ids=lambda p: p.parent.name)
def test_handlers_read_no_setting_no_document_and_no_repository(path: Path) -> None:
    assert offences(path.read_text(), str(path)) == []


def test_every_service_has_handlers_to_check() -> None:
    names = {p.parent.name for p in HANDLER_MODULES}
    assert {"auth", "customer", "groups", "messages"} <= names
    for path in HANDLER_MODULES:
        if path.parent.name not in SERVICES:  # the delivery service serves no HTTP route
            continue
        tree = ast.parse(path.read_text())
        handlers = [
            n for n in tree.body if isinstance(n, ast.AsyncFunctionDef) and n.name != FACTORY
        ]
        assert handlers, path


OFFENDING = """
async def reads_settings(request):
    limit = request.app[SETTINGS].max_name_length

async def reads_settings_object(request, settings):
    return settings.kefu_appid

async def reads_policy(request):
    return domain(request).policy.max_content_bytes

async def calls_repo(request):
    return await domain(request).repo.page(1, "u:1", 0, 10)

async def builds_repository(request):
    return GroupsRepository(request.app[DB])

async def finds(request):
    doc = await request.app[DB]["groups"].find_one({"_id": "1"})
    return doc["_id"]

async def writes(request, collection):
    await collection.update_one({}, {"$set": {"a": 1}})

def helper(request):
    return [d async for d in request.app[DB]["x"].find({})]
"""

CLEAN = """
async def handler(request):
    appid = await server_auth(request)
    body = await read_model(request, Body)
    found = await domain(request).find_group(appid, body.gid)
    return data({"id": found.gid})

def create_app(settings):
    repo = GroupsRepository(app[DB])
    return settings.max_name_length
"""


def test_the_walker_flags_each_kind_of_offence() -> None:
    found = offences(OFFENDING)
    flagged = {entry.split(":", 1)[0] for entry in found}
    assert flagged == {
        "reads_settings",
        "reads_settings_object",
        "reads_policy",
        "calls_repo",
        "builds_repository",
        "finds",
        "writes",
        "helper",
    }
    assert any('["_id"]' in entry for entry in found)
    assert any(".find_one" in entry for entry in found)
    assert any(".update_one" in entry for entry in found)


def test_the_walker_passes_a_clean_handler_and_the_factory() -> None:
    assert offences(CLEAN) == []
