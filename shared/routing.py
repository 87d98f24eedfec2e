"""The routing table: every documented method and path, and the service that owns it.

One table drives everything that routes: each service registers exactly its rows (its
``create_app`` fails if a handler is missing), the all-in-one runner mounts each service on the
paths of its rows, ``parley gateway-config --format nginx`` renders the edge configuration, and
``--format ingress`` renders the Kubernetes Ingress (``k8s/ingress.yaml``, checked by a test).
Paths use aiohttp's syntax; ids are ``[0-9]+`` so that ``/groups/abc`` is a 404 (spec §1.1).

``INTERNAL_ROUTES`` are the services' internal APIs (``/internal/...``): each service registers
its rows like the public ones, behind the internal-secret check (``shared/web.py``); nothing
that routes from outside (the edge, the Ingress, the all-in-one mount) ever reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SERVICES = ("auth", "groups", "messages", "customer")

ID = "[0-9]+"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    service: str
    handler: str  # the name the service registers for this row
    internal: bool = False  # a row of INTERNAL_ROUTES: callers must send the internal secret

    @property
    def regex(self) -> str:
        """The path as an anchored regular expression (for nginx and the all-in-one mount)."""
        return path_regex(self.path)


def _rows(service: str, *rows: tuple[str, str, str], internal: bool = False) -> list[Route]:
    return [Route(method, path, service, handler, internal) for method, path, handler in rows]


ROUTES: tuple[Route, ...] = tuple(
    _rows(
        "auth",
        ("POST", "/auth/grant", "grant"),  # S1
        ("POST", f"/users/{{uid:{ID}}}", "user_settings"),  # S2
        ("PATCH", f"/users/{{uid:{ID}}}", "user_settings"),  # X1
        ("GET", "/openapi.json", "openapi"),  # this API's OpenAPI 3.1 document
    )
    + _rows(
        "groups",
        ("POST", "/groups", "create_group"),  # S3
        ("PATCH", f"/groups/{{gid:{ID}}}", "rename_group"),  # S4
        ("DELETE", f"/groups/{{gid:{ID}}}", "disband_group"),  # S5
        ("POST", f"/groups/{{gid:{ID}}}/members", "add_members"),  # S6
        ("DELETE", f"/groups/{{gid:{ID}}}/members/{{mid:{ID}}}", "remove_member"),  # S7
        ("DELETE", f"/groups/{{gid:{ID}}}/members", "remove_members"),  # S8
        ("POST", f"/groups/{{gid:{ID}}}/upgrade", "upgrade_group"),  # S9
        ("PATCH", f"/groups/{{gid:{ID}}}/members/{{mid:{ID}}}", "member_settings"),  # S10
        ("POST", "/client/groups", "client_create_group"),  # S21
        ("GET", "/client/groups", "client_list_groups"),  # S22
        ("GET", f"/client/groups/{{gid:{ID}}}", "client_get_group"),  # X3
        ("PATCH", f"/client/groups/{{gid:{ID}}}", "client_patch_group"),  # S23
        ("DELETE", f"/client/groups/{{gid:{ID}}}", "client_disband_group"),  # S24
        ("POST", f"/client/groups/{{gid:{ID}}}/members", "client_add_members"),  # S25
        ("DELETE", f"/client/groups/{{gid:{ID}}}/members/{{mid:{ID}}}", "client_remove_member"),
        ("DELETE", f"/client/groups/{{gid:{ID}}}/members", "client_remove_members"),  # S27
        ("PATCH", f"/client/groups/{{gid:{ID}}}/members/{{mid:{ID}}}", "client_member_settings"),
    )
    + _rows(
        "messages",
        ("POST", "/messages/peers", "post_peer"),  # S11
        ("POST", "/messages/groups", "post_group"),  # S12
        ("POST", "/messages/systems", "post_system"),  # S13
        ("POST", "/messages/notifications", "post_notification"),  # S14
        ("POST", "/messages/groups/notifications", "post_group_notification"),  # S15
        ("POST", "/messages/rooms", "post_room"),  # S16
        ("GET", "/messages/offline", "offline_count"),  # S19
        ("GET", "/messages", "history"),  # S20
        ("OPTIONS", "/messages", "cors_preflight"),
        ("POST", "/messages/dequeue", "dequeue"),  # X4
        ("OPTIONS", "/messages/dequeue", "cors_preflight"),
    )
    + _rows(
        "customer",
        ("POST", "/auth/customer", "customer_token"),  # S17
        ("OPTIONS", "/auth/customer", "cors_preflight"),
        ("POST", "/customer/register", "customer_register"),  # X2
        ("OPTIONS", "/customer/register", "cors_preflight"),
        ("POST", "/v2/customer/register", "customer_register"),
        ("OPTIONS", "/v2/customer/register", "cors_preflight"),
        ("GET", "/supporters", "supporters"),  # S18
        ("OPTIONS", "/supporters", "cors_preflight"),
        ("GET", "/v2/supporters", "supporters"),
        ("OPTIONS", "/v2/supporters", "cors_preflight"),
    )
)

INTERNAL_ROUTES: tuple[Route, ...] = tuple(
    _rows(
        "auth",
        ("POST", "/internal/verify", "internal_verify"),
        ("POST", "/internal/customer-token", "internal_customer_token"),
        internal=True,
    )
    + _rows(
        "groups", ("GET", f"/internal/groups/{{gid:{ID}}}", "internal_get_group"), internal=True
    )
    + _rows(
        "messages",
        ("GET", "/internal/inbox", "internal_inbox"),
        ("POST", "/internal/sync-key", "internal_sync_key"),
        ("POST", "/internal/messages/customer", "internal_customer_message"),
        # Delivery servers: sync pages, stored sync keys, client-sent messages.
        ("GET", "/internal/delivery/inbox", "internal_delivery_inbox"),
        ("POST", "/internal/delivery/sync-key", "internal_delivery_sync_key"),
        ("POST", "/internal/delivery/messages", "internal_delivery_messages"),
        internal=True,
    )
    + _rows(
        "customer",
        ("GET", "/internal/customers", "internal_customer"),
        ("GET", f"/internal/stores/{{store_id:{ID}}}/sellers", "internal_store_sellers"),
        ("POST", f"/internal/agents/{{seller_id:{ID}}}/presence", "internal_presence"),
        internal=True,
    )
)

_PARAM = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def path_regex(path: str) -> str:
    out, last = [], 0
    for match in _PARAM.finditer(path):
        out.append(re.escape(path[last : match.start()]))
        out.append(f"(?:{match.group(2) or '[^/]+'})")
        last = match.end()
    out.append(re.escape(path[last:]))
    return "^" + "".join(out) + "$"


def openapi_path(path: str) -> str:
    """The path with bare parameters (``/groups/{gid}``): aiohttp's canonical form, used as
    the route's name in logs and metrics."""
    return _PARAM.sub(r"{\1}", path)


def routes_for(service: str) -> list[Route]:
    return [r for r in ROUTES if r.service == service]


def internal_routes_for(service: str) -> list[Route]:
    return [r for r in INTERNAL_ROUTES if r.service == service]


def service_paths(service: str) -> list[str]:
    """Distinct path patterns of a service, in table order."""
    return list(dict.fromkeys(r.path for r in routes_for(service)))


def service_for_path(path: str) -> str | None:
    """Which service owns a concrete request path (None: no documented path)."""
    for route in ROUTES:
        if re.match(route.regex, path):
            return route.service
    return None


def static_prefix(path: str) -> str:
    """The literal part of a path before its first parameter, without a trailing slash."""
    head = path.split("{", 1)[0]
    return head.rstrip("/") or "/"
