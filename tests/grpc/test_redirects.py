"""A redirect rule means nothing to gRPC: a call it matches is refused with UNIMPLEMENTED that
names the rule, and no endpoint is contacted; other rules of the same Route still apply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import meshlib
from tests.conftest import write_rules
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_fleet import EchoFleet, Knobs, echo_fleet, endpoints

__all__ = ["echo_fleet"]  # the fixture, used by name


@pytest.fixture
def mesh(tmp_path: Path, echo_fleet: EchoFleet) -> Iterator[tuple[meshlib.Mesh, Knobs]]:
    knobs, address = echo_fleet.start("a")
    route = {
        "kind": "Route",
        "service": "echo",
        "routes": [
            {"name": "moved", "match": {"path": {"exact": "/meshlib.test.Echo/Unary"}},
             "redirect": {"authority": "elsewhere.example"}},
            {"to": [{}]},
        ],
    }  # fmt: skip
    m = meshlib.Mesh(
        "client", config=write_rules(tmp_path / "mesh.yaml", [endpoints("echo", [address]), route])
    )
    yield m, knobs
    m.close()


def test_a_redirected_rpc_is_refused_and_reaches_no_server(mesh: tuple[meshlib.Mesh, Knobs]) -> None:
    m, knobs = mesh
    stub = echo_pb2_grpc.EchoStub(m.grpc_channel("echo"))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Unary(echo_pb2.Ping(text="hi"))
    assert exc.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "route 'moved' of service 'echo' answers with a redirect" in (exc.value.details() or "")
    assert stub.ClientStream(iter([echo_pb2.Ping(text="a")])).text == "a"  # another method: served
    assert knobs.calls == {"ClientStream": 1}
    assert m.stats.counter("redirects", "echo") == 1
