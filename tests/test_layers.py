"""The protocol-neutral core imports no protocol: a second protocol plugs in beside HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MESHLIB = Path(__file__).resolve().parents[1] / "meshlib"
PACKAGES = ("rules", "balancing", "resilience")
CORE = [
    "pipeline.py",
    "routing.py",
    "snapshot.py",
    "filters.py",
    "endpoint.py",
    "stats.py",
    "headers.py",
    *(f"{pkg}/{f.name}" for pkg in PACKAGES for f in (MESHLIB / pkg).glob("*.py")),
]
PROTOCOLS = {"httpx", "httpcore", "h11", "starlette", "uvicorn", "a2wsgi", "grpc", "sse_starlette"}
ADAPTERS = ("meshlib.http", "meshlib.asgi", "meshlib.wsgi")


def imports(tree: ast.AST, *, top_level_only: bool = False) -> set[str]:
    nodes = getattr(tree, "body", []) if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_protocol(module: str) -> None:
    names = imports(ast.parse((MESHLIB / module).read_text(encoding="utf-8")))
    assert not {n for n in names if n.split(".")[0] in PROTOCOLS}, module
    assert not {n for n in names if n.startswith(ADAPTERS)}, module


def test_the_mesh_imports_the_http_adapters_only_when_a_client_or_server_is_made() -> None:
    tree = ast.parse((MESHLIB / "mesh.py").read_text(encoding="utf-8"))
    top = {n for n in imports(tree, top_level_only=True) if n.startswith(ADAPTERS)}
    assert top == set()
    assert {n for n in imports(tree) if n.startswith(ADAPTERS)} >= {"meshlib.http.clients"}
