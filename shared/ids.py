"""Parley's id rule (spec, "Parley's decisions"): an id is a JSON integer or a string of decimal
digits, everywhere; anything else (a non-digit string, a float, a boolean, null) is 400
``invalid param``. Ids are 64-bit: values outside the signed int64 range are refused too. Ids
are positive: 0 and negative ids are refused (``Id``), except where the spec gives 0 a meaning
(``IdOrZero``: a room message's sender, S16).
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


def parse_positive_id(value: Any) -> int:
    number = parse_id(value)
    if number <= 0:
        raise ValueError("an id must be positive")
    return number


def parse_id_or_zero(value: Any) -> int:
    number = parse_id(value)
    if number < 0:
        raise ValueError("an id cannot be negative")
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


Id = Annotated[int, BeforeValidator(parse_positive_id)]
"""A pydantic field type applying the id rule (positive)."""

IdOrZero = Annotated[int, BeforeValidator(parse_id_or_zero)]
"""An id where 0 means something (never negative)."""

Flag = Annotated[bool, BeforeValidator(_strict_flag)]
"""A pydantic field type for booleans: true/false or 0/1."""

Text = Annotated[str, BeforeValidator(_strict_str)]
"""A pydantic field type for strings: no coercion from numbers."""
