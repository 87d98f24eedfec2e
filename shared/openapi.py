"""The OpenAPI 3.1 document of the public API, generated from the routing table and the
pydantic models the handlers parse and render (never written by hand).

Each service describes its handlers in an ``API`` mapping (handler name -> ``Operation``):
summary, credentials, request body model, the ``data`` model of its 200 answer, query
parameters. ``build_document`` walks ``shared/routing.py``, so the document lists exactly the
routed methods and paths; a row without a description is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

from shared.routing import ROUTES, openapi_path

Auth = Literal["server", "appkey", "bearer", "server_or_bearer", "optional_appkey", "none"]
# What a 200 carries: a model under "data", {"success": true}, or an empty body.
Answer = Literal["data", "success", "empty", "document"]


@dataclass(frozen=True)
class Query:
    name: str
    type: Any
    description: str
    required: bool = False


@dataclass(frozen=True)
class Operation:
    summary: str
    auth: Auth
    request: Any = None  # a pydantic model or any type pydantic can describe
    data: Any = None  # the type of the 200 answer's "data"
    answer: Answer = "data"
    query: tuple[Query, ...] = field(default_factory=tuple)


PREFLIGHT = Operation("CORS preflight: 200, empty, no credentials.", "none", answer="empty")


class ErrorMeta(BaseModel):
    model_config = ConfigDict(title="ErrorMeta")

    code: int
    message: str | None = None


class ErrorEnvelope(BaseModel):
    """Every refusal: ``meta.code`` is the HTTP status. Bearer failures add ``error``."""

    meta: ErrorMeta
    error: str | None = None


class Success(BaseModel):
    success: Literal[True]


SECURITY_SCHEMES = {
    "serverBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "Server calls: HTTP Basic with the appid as user name and the hex MD5 "
        "of the app secret as password.",
    },
    "appKeyBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "HTTP Basic with the appid as user name and the app key as password.",
    },
    "bearerToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "Client calls: a user's permanent token from POST /auth/grant.",
    },
}

SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "server": [{"serverBasic": []}],
    "appkey": [{"appKeyBasic": []}],
    "bearer": [{"bearerToken": []}],
    "server_or_bearer": [{"serverBasic": []}, {"bearerToken": []}],
    "optional_appkey": [{}, {"appKeyBasic": []}],
    "none": [],
}

_PARAM = re.compile(r"\{(\w+)(?::[^{}]+)?\}")
REF = "#/components/schemas/{model}"


class _Schemas:
    """Collects component schemas; returns a ``$ref`` (or an inline schema) for a type."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, kind: Any, mode: Literal["validation", "serialization"]) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=REF, mode=mode)
        self.components.update(schema.pop("$defs", {}))
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            name = kind.__name__
            self.components[name] = schema
            return {"$ref": REF.format(model=name)}
        return schema


def path_and_params(path: str) -> tuple[str, list[str]]:
    """aiohttp's ``/groups/{gid:[0-9]+}`` -> (``/groups/{gid}``, ``["gid"]``)."""
    return openapi_path(path), _PARAM.findall(path)


def _responses(op: Operation, schemas: _Schemas) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "Done."}
    if op.answer == "data":
        data = schemas.of(op.data, "serialization")
        ok["content"] = {
            "application/json": {
                "schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}
            }
        }
    elif op.answer == "document":
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}
    elif op.answer == "success":
        ok["content"] = {"application/json": {"schema": schemas.of(Success, "serialization")}}
    error = {
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorEnvelope")}}}
    }
    return {
        "200": ok,
        "400": {"description": "Bad input or credentials; nothing changed.", **error},
        "404": {"description": "No such path (or object).", **error},
        "503": {
            "description": "A dependency did not answer, or the request deadline passed.",
            **error,
        },
        "default": {"description": "The error envelope.", **error},
    }


def build_document(
    api: Mapping[str, Mapping[str, Operation]], *, version: str, server_url: str | None = None
) -> dict[str, Any]:
    """The document for ``api`` (service -> handler name -> ``Operation``); raises LookupError
    for a routing-table row that no ``Operation`` describes."""
    schemas = _Schemas()
    schemas.of(ErrorEnvelope, "serialization")
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op = (
            PREFLIGHT
            if route.method == "OPTIONS"
            else api.get(route.service, {}).get(route.handler)
        )
        if op is None:
            raise LookupError(f"no API description for {route.service}.{route.handler}")
        path, params = path_and_params(route.path)
        operation: dict[str, Any] = {
            "operationId": route.handler,
            "summary": op.summary,
            "tags": [route.service],
            "security": SECURITY[op.auth],
            "responses": _responses(op, schemas),
        }
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 0, "format": "int64"},
            }
            for name in params
        ] + [
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "description": q.description,
                "schema": schemas.of(q.type, "validation"),
            }
            for q in op.query
        ]
        if parameters:
            operation["parameters"] = parameters
        if op.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.of(op.request, "validation")}},
            }
        paths.setdefault(path, {})[route.method.lower()] = operation
    _unique_operation_ids(paths)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Parley",
            "version": version,
            "description": "The GoBelieve IM REST API as Parley serves it. Every refusal is "
            'the envelope {"meta":{"code":<status>,"message":"..."}}.',
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def _unique_operation_ids(paths: dict[str, dict[str, Any]]) -> None:
    """Handlers serving several rows (``/v2/...``, preflights) get one id per row."""
    seen: dict[str, int] = {}
    for path, operations in paths.items():
        for method, operation in operations.items():
            base = operation["operationId"]
            if method == "options":
                base = "preflight_" + re.sub(r"\W+", "_", path).strip("_")
            count = seen.get(base, 0)
            seen[base] = count + 1
            operation["operationId"] = base if count == 0 else f"{base}_{count + 1}"
