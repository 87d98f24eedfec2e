"""Parley's id rule (spec, "Parley's decisions"): an id is a JSON integer or a string of decimal
digits, everywhere; anything else (a non-digit string, a float, a boolean, null) is 400
``invalid param``. Ids are 64-bit: values outside the signed int64 range are refused too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

INT64_MAX = 2**63 - 1


def parse_id(value: Any) -> int:
    """Return the id as an int, or raise ValueError (which callers map to ``invalid param``)."""
    if isinstance(value, bool):
        raise ValueError("an id cannot be a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    else:
        raise ValueError("an id must be an integer or a string of decimal digits")
    if not -INT64_MAX - 1 <= number <= INT64_MAX:
        raise ValueError("an id must fit in 64 bits")
    return number


def _strict_flag(value: Any) -> bool:
    """Flags are JSON booleans or the integers 0/1 (spec §1.1); nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("a flag must be a boolean or 0/1")


def _strict_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


Id = Annotated[int, BeforeValidator(parse_id)]
"""A pydantic field type applying the id rule."""

Flag = Annotated[bool, BeforeValidator(_strict_flag)]
"""A pydantic field type for booleans: true/false or 0/1."""

Text = Annotated[str, BeforeValidator(_strict_str)]
"""A pydantic field type for strings: no coercion from numbers."""
