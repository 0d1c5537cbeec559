"""`GET /openapi.json`: the document is valid OpenAPI 3.1, names exactly the routes the app
serves (in both security modes), and describes bodies with the handlers' own models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from starlette.routing import Route

from meshlib.control import ControlSettings, create_app, openapi
from meshlib.rules import KINDS
from tests.control import Control


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    c = Control(tmp_path_factory.mktemp("openapi") / "data")
    yield c
    c.stop()


def served(security: bool, tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route of the app; HEAD goes with GET and is not listed."""
    app = create_app(ControlSettings(tmp_path / f"data-{security}", security=security))
    try:
        return {
            (method, route.path)
            for route in app.routes
            if isinstance(route, Route)
            for method in route.methods or ()
            if method != "HEAD"
        }
    finally:
        app.state.control.close()


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def test_served_at_openapi_json(control: Control) -> None:
    r = control.http.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    assert doc == openapi.document(False)
    assert "/v1/config" in doc["paths"]


@pytest.mark.parametrize("security", [False, True], ids=["plain", "secure"])
def test_every_route_is_documented_and_nothing_else(security: bool, tmp_path: Path) -> None:
    assert served(security, tmp_path) == documented(openapi.document(security))


@pytest.mark.parametrize("security", [False, True], ids=["plain", "secure"])
def test_valid_openapi_31(security: bool) -> None:
    doc = openapi.document(security)
    schemathesis.openapi.from_dict(doc).validate()  # the OAS 3.1 meta-schema
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name  # each a valid JSON Schema 2020-12
    # every $ref resolves
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


def test_path_parameters_match_the_path() -> None:
    for path, item in openapi.document(True)["paths"].items():
        for method, op in item.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == {part[1:-1] for part in path.split("/") if part.startswith("{")}, (method, path)


def body_ref(doc: dict[str, Any], method: str, path: str) -> str:
    return doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_bodies_come_from_the_handlers_models() -> None:
    doc = openapi.document(True)
    assert body_ref(doc, "post", "/v1/registry/{service}").endswith("/RegisterBody")
    assert body_ref(doc, "put", "/v1/registry/{service}/{id}").endswith("/HeartbeatBody")
    ack_forms = doc["paths"]["/v1/ack"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [f["$ref"].rsplit("/", 1)[1] for f in ack_forms["anyOf"]] == ["AckBody", "AckBatch"]
    assert body_ref(doc, "post", "/v1/telemetry").endswith("/Report")
    assert body_ref(doc, "post", "/v1/ca/sign").endswith("/SignBody")
    assert body_ref(doc, "post", "/v1/tokens").endswith("/TokenBody")
    register = doc["components"]["schemas"]["RegisterBody"]
    assert register["additionalProperties"] is False
    assert register["properties"]["ttl"]["maximum"] == 3600
    put_config = doc["paths"]["/v1/config"]["put"]["requestBody"]["content"]
    assert set(put_config) == {"application/json", "application/yaml"}
    kinds = {
        s["properties"]["kind"]["const"]
        for name, s in doc["components"]["schemas"].items()
        if name.endswith(("Doc", "Doc-Input"))
    }
    assert kinds == set(KINDS)


def test_security_per_route() -> None:
    plain, secure = openapi.document(False), openapi.document(True)
    assert plain["paths"]["/v1/config"]["put"]["security"] == [{"adminToken": []}]
    assert "security" not in plain["paths"]["/v1/config"]["get"]
    assert plain["paths"]["/v1/ack"]["post"]["security"] == []
    assert "401" not in plain["paths"]["/v1/ack"]["post"]["responses"]
    ack = secure["paths"]["/v1/ack"]["post"]
    assert {"joinToken": []} in ack["security"] and {"meshCertificate": []} in ack["security"]
    assert {"401", "403"} <= set(ack["responses"])
    sign = secure["paths"]["/v1/ca/sign"]["post"]
    assert {"adminToken": []} not in sign["security"]  # the admin token does not sign
    # security off: the CA endpoints only answer 404
    assert set(plain["paths"]["/v1/ca/sign"]["post"]["responses"]) == {"404"}
    assert set(secure["components"]["securitySchemes"]) == {"adminToken", "joinToken", "meshCertificate"}


def test_watch_is_an_event_stream() -> None:
    watch = openapi.document(False)["paths"]["/v1/watch"]["get"]
    assert set(watch["responses"]["200"]["content"]) == {"text/event-stream"}


def test_watch_answers_the_documented_media_type(control: Control) -> None:
    """The watch stream is left out of the fuzzing (it does not end): one bounded call here."""
    media = set(openapi.document(False)["paths"]["/v1/watch"]["get"]["responses"]["200"]["content"])
    with control.http.stream("GET", "/v1/watch", params={"client": "doc", "service": "orders"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].split(";")[0] in media
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: snapshot"
