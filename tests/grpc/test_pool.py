"""The channel pool: one channel per address, retired channels drained before they close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest

import meshlib
from meshlib.grpc.clients import _aio_closer
from meshlib.grpc.pool import ChannelPool
from tests.grpc import echo_pb2
from tests.grpc.echo_fleet import EchoFleet, echo_fleet
from tests.grpc.test_aio_channel import eventually

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


async def test_tasks_leasing_while_another_thread_rotates_never_get_a_closed_aio_channel(
    mesh: meshlib.Mesh,
) -> None:
    """The asyncio pool as `AioMeshChannel` has it: tasks lease on the loop while the Mesh's
    thread rotates and drops the endpoint. No channel is closed while leased, and every channel
    is closed once, and for real (grpc's SHUTDOWN), whether the loop retired it (at its last
    release) or the other thread did (one without RPCs)."""
    closed: list[Any] = []
    by_thread: dict[str, int] = {}
    on_loop = _aio_closer(asyncio.get_running_loop())
    guard = threading.Lock()

    def close(channel: grpc.aio.Channel) -> None:
        with guard:
            closed.append(channel)
            name = threading.current_thread().name
            by_thread[name] = by_thread.get(name, 0) + 1
        on_loop(channel)

    address = "127.0.0.1:9"  # never dialled: no RPC is sent on these channels
    pool = Rotating(mesh, "echo", lambda a, _: grpc.aio.insecure_channel(a), close)
    errors: list[str] = []
    stop = False

    async def lease_and_release() -> None:
        while not stop:
            lease = pool.lease(address)
            await asyncio.sleep(0)  # the RPC's time on the channel: other tasks lease meanwhile
            with guard:
                if lease.channel in closed:
                    errors.append("a channel closed while leased")
            lease.release()
            await asyncio.sleep(0)  # between RPCs: at times no lease is held at all

    def rotate() -> None:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            pool.generation += 1  # a rotation
            pool.keep(frozenset() if pool.generation % 3 == 0 else {address})  # or the endpoint leaves
            time.sleep(0.001)

    tasks = [asyncio.ensure_future(lease_and_release()) for _ in range(2)]
    await asyncio.to_thread(rotate)
    stop = True
    await asyncio.gather(*tasks)
    pool.close()
    assert errors == []
    assert pool.opened > 10 and len(closed) == pool.opened == pool.closed
    assert len({id(c) for c in closed}) == len(closed)  # each once
    assert len(by_thread) == 2  # closed from the loop's thread and from the other one
    await eventually(
        lambda: all(c.get_state() is grpc.ChannelConnectivity.SHUTDOWN for c in closed),
        "every channel shut on its loop",
    )
