"""The routing table and everything rendered from it: service registration, the all-in-one
mount, the nginx configuration, the Kubernetes Ingress; and the internal verification API
that services behind the edge use instead of trusting headers."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import kubernetes_validate
import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from parley.allinone import SERVICE_FACTORIES
from parley.servers import REPO_ROOT, free_port
from services.auth.app import create_app as create_auth
from shared.auth import CachingVerifier, HttpVerifier, TokenOwner
from shared.errors import ParleyError
from shared.gateway import ingress_prefixes, render_ingress, render_nginx
from shared.logs import configure_logging
from shared.routing import ROUTES, SERVICES, routes_for, service_for_path
from shared.settings import Settings
from shared.web import OPERATIONS_PATHS, Deps, service_app

from .conftest import Stack, md5_hex


def sample_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "12", path)


def test_every_path_belongs_to_exactly_one_service() -> None:
    owners: dict[str, set[str]] = {}
    for route in ROUTES:
        owners.setdefault(route.path, set()).add(route.service)
        assert route.service in SERVICES
        assert service_for_path(sample_path(route.path)) == route.service, route
    assert all(len(services) == 1 for services in owners.values())
    assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)


async def _unused_handler(request: web.Request) -> web.Response:
    raise AssertionError("never called")


def test_a_service_must_implement_all_its_rows() -> None:
    with pytest.raises(LookupError, match="user_settings"):
        service_app("auth", Settings(), {"grant": _unused_handler})


def test_built_services_register_exactly_their_rows() -> None:
    for name, factory in SERVICE_FACTORIES.items():
        app = factory(Settings(), Deps())
        registered = {
            (r.method, r.resource.canonical)
            for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
        expected = {
            (r.method, re.sub(r"\{(\w+):[^}]+\}", r"{\1}", r.path)) for r in routes_for(name)
        }
        assert expected <= registered, name
        extra = {path for _, path in registered - expected}
        assert all(p in OPERATIONS_PATHS or p.startswith("/internal/") for p in extra), extra


async def test_every_row_of_a_built_service_is_reachable_through_the_edge(stack: Stack) -> None:
    for route in ROUTES:
        if route.service not in SERVICE_FACTORIES:
            continue
        status, body, _ = await stack.request(route.method, sample_path(route.path))
        assert status != 404 and status != 405, (route, status, body)


def test_nginx_configuration_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    config = render_nginx(
        {service: ["127.0.0.1:9001", "127.0.0.1:9002"] for service in SERVICES},
        listen=f"127.0.0.1:{free_port()}",
    )
    (tmp_path / "nginx.conf").write_text(config)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for route in ROUTES:
        assert (
            f'location ~ "{route.regex}" {{ proxy_pass http://parley_{route.service}; }}' in config
        )


def test_nginx_regexes_match_exactly_the_documented_paths() -> None:
    for route in ROUTES:
        assert re.match(route.regex, sample_path(route.path))
        assert not re.match(route.regex, sample_path(route.path) + "/x")
        if "{" in route.path:
            assert not re.match(route.regex, re.sub(r"\{[^}]+\}", "abc", route.path))


def test_the_ingress_in_k8s_is_the_table() -> None:
    committed = (REPO_ROOT / "k8s" / "ingress.yaml").read_text()
    assert committed == render_ingress(), "regenerate: parley gateway-config --format ingress"
    ingress = yaml.safe_load(committed)
    kubernetes_validate.validate(ingress, "1.30", strict=True)
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    prefix_to_service = {
        p["path"]: p["backend"]["service"]["name"].removeprefix("parley-") for p in paths
    }
    assert prefix_to_service == ingress_prefixes()

    def ingress_route(path: str) -> str:
        # Kubernetes Prefix matching: by whole path elements, the longest prefix wins.
        candidates = [
            p for p in prefix_to_service if path == p or path.startswith(p.rstrip("/") + "/")
        ]
        if not candidates:
            return str(ingress["spec"]["defaultBackend"]["service"]["name"]).removeprefix("parley-")
        return str(prefix_to_service[max(candidates, key=len)])

    for route in ROUTES:
        assert ingress_route(sample_path(route.path)) == route.service, route


# ---- the internal verification API ---------------------------------------------------------


@pytest.fixture
async def auth_service(local_stack: Stack) -> AsyncIterator[str]:
    """The auth service on its own port (as `parley serve auth` runs it), internal secret set."""
    stack = local_stack
    settings = stack.settings.model_copy(update={"internal_secret": "s3cret"})
    app = create_auth(settings, Deps(db=stack.db, bus=stack.bus))
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_http_verifier_asks_the_auth_service(local_stack: Stack, auth_service: str) -> None:
    stack = local_stack
    app = await stack.new_app()
    _, granted, _ = await stack.request(
        "POST", "/auth/grant", json={"uid": 9}, headers=app.server_auth
    )
    token = granted["data"]["token"]
    verifier = CachingVerifier(HttpVerifier(auth_service, internal_secret="s3cret"), ttl=5)
    try:
        assert await verifier.resolve_token(token) == TokenOwner(app.appid, 9)
        await verifier.verify_server(app.appid, md5_hex(app.secret), None)
        await verifier.verify_app_key(app.appid, app.key)
        with pytest.raises(ParleyError) as refused:
            await verifier.resolve_token("x" * 30)
        assert refused.value.body() == {
            "error": "非法的access token",
            "meta": {"code": 400, "message": "非法的access token"},
        }
        with pytest.raises(ParleyError, match="非法的appid"):
            await verifier.verify_server(app.appid, md5_hex("wrong"), None)
        with pytest.raises(ParleyError, match="非法的appid"):
            await verifier.verify_app_key(app.appid, "wrong")
    finally:
        await verifier.close()
    # Without the shared secret the internal API refuses the caller (401): unavailable to it.
    intruder = HttpVerifier(auth_service)
    try:
        with pytest.raises(ParleyError) as refused:
            await intruder.resolve_token(token)
        assert refused.value.status == 503
    finally:
        await intruder.close()


async def test_ip_allow_list(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    # The test client connects from loopback: configured as the trusted proxy, so X-Real-IP
    # is believed (without it the connection's own address is checked).
    settings = stack.settings.model_copy(
        update={
            "ip_permissions": {app.appid: ["10.0.0.1"]},
            "trusted_proxies": (ipaddress.ip_network("127.0.0.1"),),
        }
    )
    service = create_auth(settings, Deps(db=stack.db, bus=stack.bus))
    server = TestServer(service, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        url = str(server.make_url("/auth/grant"))
        for ip, expected in (("10.0.0.1", 200), ("10.0.0.2", 400), (None, 400), ("x", 400)):
            headers = dict(app.server_auth)
            if ip:
                headers["X-Real-IP"] = ip
            async with stack.http.post(url, json={"uid": 1}, headers=headers) as resp:
                assert resp.status == expected, ip
                if expected == 400:
                    assert await resp.json() == {"meta": {"code": 400, "message": "非法的ip"}}
        # An app without a list does not check, whatever the proxy sends.
        headers = {**(await stack.new_app()).server_auth, "X-Real-IP": "x"}
        async with stack.http.post(url, json={"uid": 1}, headers=headers) as resp:
            assert resp.status == 200
    finally:
        await server.close()


async def test_tokens_and_secrets_are_never_logged(local_stack: Stack) -> None:
    stack = local_stack
    app = await stack.new_app()
    configure_logging(level="debug", cache=False)
    try:
        with structlog.testing.capture_logs() as logs:
            _, granted, _ = await stack.request(
                "POST", "/auth/grant", json={"uid": 3}, headers=app.server_auth
            )
            await stack.request("GET", "/no/such", headers={"Authorization": "Bearer secret-x"})
            await stack.request("POST", "/users/3", data=b"{bad", headers=app.server_auth)
    finally:
        configure_logging(level="warning", cache=False)
    text = repr(logs)
    assert logs, "expected some log lines"
    for secret in (granted["data"]["token"], app.secret, md5_hex(app.secret), "secret-x"):
        assert secret not in text


async def test_no_service_trusts_an_unverified_header(stack: Stack) -> None:
    """Identity headers a caller might forge are ignored: only verified credentials count."""
    app = await stack.new_app()
    forged = {"X-Parley-Appid": str(app.appid), "X-Parley-Uid": "1", "X-Parley-Internal": "x"}
    status, body, _ = await stack.request("POST", "/auth/grant", json={"uid": 1}, headers=forged)
    assert (status, body) == (400, {"meta": {"code": 400, "message": "非法的appid"}})


def test_ingress_render_is_stable() -> None:
    assert render_ingress() == render_ingress()
    assert "host: api.example.com" in render_ingress(host="api.example.com")
