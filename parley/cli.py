"""The ``parley`` command: run everything, serve one service, render the edge configuration,
and manage apps. ``parley --help`` and ``parley COMMAND --help`` describe every option; the
README lists them too.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import json
import signal
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from parley.benchcost import CostMeter
from parley.deploy import render_compose_nginx, render_k8s
from parley.embedded import EmbeddedStore
from parley.servers import ServerError, private_dir, start_ferretdb
from services.auth.admin import AuthAdmin
from services.customer.admin import CustomerAdmin
from shared.errors import ParleyError, store_unavailable
from shared.gateway import render_ingress, render_nginx
from shared.logs import configure_logging
from shared.mongo import Database, make_client
from shared.routing import ROUTES, SERVICES
from shared.server import Listening, run_app
from shared.settings import (
    EMBEDDED_MONGO_ADDR,
    EMBEDDED_MONGO_URL,
    INTERNAL_SECRET_MIN_BYTES,
    Settings,
    split_addr,
)

try:
    VERSION = importlib.metadata.version("parley")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    VERSION = "unknown"

# The all-in-one runner's services (parley.allinone.SERVICE_FACTORIES, imported lazily:
# management commands start faster without every service's module).
SERVICE_ORDER = ("auth", "groups", "customer", "messages")

# Management commands give up on an unreachable store after this many seconds.
MANAGEMENT_TIMEOUT = 2.0


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        key: value
        for key, value in {
            "http_addr": getattr(args, "http_addr", None),
            "mongo_url": getattr(args, "mongo_url", None),
            "amqp_url": getattr(args, "amqp_url", None),
            "auth_url": getattr(args, "auth_url", None),
            **extra,
        }.items()
        if value is not None
    }
    return Settings(**overrides)


async def _dump_tasks_on_sigusr1(app: web.Application) -> None:
    """``kill -USR1 <pid>`` prints every pending asyncio task's stack to stderr: what a
    stalled process is waiting for."""

    def dump() -> None:
        tasks = asyncio.all_tasks()
        print(f"--- {len(tasks)} asyncio tasks ---", file=sys.stderr)
        for task in tasks:
            task.print_stack(limit=12, file=sys.stderr)
        sys.stderr.flush()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


def _run_app(
    app: web.Application, settings: Settings, on_listening: Listening | None = None
) -> None:
    app.on_startup.append(_dump_tasks_on_sigusr1)
    host, port = split_addr(settings.http_addr)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    # web.run_app, minus echoing malformed requests (shared/server.py)
    run_app(app, host, port, on_listening)


# ---- parley run ---------------------------------------------------------------------------


def _local_store(args: argparse.Namespace) -> str:
    """``--local-store``, else ``PARLEY_LOCAL_STORE``, else SQLite."""
    return str(args.local_store or Settings().local_store)


def cmd_run(args: argparse.Namespace) -> int:
    store: EmbeddedStore | None = None
    extra: dict[str, Any] = {}
    if args.mongo_url is None:
        data_dir = private_dir(Path(args.data).resolve(), files=False)
        private_cluster = _local_store(args) == "postgresql" and not args.ferretdb_postgresql_url
        store = EmbeddedStore(
            data_dir / "mongo",
            args.embedded_mongo_addr,
            postgresql_url=args.ferretdb_postgresql_url,
            postgres_dir=data_dir / "postgres" if private_cluster else None,
        )
        try:
            store.start()
        except ServerError as exc:
            print(f"parley: {exc}", file=sys.stderr)
            return 1
        extra["mongo_url"] = store.url
    try:
        settings = _settings(args, **extra)
        configure_logging(json=settings.log_json, level=settings.log_level)
        checks = {"embedded store": store.check} if store is not None else None
        from parley.allinone import ALL_IN_ONE, create_allinone_app

        app = create_allinone_app(settings, ALL_IN_ONE, ready_checks=checks)
        if store is not None:
            app.cleanup_ctx.append(store.supervise_ctx)

        # The banner once the port accepts connections: whoever reads it may call at once.
        _run_app(app, settings, lambda: _print_welcome(settings))
    finally:
        if store is not None:
            store.stop()
    if store is not None and store.failed:
        return 1
    return 0


async def _print_welcome(settings: Settings) -> None:
    client = make_client(settings.mongo_url)
    try:
        auth = AuthAdmin(client[settings.mongo_db], settings)
        await auth.prepare()
        apps = await auth.list_apps()
        created = not apps
        if created:
            apps = [await auth.create_app("demo")]
    finally:
        await client.close()
    app = apps[0]
    host, port = split_addr(settings.http_addr)
    base = f"http://{host}:{port}"
    basic = md5_credential(app.appid, app.secret)
    bus = "RabbitMQ" if settings.amqp_url else "in-process"
    lines = [
        f"Parley is listening on {base} (services: {', '.join(SERVICE_ORDER)}; bus: {bus})",
        f"MongoDB: {settings.mongo_url} database {settings.mongo_db!r}",
    ]
    listeners = [
        *([f"tcp://{settings.delivery_tcp_addr}"] if settings.delivery_tcp_addr else []),
        *([f"ws://{settings.delivery_ws_addr}/ws"] if settings.delivery_ws_addr else []),
        *([f"tls://{settings.delivery_tls_addr}"] if settings.delivery_tls_addr else []),
        *([f"wss://{settings.delivery_wss_addr}/ws"] if settings.delivery_wss_addr else []),
    ]
    if listeners:
        lines.append(f"IM clients (GoBelieve protocol) connect to {', '.join(listeners)}")
    if created:
        lines.append("Created a demo app:")
    else:
        lines.append(f"Apps: {len(apps)} (first shown; `parley app list` shows all)")
    lines += [
        f"  appid:  {app.appid}",
        f"  key:    {app.key}",
        f"  secret: {app.secret}",
        "Grant a token to user 1:",
        f'  curl -s -u {basic} -d \'{{"uid":1,"user_name":"alice"}}\' {base}/auth/grant',
        "",
    ]
    print("\n".join(lines), flush=True)


# ---- parley serve -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args, insecure_internal=True if args.insecure_internal else None)
    configure_logging(json=settings.log_json, level=settings.log_level)
    if not settings.amqp_url:
        print("parley serve: --amqp-url (or PARLEY_AMQP_URL) is required", file=sys.stderr)
        return 2
    if len(settings.internal_secret.encode()) < INTERNAL_SECRET_MIN_BYTES:
        if not settings.insecure_internal:
            print(
                f"parley serve: PARLEY_INTERNAL_SECRET must be set to at least "
                f"{INTERNAL_SECRET_MIN_BYTES} random bytes (or pass --insecure-internal)",
                file=sys.stderr,
            )
            return 2
        print(
            "parley serve: --insecure-internal: the internal API (/internal/*) is "
            + ("open to every caller" if not settings.internal_secret else "on a short secret"),
            file=sys.stderr,
        )
    from parley.allinone import ALL_IN_ONE

    factory = ALL_IN_ONE.get(args.service)
    if factory is None:
        print(f"parley serve: service {args.service!r} is not built yet", file=sys.stderr)
        return 2
    from shared.web import Deps

    _run_app(factory(settings, Deps()), settings)
    return 0


# ---- parley gateway-config ----------------------------------------------------------------


def cmd_gateway_config(args: argparse.Namespace) -> int:
    if args.format == "ingress":
        sys.stdout.write(render_ingress(host=args.host, namespace=args.namespace))
        return 0
    upstreams: dict[str, list[str]] = {}
    for item in args.upstream or []:
        service, sep, addr = item.partition("=")
        if not sep or service not in SERVICES:
            print(f"parley gateway-config: bad --upstream {item!r}", file=sys.stderr)
            return 2
        try:
            split_addr(addr)
        except ValueError as exc:
            print(f"parley gateway-config: {exc}", file=sys.stderr)
            return 2
        upstreams.setdefault(service, []).append(addr)
    missing = [s for s in SERVICES if s not in upstreams]
    if missing:
        unrouted = [f"{r.method} {r.path}" for r in ROUTES if r.service in missing]
        print(
            f"parley gateway-config: no --upstream for {', '.join(missing)}: "
            f"{len(unrouted)} routes would answer 404 ({', '.join(unrouted[:6])}"
            f"{', ...' if len(unrouted) > 6 else ''}). Give every service an upstream "
            "(--upstream SERVICE=HOST:PORT), or pass --partial.",
            file=sys.stderr,
        )
        if not args.partial:
            return 2
    sys.stdout.write(render_nginx(upstreams, listen=args.listen))
    return 0


# ---- parley cluster and parley bench ------------------------------------------------------


def cmd_cluster(args: argparse.Namespace) -> int:
    """Distributed Parley on this machine: its own FerretDB and RabbitMQ unless given."""
    from parley.cluster import start_cluster
    from parley.servers import free_port, start_postgres, start_rabbitmq

    configure_logging(level="warning")
    data = private_dir(Path(args.data).resolve(), files=False)
    started = []
    try:
        mongo_url = args.mongo_url
        if mongo_url is None:
            postgresql_url = args.ferretdb_postgresql_url
            if _local_store(args) == "postgresql" and not postgresql_url:
                started.append(start_postgres(data / "postgres"))
                postgresql_url = started[-1].extra["url"]
            started.append(
                start_ferretdb(
                    data / "mongo", args.embedded_mongo_addr, postgresql_url=postgresql_url
                )
            )
            mongo_url = f"mongodb://{args.embedded_mongo_addr}/"
        amqp_url = args.amqp_url
        if amqp_url is None:
            broker = start_rabbitmq(data / "rabbitmq", free_port())
            started.append(broker)
            amqp_url = broker.extra["url"]
        settings = _settings(args, mongo_url=mongo_url, amqp_url=amqp_url)
        replicas = dict.fromkeys(SERVICES, args.replicas)
        cluster = start_cluster(
            settings, data / "logs", replicas, edge_addr=settings.http_addr, delivery=args.replicas
        )
    except ServerError as exc:
        for process in reversed(started):
            process.stop()
        print(f"parley cluster: {exc}", file=sys.stderr)
        return 1
    asyncio.run(_print_welcome(settings))
    print(f"RabbitMQ: {amqp_url} (exchange {settings.amqp_exchange})")
    for n, replica in enumerate(cluster.delivery):
        print(
            f"IM clients: delivery {n}: tcp://{replica.extra['tcp']}, ws://{replica.extra['ws']}/ws"
        )
    print(f"{args.replicas} replica(s) of each service; logs in {data / 'logs'}. Ctrl-C stops.")
    sys.stdout.flush()
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
        for process in reversed(started):
            process.stop()
    return 0


def _cost_meter(args: argparse.Namespace) -> CostMeter | None:
    """The processes to watch: ``--watch NAME=PID``, ``--watch-tree NAME=PID`` and
    ``--watch-port NAME=PORT``; by
    default whatever listens on the bench URL's port (``parley``) and, when it is local, on
    the store's port (``store``)."""
    from parley.benchcost import process_name
    from parley.servers import listeners

    pids: dict[str, int] = {}
    for spec in args.watch:
        name, _, pid = spec.partition("=")
        pids[name] = int(pid)
    trees = {name: int(pid) for name, _, pid in (s.partition("=") for s in args.watch_tree)}
    ports = [spec.partition("=") for spec in args.watch_port]
    if not args.watch and not ports and not trees:
        url = urllib.parse.urlsplit(args.url)
        ports = [("parley", "=", str(url.port or 80))]
        if args.mongo_url:
            store = urllib.parse.urlsplit(args.mongo_url)
            ports.append(("store", "=", str(store.port or 27017)))
    for name, _, port in ports:
        found = listeners(int(port))
        for n, pid in enumerate(found):
            pids[name if len(found) == 1 else f"{name}.{process_name(pid)}.{n}"] = pid
    metrics = list(args.metrics_url) or [args.url.rstrip("/") + "/metrics"]
    if not pids and not trees and not args.metrics_url:
        return None
    return CostMeter(pids, [] if args.no_metrics else metrics, trees)


def cmd_bench(args: argparse.Namespace) -> int:
    from parley.bench import FAMILIES, Bench, table

    settings = _settings(args)
    configure_logging(level="warning")
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        print(f"parley bench: unknown families {sorted(unknown)}", file=sys.stderr)
        return 2
    created = args.appid is None
    if created:
        if not args.json:
            print("bench: creating an app for the run", file=sys.stderr)
        try:
            app = asyncio.run(_with_auth(settings, "create", "bench"))
        except Exception as exc:
            return _unreachable("bench", settings, exc)
        appid, secret = app.appid, app.secret
    else:
        appid, secret = args.appid, args.secret or ""
    bench = Bench(
        args.url,
        appid,
        secret,
        concurrency=args.concurrency,
        duration=args.duration,
        amqp_url=args.amqp_url,
        exchange=settings.amqp_exchange,
        quiet=args.json,
        cost=_cost_meter(args),
        preload_users=args.preload_users or (20_000 if args.preload else 0),
        preload_messages=args.preload_messages or (50_000 if args.preload else 0),
    )
    try:
        results = asyncio.run(bench.run(families))
    finally:
        if not args.keep:
            if created:
                asyncio.run(remove_app(settings, appid))
            else:
                asyncio.run(bench.remove_groups())
            if not args.json:
                what = f"app {appid} and its data" if created else "its groups"
                print(f"bench: removed {what} (--keep keeps them)", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "url": args.url,
                    "concurrency": args.concurrency,
                    "results": [r.as_dict() for r in results],
                },
                indent=2,
            )
        )
    else:
        header = f"{args.url}  concurrency {args.concurrency}  {args.duration:.0f}s per family" + (
            "" if args.amqp_url else "  (event lag: pass --amqp-url)"
        )
        print(table(results, header))
    return 0


async def remove_app(settings: Settings, appid: int) -> None:
    """Deletes an app and every document of it (the bench's throwaway app). No events: the
    app and everything in it disappear together."""
    client = make_client(settings.mongo_url, timeout=MANAGEMENT_TIMEOUT * 10)
    try:
        db = client[settings.mongo_db]
        # Documents name their app in an ``appid`` field or first in their ``_id``.
        mine = {"$or": [{"appid": appid}, {"_id": {"$regex": f"^{appid}[:#]"}}]}
        for name in await db.list_collection_names():
            await db[name].delete_many(mine)
    finally:
        await client.close()


# ---- parley deploy-config -----------------------------------------------------------------


def cmd_deploy_config(args: argparse.Namespace) -> int:
    if args.format == "compose-nginx":
        sys.stdout.write(render_compose_nginx())
        return 0
    files = render_k8s()
    if args.out is None:
        sys.stdout.write("---\n".join(files.values()))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        print(out / name)
    return 0


# ---- parley app ---------------------------------------------------------------------------

T = TypeVar("T")


def _unreachable(command: str, settings: Settings, exc: BaseException) -> int:
    """One line for a store that does not answer, instead of the driver's report."""
    if store_unavailable(exc):
        why = f"no answer in {MANAGEMENT_TIMEOUT:g}s"
    else:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    print(
        f"parley {command}: cannot reach MongoDB at {settings.mongo_url} ({why}); "
        "is `parley run` (or your MongoDB) running? Pass --mongo-url to use another.",
        file=sys.stderr,
    )
    return 1


def md5_credential(appid: int, secret: str) -> str:
    """The ``-u`` value of server calls: ``appid:md5hex(secret)``."""
    return f"{appid}:{hashlib.md5(secret.encode()).hexdigest()}"


async def _on_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """``work`` on the configured database, through a client of its own closed after it."""
    client = make_client(settings.mongo_url, timeout=MANAGEMENT_TIMEOUT)
    try:
        return await work(client[settings.mongo_db])
    finally:
        await client.close()


async def _with_auth(settings: Settings, action: str, name: str | None) -> Any:
    async def work(db: Database) -> Any:
        auth = AuthAdmin(db, settings)
        await auth.prepare()
        if action == "create":
            return await auth.create_app(name or "")
        return await auth.list_apps()

    return await _on_database(settings, work)


def cmd_app(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(level="warning")
    try:
        result = asyncio.run(_with_auth(settings, args.action, getattr(args, "name", None)))
    except Exception as exc:
        return _unreachable("app", settings, exc)
    apps = [result] if args.action == "create" else result
    rows = [{"appid": a.appid, "key": a.key, "secret": a.secret, "name": a.name} for a in apps]
    if args.action == "create":
        row = {k: rows[0][k] for k in ("appid", "key", "secret")}
        if args.json:
            print(json.dumps(row))
        else:
            lines = [f"{k}: {v}" for k, v in row.items()]
            basic = md5_credential(row["appid"], row["secret"])
            lines.append(f"server calls: curl -u {basic} ...  (appid:md5 of the secret)")
            print("\n".join(lines))
    elif args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['appid']}\t{row['name']}\tkey={row['key']}")
    return 0


# ---- parley store -------------------------------------------------------------------------


async def _store_action(settings: Settings, args: argparse.Namespace) -> dict[str, int]:
    async def work(db: Database) -> dict[str, int]:
        customer = CustomerAdmin(db, settings)
        await customer.prepare()
        if args.action == "create":
            auth = AuthAdmin(db, settings)
            await auth.prepare()
            if not await auth.has_app(args.app):
                raise ParleyError(f"no app {args.app}")
            return {"store_id": await customer.create_store(args.app, args.name)}
        appid = await customer.app_of_store(args.store)
        return {"seller_id": await customer.add_agent(appid, args.store, args.name)}

    return await _on_database(settings, work)


def cmd_store(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(level="warning")
    try:
        result = asyncio.run(_store_action(settings, args))
    except ParleyError as exc:
        print(f"parley store: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:
        return _unreachable("store", settings, exc)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


# ---- argument parsing ---------------------------------------------------------------------


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: the value, or (for options whose default
    comes from a setting) the help text names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


ENV_HTTP = "default: $PARLEY_HTTP_ADDR or 127.0.0.1:8080"
ENV_MONGO = f"default: $PARLEY_MONGO_URL or {EMBEDDED_MONGO_URL}"
LOCAL_STORES = ("sqlite", "postgresql")
LOCAL_STORE_HELP = (
    "where the embedded FerretDB keeps its data: SQLite files under DATA/mongo, or a private "
    "PostgreSQL cluster under DATA/postgres, started and stopped with Parley "
    "(default: $PARLEY_LOCAL_STORE or sqlite)"
)


def _sub(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, formatter_class=DefaultsFormatter, **kwargs
    )
    return parser


def _add_embedded_store_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """The options of the FerretDB a command starts (``whose``: how its help names it)."""
    parser.add_argument(
        "--embedded-mongo-addr", default=EMBEDDED_MONGO_ADDR, help=f"where {whose} FerretDB listens"
    )
    parser.add_argument("--local-store", choices=LOCAL_STORES, default=None, help=LOCAL_STORE_HELP)
    parser.add_argument(
        "--ferretdb-postgresql-url",
        default=None,
        help=f"store {whose} FerretDB's data in this existing PostgreSQL database instead "
        "(default: as --local-store says)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley", description=__doc__, formatter_class=DefaultsFormatter
    )
    parser.add_argument("--version", action="version", version=f"parley {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = _sub(sub, "run", help="every service in one process (all-in-one)")
    run.add_argument("--http-addr", default=None, help=f"HOST:PORT to listen on ({ENV_HTTP})")
    run.add_argument("--data", default="./parley-data", help="data directory")
    run.add_argument(
        "--mongo-url",
        default=None,
        help="use this MongoDB instead of FerretDB (default: $PARLEY_MONGO_URL, or the "
        "embedded FerretDB)",
    )
    run.add_argument(
        "--amqp-url",
        default=None,
        help="use RabbitMQ instead of the in-process bus (default: $PARLEY_AMQP_URL, or the "
        "in-process bus)",
    )
    _add_embedded_store_options(run, "the embedded")
    run.set_defaults(func=cmd_run)

    serve = _sub(sub, "serve", help="run one service")
    serve.add_argument("service", choices=(*SERVICES, "delivery"))
    serve.add_argument("--http-addr", default=None, help=f"HOST:PORT to listen on ({ENV_HTTP})")
    serve.add_argument("--mongo-url", default=None, help=f"MongoDB URL ({ENV_MONGO})")
    serve.add_argument(
        "--amqp-url", default=None, help="RabbitMQ URL (default: $PARLEY_AMQP_URL; required)"
    )
    serve.add_argument(
        "--auth-url",
        default=None,
        help="the auth service's base URL (default: $PARLEY_AUTH_URL or http://127.0.0.1:8081)",
    )
    serve.add_argument(
        "--insecure-internal",
        action="store_true",
        help="start without a PARLEY_INTERNAL_SECRET of at least "
        f"{INTERNAL_SECRET_MIN_BYTES} bytes (without one, /internal/* is open to every caller)",
    )
    serve.set_defaults(func=cmd_serve)

    gateway = _sub(sub, "gateway-config", help="render the edge configuration")
    gateway.add_argument(
        "--format", choices=("nginx", "ingress"), default="nginx", help="what to render"
    )
    gateway.add_argument(
        "--upstream",
        action="append",
        metavar="SERVICE=HOST:PORT",
        help="a replica of a service (repeat for each replica and service; every service "
        "needs one) (default: none)",
    )
    gateway.add_argument(
        "--partial",
        action="store_true",
        help="render even if some services have no --upstream (their paths answer 404)",
    )
    gateway.add_argument("--listen", default="0.0.0.0:8080", help="nginx listen address")
    gateway.add_argument("--host", default=None, help="Ingress host name (default: none, any host)")
    gateway.add_argument("--namespace", default="parley", help="Ingress namespace")
    gateway.set_defaults(func=cmd_gateway_config)

    cluster = _sub(
        sub, "cluster", help="distributed Parley on this machine (a process per service, nginx)"
    )
    cluster.add_argument("--http-addr", default=None, help=f"the edge ({ENV_HTTP})")
    cluster.add_argument("--data", default="./parley-cluster", help="data and logs directory")
    cluster.add_argument("--replicas", type=int, default=1, help="replicas of each service")
    cluster.add_argument(
        "--mongo-url", default=None, help="use this MongoDB (default: its own FerretDB)"
    )
    cluster.add_argument(
        "--amqp-url", default=None, help="use this RabbitMQ (default: its own RabbitMQ node)"
    )
    _add_embedded_store_options(cluster, "its")
    cluster.set_defaults(func=cmd_cluster)

    bench = _sub(sub, "bench", help="load through the edge; requests/s, latency, event lag")
    bench.add_argument("--url", default="http://127.0.0.1:8080", help="Parley's base URL")
    bench.add_argument(
        "--mongo-url", default=None, help=f"where to create the bench app ({ENV_MONGO})"
    )
    bench.add_argument(
        "--appid", type=int, default=None, help="use this app (default: create one, then remove it)"
    )
    bench.add_argument("--secret", default=None, help="the --appid app's secret (default: none)")
    bench.add_argument(
        "--amqp-url", default=None, help="RabbitMQ, to measure event lag (default: not measured)"
    )
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per family")
    bench.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    bench.add_argument(
        "--families",
        default=",".join(("grant", "groups", "peer", "group", "history")),
        help="comma-separated endpoint families, run in this order",
    )
    bench.add_argument(
        "--keep",
        action="store_true",
        help="keep what the run created (its app and data; its groups with --appid)",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument(
        "--preload",
        action="store_true",
        help="fill the store first: 20,000 users, 50,000 messages (100,000+ inbox entries)",
    )
    bench.add_argument(
        "--preload-users",
        type=int,
        default=0,
        help="users to grant first (default: 0; 20,000 with --preload)",
    )
    bench.add_argument(
        "--preload-messages",
        type=int,
        default=0,
        help="messages to send first (default: 0; 50,000 with --preload)",
    )
    bench.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="a process whose CPU per request to report (repeatable; default: none)",
    )
    bench.add_argument(
        "--watch-tree",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="like --watch, counting every process below it too (a PostgreSQL postmaster and "
        "its backends) (repeatable; default: none)",
    )
    bench.add_argument(
        "--watch-port",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="watch the processes listening on PORT (default: the URL's and the store's)",
    )
    bench.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        help="/metrics to count store commands from (repeatable; default: URL/metrics)",
    )
    bench.add_argument("--no-metrics", action="store_true", help="do not count store commands")
    bench.set_defaults(func=cmd_bench)

    deploy = _sub(
        sub, "deploy-config", help="render the Kubernetes manifests or docker-compose's edge config"
    )
    deploy.add_argument(
        "--format", choices=("k8s", "compose-nginx"), required=True, help="what to render"
    )
    deploy.add_argument(
        "--out", default=None, help="k8s: write the files into this directory (default: print them)"
    )
    deploy.set_defaults(func=cmd_deploy_config)

    app = _sub(sub, "app", help="manage apps")
    app_sub = app.add_subparsers(dest="action", required=True)
    create = _sub(app_sub, "create", help="create an app; prints appid, key and secret")
    create.add_argument("--name", required=True, help="the app's name")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.add_argument("--mongo-url", default=None, help=f"MongoDB URL ({ENV_MONGO})")
    listing = _sub(app_sub, "list", help="list apps")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--mongo-url", default=None, help=f"MongoDB URL ({ENV_MONGO})")
    app.set_defaults(func=cmd_app)

    store = _sub(sub, "store", help="manage customer-service stores and their agents")
    store_sub = store.add_subparsers(dest="action", required=True)
    store_create = _sub(store_sub, "create", help="give an app its store; prints store_id")
    store_create.add_argument("--app", type=int, required=True, help="the app's appid")
    store_create.add_argument("--name", required=True, help="the store's name")
    store_create.add_argument("--json", action="store_true", help="print JSON")
    store_create.add_argument("--mongo-url", default=None, help=f"MongoDB URL ({ENV_MONGO})")
    add_agent = _sub(store_sub, "add-agent", help="add an agent; prints seller_id")
    add_agent.add_argument("--store", type=int, required=True, help="the store's store_id")
    add_agent.add_argument("--name", required=True, help="the agent's name (often an e-mail)")
    add_agent.add_argument("--json", action="store_true", help="print JSON")
    add_agent.add_argument("--mongo-url", default=None, help=f"MongoDB URL ({ENV_MONGO})")
    store.set_defaults(func=cmd_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
