"""Request parsing shared by every handler: JSON bodies and pydantic models.

The body is parsed as JSON whatever ``Content-Type`` says (spec §1.1). Invalid or empty JSON is
400 ``json decode error``, and so is JSON that Parley refuses to decode: nested deeper than
``MAX_JSON_DEPTH`` (checked before parsing), an integer longer than ``MAX_INT_DIGITS`` digits
(checked before it is converted), a number too large for a float, ``NaN`` or ``Infinity``. A
string anywhere in the body with a lone UTF-16 surrogate (``"\ud83d"``: valid JSON, but no text
can be stored from it) is 400 ``invalid param``; so is a body that does not fit the endpoint's
model. None of these changes anything.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.errors import JSON_DECODE_ERROR, InvalidParam, ParleyError
from shared.ids import parse_id
from shared.jsonio import json_response

M = TypeVar("M", bound=BaseModel)

MAX_BODY = 1024 * 1024
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 64

# A JSON string literal (escapes included), and the characters that open or close a level.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` nests arrays and objects (brackets inside strings do not count);
    computed without parsing, so it is safe on any input."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for char in brackets:
        if char in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break  # enough to refuse it
        else:
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("integer too long")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def has_lone_surrogate(value: Any) -> bool:
    """True if any string (or object key) in a decoded JSON value holds a UTF-16 surrogate:
    the decoder joins valid pairs, so whatever remains is unpaired."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def decode_json(raw: bytes) -> Any:
    """The body as JSON, or the ``ParleyError`` it gets (see the module's docstring)."""
    if not raw.strip():
        raise ParleyError(JSON_DECODE_ERROR)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ParleyError(JSON_DECODE_ERROR)
    try:
        value = json.loads(
            raw, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeError included
        raise ParleyError(JSON_DECODE_ERROR) from exc
    if has_lone_surrogate(value):
        raise InvalidParam()
    return value


async def read_json(request: web.Request) -> Any:
    return decode_json(await request.read())


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
    """A path id (the route's pattern already requires digits); too large is 404, as no match;
    0 is 400 ``invalid param`` (ids are positive)."""
    try:
        value = parse_id(request.match_info[name])
    except ValueError as exc:
        raise web.HTTPNotFound() from exc
    if value <= 0:
        raise InvalidParam()
    return value


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
