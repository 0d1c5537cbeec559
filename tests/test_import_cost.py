"""A client-only process loads no more than it uses: `import meshlib`, a local Mesh and one
client bring in neither the rules models (pydantic), nor the settings model, nor Redis (pybreaker
would import it for a storage the mesh never uses), nor the control link, the servers, mTLS or
the OpenTelemetry SDK; each still loads when it is used. Time and memory are for benchmarks
(bench/import_cost.py); this checks what is loaded, in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a process with a local Mesh and a client never needs: module -> why it would be there.
NOT_FOR_A_CLIENT = {
    "pydantic": "the rules models and the settings model",
    "pydantic_settings": "MeshSettings, with nothing configured",
    "yaml": "rules files",
    "meshlib.rules.models": "the rules models",
    "meshlib.rules.checks": "rules validation",
    "meshlib.rules.loading": "rules parsing",
    "meshlib.rules.file": "a rules file",
    "meshlib.settings": "MeshSettings, with nothing configured",
    "redis": "scope: global rate limits",
    "meshlib.control.link": "a control service",
    "meshlib.security.identity": "mTLS",
    "meshlib.security.tls": "mTLS",
    "cryptography": "certificates",
    "jwt": "RequestAuthentication",
    "meshlib.security.authentication": "RequestAuthentication",
    "opentelemetry": "the API, imported once the app imports it (no provider can be set before)",
    "opentelemetry.sdk": "the app's own SDK",
    "meshlib.telemetry.tracing": "spans and propagators on the OpenTelemetry API",
    "typing_extensions": "the OpenTelemetry API",
    "uvicorn": "Mesh.serve",
    "starlette": "the control service and the dashboard",
    "grpc": "gRPC",
    "meshlib.grpc": "gRPC",
    "meshlib.gateway": "the gateway",
    "meshlib.http.asgi": "the server middleware",
    "meshlib.http.serving": "Mesh.serve",
    "difflib": "the no-endpoints message",
    "dotenv": "pydantic-settings",
    "tenacity": "nothing on the client path",
    "consul": "Consul discovery",
    "kubernetes": "Kubernetes discovery",
    "dns": "DNS discovery (dnspython)",
    "envoy": "the xDS server's Envoy API protos (meshlib control --xds-port)",
    "meshlib.control.xds": "the xDS server",
}


def _run(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter without MESH_* variables; it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_local_mesh_and_a_client_load_nothing_a_client_does_not_use() -> None:
    code = f"""
        import json, sys
        import meshlib
        mesh = meshlib.Mesh("checkout")
        client = mesh.client()
        loaded = sorted(m for m in {sorted(NOT_FOR_A_CLIENT)!r} if m in sys.modules)
        import redis  # still importable as ever
        mesh.close()
        print(json.dumps({{"loaded": loaded}}))
    """
    assert _run(code) == {"loaded": []}


def test_import_meshlib_loads_only_the_errors_and_every_public_name_still_imports() -> None:
    code = """
        import json, sys
        before = set(sys.modules)
        import meshlib
        first = sorted(m for m in set(sys.modules) - before if m.startswith("meshlib"))
        names = {}
        for name in meshlib.__all__:
            namespace = {}
            exec(f"from meshlib import {name}", namespace)
            names[name] = namespace[name] is getattr(meshlib, name)
        hidden = sorted(set(meshlib.__all__) - set(dir(meshlib)))
        print(json.dumps({"first": first, "names": names, "dir": hidden}))
    """
    result = _run(code)
    assert result["first"] == ["meshlib", "meshlib.errors"]
    assert result["names"] and all(result["names"].values())  # type: ignore[union-attr]
    assert result["dir"] == []


def test_the_rules_models_load_with_the_first_document_and_rules_work_as_before() -> None:
    code = """
        import json, sys
        import meshlib
        from meshlib.rules import RuleSet, RulesError
        light = "pydantic" in sys.modules
        from meshlib.rules import parse_documents
        endpoints = [{"address": "127.0.0.1:1"}]
        rules = parse_documents([{"kind": "Endpoints", "service": "orders", "endpoints": endpoints}])
        mesh = meshlib.Mesh("checkout")
        mesh.apply_rules(rules, "1")
        try:
            parse_documents([{"kind": "Endpoints", "service": "orders", "endpoints": [{"adress": "x"}]}])
        except RulesError as exc:
            problems = exc.to_dicts()
        mesh.close()
        print(json.dumps({"light": light, "models": "meshlib.rules.models" in sys.modules,
                          "services": sorted(mesh.snapshot.plans), "problems": problems}))
    """
    result = _run(code)
    assert result["light"] is False
    assert result["models"] is True
    assert "orders" in result["services"]  # type: ignore[operator]
    assert {"document": "Endpoints/orders (document 1 of rules)", "field": "endpoints[0].adress"} in [
        {k: p[k] for k in ("document", "field")}
        for p in result["problems"]  # type: ignore[union-attr]
    ]


def test_meshlib_rules_all_names_every_submodules_public_name() -> None:
    import meshlib.rules as rules
    from meshlib.rules import checks, errors, loading, models, ruleset

    expected = [n for m in (checks, errors, loading, models, ruleset) for n in m.__all__]
    assert rules.__all__ == expected
    namespace: dict[str, object] = {}
    exec("from meshlib.rules import *", namespace)
    assert all(namespace[name] is getattr(rules, name) for name in expected)
    with pytest.raises(AttributeError):
        rules.NoSuchName  # noqa: B018
