"""``GET /openapi.json``: generated from the routing table and the handlers' models, valid
OpenAPI 3.1, listing exactly the routed methods and paths, served through every edge."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from services.openapi import APIS, document
from shared.openapi import Operation, build_document
from shared.routing import ROUTES, openapi_path

from .conftest import Stack


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_it_lists_exactly_the_routing_table() -> None:
    listed = {(method.upper(), path) for path, ops in document()["paths"].items() for method in ops}
    assert listed == {(r.method, openapi_path(r.path)) for r in ROUTES}


def test_auth_schemes_and_the_error_envelope() -> None:
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"basic", "bearer"}
    grant = doc["paths"]["/auth/grant"]["post"]
    assert grant["security"] == [{"serverBasic": []}]
    assert grant["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GrantRequest"
    }
    assert doc["paths"]["/messages"]["get"]["security"] == [{"bearerToken": []}]
    envelope = doc["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["properties"]) == {"meta", "error"}
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorEnvelope"
            }
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_a_row_without_a_description_is_an_error() -> None:
    partial: dict[str, dict[str, Operation]] = {name: dict(api) for name, api in APIS.items()}
    del partial["groups"]["create_group"]
    with pytest.raises(LookupError, match=r"groups\.create_group"):
        build_document(partial, version="0")


async def test_served_through_the_edge(stack: Stack) -> None:
    status, body, resp = await stack.request("GET", "/openapi.json")
    assert status == 200 and resp.content_type == "application/json"
    assert body == document()
