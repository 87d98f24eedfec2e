"""One error type, one envelope: ``{"meta": {"code": <status>, "message": "..."}}`` (spec §1.3).

Domain code raises ``ParleyError``; ``error_middleware`` renders it. Routing misses become the
reference's bare ``{"meta":{"code":404}}`` / ``{"meta":{"code":405}}``; anything unexpected is
logged with its traceback and answered with a generic 500, never with its details.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from pymongo.errors import ConnectionFailure, ExecutionTimeout, PyMongoError, WaitQueueTimeoutError

from shared.jsonio import json_response

log = structlog.get_logger("parley.errors")

# The reference's messages (spec §1.3), reused verbatim: clients log and compare them.
JSON_DECODE_ERROR = "json decode error"
INVALID_PARAM = "invalid param"
INVALID_APPID = "非法的appid"
INVALID_IP = "非法的ip"
INVALID_TOKEN = "非法的access token"
INVALID_AUTHORIZATION = "非法的authorization"
DISABLED_APPID = "disabled appid"
GROUP_NON_EXISTS = "group non exists"
NO_MEMBERS_TO_DELETE = "no memebers to delete"  # sic: the reference's spelling
NO_ACTION = "no action"
PATCH_NOTHING = "patch nothing"
MASTER_MUST_BE_SELF = "master must be self"
NO_AUTHORITY = "no authority"
SETTING_OTHER_FORBIDDEN = "setting other is forbidden"
APP_NO_CUSTOMER = "app do not support customer"
REQUIRE_STORE_ID = "require store_id param"
STORE_NO_SUPPORTER = "store no supporter"
INVALID_UID = "invalid uid"
# Parley's own 503s (not in the reference): a dependency down, or the request deadline hit.
STORE_UNAVAILABLE = "store unavailable"
DEADLINE_EXCEEDED = "request deadline exceeded"


class ParleyError(Exception):
    """A refused request: its HTTP status, its message, and optional extra top-level keys."""

    def __init__(self, message: str, status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {**self.extra, "meta": {"code": self.status, "message": self.message}}


class InvalidParam(ParleyError):
    def __init__(self, message: str = INVALID_PARAM) -> None:
        super().__init__(message)


class InvalidToken(ParleyError):
    """Bearer failures carry an extra top-level ``error`` key (spec §1.2, scheme C)."""

    def __init__(self) -> None:
        super().__init__(INVALID_TOKEN, error=INVALID_TOKEN)


def envelope(status: int, message: str | None = None) -> web.Response:
    meta: dict[str, Any] = {"code": status}
    if message is not None:
        meta["message"] = message
    return json_response({"meta": meta}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ParleyError as exc:
        log.info("request refused", status=exc.status, reason=exc.message)
        return json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status in (404, 405):
            # The reference leaves `message` out of these two (spec §1.3).
            response = envelope(exc.status)
            if exc.status == 405 and "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        if exc.status >= 400:
            return envelope(exc.status, exc.reason)
        raise
    except ConnectionResetError:
        # The client went away mid-request: nothing to answer, nothing to debug.
        log.info("client disconnected", path=request.path)
        return envelope(499, "client disconnected")  # never delivered: the client is gone
    except PyMongoError as exc:
        if not store_unavailable(exc):
            log.exception("unhandled error")
            return envelope(500, "internal server error")
        log.warning("store unavailable", error=type(exc).__name__)
        return envelope(503, STORE_UNAVAILABLE)
    except Exception:
        log.exception("unhandled error")
        return envelope(500, "internal server error")


def store_unavailable(exc: BaseException) -> bool:
    """True for a store that does not answer (in time): no server, a lost connection, a
    deadline hit. Those are a 503, not a bug."""
    return isinstance(exc, (ConnectionFailure, ExecutionTimeout, WaitQueueTimeoutError)) or (
        isinstance(exc, PyMongoError) and exc.timeout
    )
