"""Request parsing shared by every handler: JSON bodies and pydantic models.

The body is parsed as JSON whatever ``Content-Type`` says (spec §1.1). Invalid or empty JSON is
400 ``json decode error``; a body that does not fit the endpoint's model is 400
``invalid param``. Neither changes anything.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.errors import JSON_DECODE_ERROR, InvalidParam, ParleyError
from shared.ids import parse_id
from shared.jsonio import json_response

M = TypeVar("M", bound=BaseModel)

MAX_BODY = 1024 * 1024


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise ParleyError(JSON_DECODE_ERROR)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParleyError(JSON_DECODE_ERROR) from exc


def parse_model(model: type[M], data: Any, message: str | None = None) -> M:
    if not isinstance(data, dict):
        raise InvalidParam() if message is None else InvalidParam(message)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise (InvalidParam() if message is None else InvalidParam(message)) from exc


async def read_model(request: web.Request, model: type[M]) -> M:
    return parse_model(model, await read_json(request))


def path_id(request: web.Request, name: str) -> int:
    """A path id (the route's pattern already requires digits); too large is 404, as no match."""
    try:
        return parse_id(request.match_info[name])
    except ValueError as exc:
        raise web.HTTPNotFound() from exc


def query_id(request: web.Request, name: str) -> int | None:
    """An optional id in the query string (None when absent or empty); 400 when malformed."""
    raw = request.query.get(name, "")
    if raw == "":
        return None
    try:
        return parse_id(raw)
    except ValueError as exc:
        raise InvalidParam() from exc


def required_query_id(request: web.Request, name: str) -> int:
    value = query_id(request, name)
    if value is None:
        raise InvalidParam()
    return value


def empty_ok() -> web.Response:
    """200 with an empty body: the shape of S2, S4 and the message endpoints (spec §1.3)."""
    return web.Response(status=200)


def success() -> web.Response:
    return json_response({"success": True})


def data(value: Any) -> web.Response:
    return json_response({"data": value})
