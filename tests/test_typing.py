"""The public API as a type checker sees it: mypy on small snippets that use it."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]

CALL = """
import httpx
import meshlib

mesh = meshlib.Mesh("checkout")

@mesh.call("orders")
async def get_order(client: httpx.AsyncClient, order_id: int) -> dict[str, int]:
    return (await client.get(f"/orders/{order_id}")).json()

@mesh.call("orders")
def list_orders(client: httpx.Client, limit: int, *, page: str = "") -> list[str]:
    return client.get("/orders", params={"limit": limit, "page": page}).json()

reveal_type(get_order)
reveal_type(list_orders)

async def use() -> None:
    order = await get_order(7)
    reveal_type(order)
    await get_order("seven")
    list_orders(3, page="x")
    list_orders(limit=3, page=1)
    await get_order(httpx.AsyncClient(), 7)

@mesh.call("orders")
def wrong_client(client: httpx.AsyncClient, n: int) -> int:
    return n
"""


def _mypy(source: str, tmp_path: Path) -> list[str]:
    # a new module name each run: mypy's cache would take a known one as checked and say nothing
    snippet = tmp_path / f"snippet_{uuid.uuid4().hex}.py"
    snippet.write_text(textwrap.dedent(source))
    out, err, _ = mypy_api.run(
        [
            f"--cache-dir={ROOT / '.pytest_cache' / 'mypy'}",  # warm runs take a second
            "--follow-imports=silent",
            "--python-version=3.11",
            "--hide-error-context",
            "--no-error-summary",
            str(snippet),
        ]
    )
    assert not err, err
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(str(snippet))]


def test_mesh_call_drops_the_injected_client_from_the_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the worktree's meshlib, not an installed one
    lines = _mypy(CALL, tmp_path)
    notes = [line for line in lines if line.startswith("note: Revealed type")]
    assert notes == [
        'note: Revealed type is "def (order_id: int) -> typing.Coroutine[Any, Any, dict[str, int]]"',
        'note: Revealed type is "def (limit: int, *, page: str =) -> list[str]"',
        'note: Revealed type is "dict[str, int]"',
    ]
    errors = [line for line in lines if line.startswith("error:")]
    expected = [
        'Argument 1 to "get_order" has incompatible type "str"; expected "int"',
        'Argument "page" to "list_orders" has incompatible type "int"; expected "str"',
        'Too many arguments for "get_order"',  # the client is not the caller's to pass
        'Argument 1 to "get_order" has incompatible type "AsyncClient"; expected "int"',
        # a plain function gets an httpx.Client: asking for an AsyncClient is an error
        'Argument 1 to "__call__" of "ClientInjector" has incompatible type '
        '"Callable[[AsyncClient, int], int]"',
    ]
    assert len(errors) == len(expected), errors
    for error, text in zip(errors, expected, strict=True):
        assert text in error, errors
