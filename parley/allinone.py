"""The all-in-one runner: every service in one process, mounted by the routing table.

Each service is the very app ``parley serve`` runs, mounted as a sub-application whose rule
matches exactly the paths of its rows in ``shared/routing.py``; a path of no row answers the
404 envelope. The services share one Mongo client and one bus (in-process, or RabbitMQ when
``PARLEY_AMQP_URL`` is set) and verify credentials through the auth service in-process.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRuleMatching, MatchedSubAppResource, _InfoDict

from services.auth.app import SPEC as AUTH
from services.customer.app import SPEC as CUSTOMER
from services.delivery.app import SPEC as DELIVERY
from services.groups.app import SPEC as GROUPS
from services.messages.app import SPEC as MESSAGES
from shared.bus import Bus, LocalBus
from shared.lifecycle import ServiceSpec, check_provided, start_order
from shared.routing import path_regex, service_paths
from shared.settings import Settings
from shared.web import (
    READY_CHECKS,
    SETTINGS,
    Deps,
    ReadyCheck,
    add_operations_routes,
    bus_ctx,
    database_ctx,
    operations_middlewares,
    rabbit_bus,
)

# The services. Each declares the in-process APIs it provides and uses (auth: credentials and
# customer tokens; groups: membership; customer: customer ids); the runner starts providers
# first (``start_order``), so the order here is only the order of listings.
SERVICE_FACTORIES: dict[str, ServiceSpec] = {
    spec.name: spec for spec in (AUTH, GROUPS, CUSTOMER, MESSAGES)
}
# What `parley run` runs: the HTTP services, then the delivery service (client connections on
# its own TCP and WebSocket listeners; it has no routing-table paths).
ALL_IN_ONE: dict[str, ServiceSpec] = {**SERVICE_FACTORIES, DELIVERY.name: DELIVERY}


class TableRule(AbstractRuleMatching):
    """Matches the request paths that the routing table gives to one service."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._regex = re.compile("|".join(f"(?:{path_regex(p)})" for p in service_paths(service)))

    async def match(self, request: web.Request) -> bool:
        return self._regex.match(request.path) is not None

    def get_info(self) -> _InfoDict:
        return {"path": self.canonical}

    @property
    def canonical(self) -> str:
        return f"<routing table: {self._service}>"


def make_bus(settings: Settings, name: str = "parley") -> Bus:
    return rabbit_bus(settings.amqp_url, settings, name) if settings.amqp_url else LocalBus()


def create_allinone_app(
    settings: Settings,
    factories: Mapping[str, ServiceSpec] = SERVICE_FACTORIES,
    deps: Deps | None = None,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
) -> web.Application:
    """The edge app. ``ready_checks`` are added to ``/readyz``'s (MongoDB, RabbitMQ when
    used): ``parley run`` adds its embedded store's."""
    deps = deps or Deps()
    edge = web.Application(middlewares=operations_middlewares("edge", settings))
    edge[SETTINGS] = settings
    edge[READY_CHECKS] = dict(ready_checks or {})

    services = [(spec, spec(settings, deps)) for spec in start_order(factories.values())]
    add_operations_routes(edge, lambda request: [edge, *(s for _, s in services)])
    for spec, service in services:
        service.pre_freeze()  # routes and middleware fixed now; state is set at startup
        if service_paths(spec.name):  # the delivery service has none: nothing of it is routed
            edge.router.register_resource(MatchedSubAppResource(TableRule(spec.name), service))

    async def run_services(app: web.Application) -> AsyncIterator[None]:
        started: list[web.Application] = []
        try:
            for spec, service in services:
                started.append(service)  # cleaned up even if its startup fails halfway
                await service.startup()
                service.freeze()
                check_provided(spec, deps)
            yield
        finally:
            for service in reversed(started):
                await service.shutdown()
                await service.cleanup()

    edge.cleanup_ctx.extend(
        [
            database_ctx(deps, {}, share=True),
            bus_ctx(
                deps,
                "all-in-one",
                lambda settings: make_bus(settings, "parley-all-in-one"),
                share=True,
            ),
            run_services,
        ]
    )
    return edge
