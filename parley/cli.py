"""The ``parley`` command: run everything, serve one service, render the edge configuration,
and manage apps. ``parley --help`` and ``parley COMMAND --help`` describe every option; the
README lists them too.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from parley.allinone import SERVICE_FACTORIES, create_allinone_app
from parley.deploy import render_compose_nginx, render_k8s
from parley.servers import ServerError, private_dir, start_ferretdb
from services.auth.domain import AuthDomain
from services.auth.repository import INDEXES as AUTH_INDEXES
from services.auth.repository import AuthRepository
from services.customer.domain import INDEXES as CUSTOMER_INDEXES
from services.customer.domain import CustomerDomain
from shared.errors import ParleyError
from shared.gateway import render_ingress, render_nginx
from shared.logs import configure_logging
from shared.mongo import ensure_indexes, make_client
from shared.routing import SERVICES
from shared.settings import (
    EMBEDDED_MONGO_ADDR,
    INTERNAL_SECRET_MIN_BYTES,
    Settings,
    split_addr,
)


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


def _run_app(app: web.Application, settings: Settings) -> None:
    app.on_startup.append(_dump_tasks_on_sigusr1)
    host, port = split_addr(settings.http_addr)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(app, host=host, port=port, print=None, access_log=None)


# ---- parley run ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    ferret = None
    extra: dict[str, Any] = {}
    if args.mongo_url is None:
        data_dir = private_dir(Path(args.data).resolve(), files=False)
        try:
            ferret = start_ferretdb(
                data_dir / "mongo",
                args.embedded_mongo_addr,
                postgresql_url=args.ferretdb_postgresql_url,
            )
        except ServerError as exc:
            print(f"parley: {exc}", file=sys.stderr)
            return 1
        extra["mongo_url"] = f"mongodb://{args.embedded_mongo_addr}/"
    settings = _settings(args, **extra)
    configure_logging(json=settings.log_json, level=settings.log_level)
    app = create_allinone_app(settings)

    async def announce(app: web.Application) -> None:
        await _print_welcome(settings)

    app.on_startup.append(announce)
    try:
        _run_app(app, settings)
    finally:
        if ferret is not None:
            ferret.stop()
    return 0


async def _print_welcome(settings: Settings) -> None:
    client = make_client(settings.mongo_url)
    try:
        db = client[settings.mongo_db]
        await ensure_indexes(db, AUTH_INDEXES)
        auth = AuthDomain(AuthRepository(db), None, settings)
        apps = await auth.list_apps()
        created = not apps
        if created:
            apps = [await auth.create_app("demo")]
    finally:
        await client.close()
    app = apps[0]
    host, port = split_addr(settings.http_addr)
    base = f"http://{host}:{port}"
    basic = f"{app.appid}:{hashlib.md5(app.secret.encode()).hexdigest()}"
    bus = "RabbitMQ" if settings.amqp_url else "in-process"
    lines = [
        f"Parley is listening on {base} (services: {', '.join(SERVICE_FACTORIES)}; bus: {bus})",
        f"MongoDB: {settings.mongo_url} database {settings.mongo_db!r}",
    ]
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
    factory = SERVICE_FACTORIES.get(args.service)
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
    sys.stdout.write(render_nginx(upstreams, listen=args.listen))
    return 0


# ---- parley cluster and parley bench ------------------------------------------------------


def cmd_cluster(args: argparse.Namespace) -> int:
    """Distributed Parley on this machine: its own FerretDB and RabbitMQ unless given."""
    from parley.cluster import start_cluster
    from parley.servers import free_port, start_rabbitmq

    configure_logging(level="warning")
    data = private_dir(Path(args.data).resolve(), files=False)
    started = []
    try:
        mongo_url = args.mongo_url
        if mongo_url is None:
            started.append(
                start_ferretdb(
                    data / "mongo",
                    args.embedded_mongo_addr,
                    postgresql_url=args.ferretdb_postgresql_url,
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
        cluster = start_cluster(settings, data / "logs", replicas, edge_addr=settings.http_addr)
    except ServerError as exc:
        for process in reversed(started):
            process.stop()
        print(f"parley cluster: {exc}", file=sys.stderr)
        return 1
    asyncio.run(_print_welcome(settings))
    print(f"RabbitMQ: {amqp_url} (exchange {settings.amqp_exchange})")
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


def cmd_bench(args: argparse.Namespace) -> int:
    from parley.bench import FAMILIES, Bench, table

    settings = _settings(args)
    configure_logging(level="warning")
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        print(f"parley bench: unknown families {sorted(unknown)}", file=sys.stderr)
        return 2
    if args.appid is None:
        app = asyncio.run(_with_auth(settings, "create", "bench"))
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
    )
    results = asyncio.run(bench.run(families))
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


async def _with_auth(settings: Settings, action: str, name: str | None) -> Any:
    client = make_client(settings.mongo_url)
    try:
        db = client[settings.mongo_db]
        await ensure_indexes(db, AUTH_INDEXES)
        auth = AuthDomain(AuthRepository(db), None, settings)
        if action == "create":
            return await auth.create_app(name or "")
        return await auth.list_apps()
    finally:
        await client.close()


def cmd_app(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(level="warning")
    try:
        result = asyncio.run(_with_auth(settings, args.action, getattr(args, "name", None)))
    except Exception as exc:
        print(f"parley app: cannot reach MongoDB at {settings.mongo_url}: {exc}", file=sys.stderr)
        return 1
    apps = [result] if args.action == "create" else result
    rows = [{"appid": a.appid, "key": a.key, "secret": a.secret, "name": a.name} for a in apps]
    if args.action == "create":
        row = {k: rows[0][k] for k in ("appid", "key", "secret")}
        print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))
    elif args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['appid']}\t{row['name']}\tkey={row['key']}")
    return 0


# ---- parley store -------------------------------------------------------------------------


async def _store_action(settings: Settings, args: argparse.Namespace) -> dict[str, int]:
    client = make_client(settings.mongo_url)
    try:
        db = client[settings.mongo_db]
        await ensure_indexes(db, CUSTOMER_INDEXES)
        customer = CustomerDomain(db, None, settings, None)
        if args.action == "create":
            await ensure_indexes(db, AUTH_INDEXES)
            if await AuthRepository(db).get_app(args.app) is None:
                raise ParleyError(f"no app {args.app}")
            return {"store_id": await customer.create_store(args.app, args.name)}
        return {"seller_id": await customer.add_agent(args.store, args.name)}
    finally:
        await client.close()


def cmd_store(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(level="warning")
    try:
        result = asyncio.run(_store_action(settings, args))
    except ParleyError as exc:
        print(f"parley store: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"parley store: cannot reach MongoDB at {settings.mongo_url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


# ---- argument parsing ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="every service in one process (all-in-one)")
    run.add_argument("--http-addr", default=None, help="HOST:PORT to listen on (127.0.0.1:8080)")
    run.add_argument("--data", default="./parley-data", help="data directory (./parley-data)")
    run.add_argument("--mongo-url", default=None, help="use this MongoDB instead of FerretDB")
    run.add_argument("--amqp-url", default=None, help="use RabbitMQ instead of the in-process bus")
    run.add_argument(
        "--embedded-mongo-addr",
        default=EMBEDDED_MONGO_ADDR,
        help=f"where the embedded FerretDB listens ({EMBEDDED_MONGO_ADDR})",
    )
    run.add_argument(
        "--ferretdb-postgresql-url",
        default=None,
        help="store the embedded FerretDB's data in this PostgreSQL database, not SQLite",
    )
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--http-addr", default=None)
    serve.add_argument("--mongo-url", default=None)
    serve.add_argument("--amqp-url", default=None)
    serve.add_argument("--auth-url", default=None, help="the auth service's base URL")
    serve.add_argument(
        "--insecure-internal",
        action="store_true",
        help="start without a PARLEY_INTERNAL_SECRET of at least "
        f"{INTERNAL_SECRET_MIN_BYTES} bytes (without one, /internal/* is open to every caller)",
    )
    serve.set_defaults(func=cmd_serve)

    gateway = sub.add_parser("gateway-config", help="render the edge configuration")
    gateway.add_argument("--format", choices=("nginx", "ingress"), default="nginx")
    gateway.add_argument(
        "--upstream",
        action="append",
        metavar="SERVICE=HOST:PORT",
        help="a replica of a service (repeat for each replica and service)",
    )
    gateway.add_argument("--listen", default="0.0.0.0:8080", help="nginx listen address")
    gateway.add_argument("--host", default=None, help="Ingress host name")
    gateway.add_argument("--namespace", default="parley", help="Ingress namespace")
    gateway.set_defaults(func=cmd_gateway_config)

    cluster = sub.add_parser(
        "cluster", help="distributed Parley on this machine (a process per service, nginx)"
    )
    cluster.add_argument("--http-addr", default=None, help="the edge (127.0.0.1:8080)")
    cluster.add_argument("--data", default="./parley-cluster", help="data and logs directory")
    cluster.add_argument("--replicas", type=int, default=1, help="replicas of each service")
    cluster.add_argument("--mongo-url", default=None, help="use this MongoDB, not FerretDB")
    cluster.add_argument("--amqp-url", default=None, help="use this RabbitMQ, not its own")
    cluster.add_argument("--embedded-mongo-addr", default=EMBEDDED_MONGO_ADDR)
    cluster.add_argument("--ferretdb-postgresql-url", default=None)
    cluster.set_defaults(func=cmd_cluster)

    bench = sub.add_parser("bench", help="load through the edge; requests/s, latency, event lag")
    bench.add_argument("--url", default="http://127.0.0.1:8080", help="Parley's base URL")
    bench.add_argument("--mongo-url", default=None, help="where to create the bench app")
    bench.add_argument("--appid", type=int, default=None, help="use this app instead")
    bench.add_argument("--secret", default=None, help="its secret")
    bench.add_argument("--amqp-url", default=None, help="RabbitMQ, to measure event lag")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per family")
    bench.add_argument("--concurrency", type=int, default=32)
    bench.add_argument(
        "--families", default=",".join(("grant", "groups", "peer", "group", "history"))
    )
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    deploy = sub.add_parser(
        "deploy-config", help="render the Kubernetes manifests or docker-compose's edge config"
    )
    deploy.add_argument("--format", choices=("k8s", "compose-nginx"), required=True)
    deploy.add_argument("--out", default=None, help="k8s: write the files into this directory")
    deploy.set_defaults(func=cmd_deploy_config)

    app = sub.add_parser("app", help="manage apps")
    app_sub = app.add_subparsers(dest="action", required=True)
    create = app_sub.add_parser("create", help="create an app; prints appid, key and secret")
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true")
    create.add_argument("--mongo-url", default=None)
    listing = app_sub.add_parser("list", help="list apps")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--mongo-url", default=None)
    app.set_defaults(func=cmd_app)

    store = sub.add_parser("store", help="manage customer-service stores and their agents")
    store_sub = store.add_subparsers(dest="action", required=True)
    store_create = store_sub.add_parser("create", help="give an app its store; prints store_id")
    store_create.add_argument("--app", type=int, required=True, help="the app's appid")
    store_create.add_argument("--name", required=True)
    store_create.add_argument("--json", action="store_true")
    store_create.add_argument("--mongo-url", default=None)
    add_agent = store_sub.add_parser("add-agent", help="add an agent; prints seller_id")
    add_agent.add_argument("--store", type=int, required=True, help="the store's store_id")
    add_agent.add_argument("--name", required=True, help="the agent's name (often an e-mail)")
    add_agent.add_argument("--json", action="store_true")
    add_agent.add_argument("--mongo-url", default=None)
    store.set_defaults(func=cmd_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
