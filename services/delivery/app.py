"""The delivery service: GoBelieve's client protocol over TCP and WebSocket (and TLS), so the
official SDKs connect to Parley (``shared/spec/wire-protocol.md``).

It owns no data: clients authenticate with the token from ``/auth/grant`` (checked by the auth
service), sync from the messages service's inboxes, and send messages stored by the messages
service. Every replica consumes every ``message.*`` event on a queue of its own and pushes to
the connections it holds. Its HTTP port serves only ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from shared.auth import VERIFIER
from shared.inboxes import HttpMessageStore, MessageStore
from shared.internal import GroupDirectory, HttpGroupDirectory
from shared.lifecycle import ServiceSpec, resource_ctx
from shared.settings import Settings
from shared.web import BUS, Deps, bus_ctx, service_app, verifier_ctx

from .listeners import Listeners, tls_context
from .server import DeliveryServer

SERVICE = "delivery"
log = structlog.get_logger("parley.delivery")
SERVER = web.AppKey("delivery_server", DeliveryServer)
LISTENERS = web.AppKey("delivery_listeners", Listeners)
GROUPS = web.AppKey("group_directory", GroupDirectory)
STORE = web.AppKey("message_store", MessageStore)


def create_app(settings: Settings, deps: Deps | None = None) -> web.Application:
    deps = deps or Deps()
    app = service_app(SERVICE, settings, {})

    async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
        server = DeliveryServer(
            app[VERIFIER],
            app[STORE],
            app[GROUPS],
            app[BUS],
            kefu_appid=settings.kefu_appid,
            presence_interval=settings.delivery_presence_interval,
        )
        app[SERVER] = server
        listeners = app[LISTENERS] = Listeners(server, settings.delivery_idle_timeout)
        # A queue of this replica's own: every replica sees every event (the connections of
        # one user may be held by any of them). It goes away with the replica.
        subscription = await app[BUS].subscribe(
            f"{settings.amqp_exchange}.delivery.{uuid.uuid4().hex[:12]}",
            ["message.#", "delivery.#"],
            server.on_event,
            durable=False,
        )
        try:
            if settings.delivery_tcp_addr:
                await listeners.start_tcp(settings.delivery_tcp_addr)
            if settings.delivery_ws_addr:
                await listeners.start_ws(settings.delivery_ws_addr)
            if settings.delivery_tls_addr or settings.delivery_wss_addr:
                context = tls_context(settings.delivery_cert_file, settings.delivery_key_file)
                if settings.delivery_tls_addr:
                    await listeners.start_tcp(settings.delivery_tls_addr, context)
                if settings.delivery_wss_addr:
                    await listeners.start_ws(settings.delivery_wss_addr, context)
            log.info("delivery listening", addresses=listeners.addresses)
            announcing = asyncio.create_task(server.announce_agents(), name="agent-presence")
            try:
                yield
            finally:
                announcing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcing
                await server.stop_presence()
        finally:
            await listeners.stop()
            await subscription.cancel()

    app.cleanup_ctx.extend(
        [
            bus_ctx(deps, SERVICE),
            verifier_ctx(deps),
            resource_ctx(
                GROUPS,
                lambda settings: HttpGroupDirectory(settings.groups_url, settings.internal_secret),
                lambda: deps.groups,
            ),
            resource_ctx(
                STORE,
                lambda settings: HttpMessageStore(settings.messages_url, settings.internal_secret),
                lambda: deps.messages,
            ),
            delivery_ctx,
        ]
    )
    return app


SPEC = ServiceSpec(SERVICE, create_app, needs=frozenset({"verifier", "groups", "messages"}))
