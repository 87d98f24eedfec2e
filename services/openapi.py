"""The OpenAPI document of every service's public routes, assembled from each service's
``API`` description (the one place that imports all four services' HTTP models)."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

from services.auth.app import API as AUTH
from services.customer.app import API as CUSTOMER
from services.groups.app import API as GROUPS
from services.messages.app import API as MESSAGES
from shared.openapi import Operation, build_document

APIS: dict[str, dict[str, Operation]] = {
    "auth": AUTH,
    "groups": GROUPS,
    "messages": MESSAGES,
    "customer": CUSTOMER,
}


@functools.cache
def document() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("parley")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        version = "0"
    return build_document(APIS, version=version)
