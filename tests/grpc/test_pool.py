"""The channel pool: one channel per address, retired channels drained before they close."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

import meshlib
from meshlib.grpc.pool import ChannelPool
from tests.grpc import echo_pb2
from tests.grpc.echo_fleet import EchoFleet, echo_fleet

__all__ = ["echo_fleet"]


class Rotating(ChannelPool):
    """A pool whose security has a generation the test turns, as a certificate rotation does
    (the channels stay plaintext: these tests run without mTLS)."""

    generation = 1

    def _security(self) -> Any:
        return SimpleNamespace(generation=self.generation)


@pytest.fixture
def mesh() -> Iterator[meshlib.Mesh]:
    with meshlib.Mesh("client") as m:
        yield m


def unary(channel: grpc.Channel) -> echo_pb2.Pong:
    send = channel.unary_unary(
        "/meshlib.test.Echo/Unary", echo_pb2.Ping.SerializeToString, echo_pb2.Pong.FromString
    )
    return send(echo_pb2.Ping(text="x"), timeout=5)


def test_a_rotation_opens_new_channels_and_drains_the_old(echo_fleet: EchoFleet, mesh: meshlib.Mesh) -> None:
    _, address = echo_fleet.start("a")
    pool = Rotating(mesh, "echo", lambda a, _: grpc.insecure_channel(a), lambda c: c.close())
    held = pool.lease(address)  # an RPC in flight on the first channel
    again = pool.lease(address)
    assert again is held and pool.opened == 1
    again.release()
    pool.generation = 2
    fresh = pool.lease(address)
    assert fresh is not held and pool.opened == 2
    assert pool.closed == 0 and unary(held.channel).server == "a"  # still serving its RPC
    held.release()
    assert pool.closed == 1
    with pytest.raises(ValueError):
        unary(held.channel)
    assert unary(fresh.channel).server == "a"
    fresh.release()
    pool.close()
    assert pool.closed == 2


def test_an_endpoint_that_leaves_mid_rpc_is_closed_after_it(
    echo_fleet: EchoFleet, mesh: meshlib.Mesh
) -> None:
    _, address = echo_fleet.start("a")
    pool = ChannelPool(mesh, "echo", lambda a, _: grpc.insecure_channel(a), lambda c: c.close())
    lease = pool.lease(address)
    pool.keep(frozenset())
    assert pool.channels() == {} and pool.closed == 0
    assert unary(lease.channel).server == "a"
    lease.release()
    assert pool.closed == 1


def test_threads_leasing_while_channels_rotate_never_get_a_closed_one(mesh: meshlib.Mesh) -> None:
    """Leases of a channel in use take no lock: whatever the interleaving with rotations and
    endpoints leaving, a leased channel is open, and each channel closes once, after its RPCs."""
    closed: list[Any] = []
    guard = threading.Lock()

    def close(channel: grpc.Channel) -> None:
        with guard:
            closed.append(channel)
        channel.close()

    address = "127.0.0.1:9"  # never dialled: no RPC is sent on these channels
    pool = Rotating(mesh, "echo", lambda a, _: grpc.insecure_channel(a), close)
    errors: list[str] = []
    stop = threading.Event()

    def lease_and_release() -> None:
        while not stop.is_set():
            lease = pool.lease(address)
            with guard:
                if lease.channel in closed:
                    errors.append("leased a closed channel")
            lease.release()

    threads = [threading.Thread(target=lease_and_release) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        pool.generation += 1  # a rotation
        pool.keep(frozenset() if pool.generation % 3 == 0 else {address})  # or the endpoint leaves
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join(5)
    pool.close()
    assert errors == []
    assert pool.opened > 10 and len(closed) == pool.opened == pool.closed
    assert len({id(c) for c in closed}) == len(closed)  # each once
