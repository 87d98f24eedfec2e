"""The checks behind the ``PARLEY_MAX_*`` limits, for the domains: a value beyond its limit is
400 ``invalid param`` and nothing is written."""

from __future__ import annotations

from collections.abc import Sized

from shared.errors import InvalidParam


def check_length(value: str | None, limit: int) -> None:
    """A text field within its configured length (in characters)."""
    if value is not None and len(value) > limit:
        raise InvalidParam()


def check_count(items: Sized, limit: int) -> None:
    """At most ``limit`` entries in one request."""
    if len(items) > limit:
        raise InvalidParam()
