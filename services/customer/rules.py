"""The customer service's rules as pure functions (no store, no HTTP): the settings it decides
with, a visitor's profile limits, and the same-app rule of S17/X2."""

from __future__ import annotations

from typing import Protocol

from shared.errors import INVALID_APPID, ParleyError
from shared.limits import check_length


class CustomerPolicy(Protocol):
    """The settings the customer domain decides with, each the ``PARLEY_*`` of its name
    (``Settings`` is one)."""

    @property
    def customer_client_id_base(self) -> int: ...
    @property
    def customer_auth_requires_appkey(self) -> bool: ...
    @property
    def max_name_length(self) -> int: ...
    @property
    def max_avatar_length(self) -> int: ...


def check_profile(
    policy: CustomerPolicy, customer_id: str | None, name: str | None, avatar: str | None
) -> None:
    """A visitor's customer id and name within ``max_name_length``, avatar within
    ``max_avatar_length`` (400 ``invalid param``)."""
    check_length(customer_id, policy.max_name_length)
    check_length(name, policy.max_name_length)
    check_length(avatar, policy.max_avatar_length)


def check_same_app(appid: int, authenticated: int | None) -> None:
    """One app's key never mints another app's tokens (spec S17/X2)."""
    if authenticated is not None and authenticated != appid:
        raise ParleyError(INVALID_APPID)
