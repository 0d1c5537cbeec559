"""Consistent hashing on a ring of virtual nodes (Ketama; Envoy's ring_hash)."""

from __future__ import annotations

import random
import struct
from bisect import bisect_left
from collections.abc import Container, Sequence
from hashlib import blake2b
from operator import itemgetter

from meshlib.balancing.base import NOTHING
from meshlib.balancing.weighted_random import Random, effective_weights
from meshlib.endpoint import Endpoint

DEFAULT_VNODES_PER_WEIGHT = 100
DEFAULT_MAX_RING_SIZE = 1 << 16


_POSITIONS = struct.Struct(">8Q")


def hash64(text: str) -> int:
    """A stable 64-bit hash (the same in every process and run, unlike the builtin `hash`)."""
    return int.from_bytes(blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def ring_positions(address: str, count: int) -> list[int]:
    """The first `count` ring positions of an endpoint: stable, and a prefix of any longer list.

    Point i is the (i % 8)-th 64-bit word of blake2b-512 of f"{address}#{i // 8}": eight points
    per hash, as Ketama takes four from each MD5, which makes building a ring several times
    faster than one hash per point.
    """
    unpack = _POSITIONS.unpack
    positions: list[int] = []
    for j in range((count + 7) // 8):
        positions.extend(unpack(blake2b(f"{address}#{j}".encode("utf-8", "surrogatepass")).digest()))
    del positions[count:]
    return positions


class RingHash:
    """Consistent hashing: a key always lands on the same endpoint while the endpoint set holds.

    Each endpoint owns `vnodes_per_weight x weight` points on a 64-bit ring, at positions
    hashed from its address (`ring_positions`). A key is hashed onto the ring (`hash64`) and
    belongs to the first point at or after it. A point's position depends only on its
    endpoint's address, so the ring is the same whatever the order of the endpoints, and when
    an endpoint leaves, only the keys it owned move (about 1/N of them), each to the next
    endpoint along the ring.

    An excluded endpoint is walked past the same way: the key goes where it would go if that
    endpoint had left. `key=None` gets a weighted random endpoint.

    A point count depends on nothing but the endpoint's own weight, which is what keeps the
    mapping of the other endpoints' keys intact. The one exception is a safety cap: a ring
    that would exceed `max_ring_size` points (default 65536; very large weights) has every
    count halved until it fits, which keeps the lower-numbered points, so only a set that
    crosses the cap moves more keys than its own, once.
    """

    __slots__ = ("_distinct", "_fallback", "_owners", "_points", "endpoints")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random | None = None,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
        max_ring_size: int = DEFAULT_MAX_RING_SIZE,
    ) -> None:
        if vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be at least 1, not {vnodes_per_weight}")
        if max_ring_size < 1:
            raise ValueError(f"max_ring_size must be at least 1, not {max_ring_size}")
        self.endpoints: Sequence[Endpoint] = tuple(endpoints)
        self._fallback = Random(self.endpoints, rng=rng)

        weights = effective_weights(self.endpoints)
        live = [(ep, w) for ep, w in zip(self.endpoints, weights, strict=True) if w > 0]
        size = vnodes_per_weight * sum(w for _, w in live)
        scale = 1.0
        while size * scale > max_ring_size and size * scale > len(live):
            scale /= 2.0

        # In address order, and sorted stably: on a hash collision the address decides, so the
        # ring does not depend on the order the endpoints come in.
        live.sort(key=lambda item: item[0].address)
        positions: list[int] = []
        owners: list[Endpoint] = []
        for ep, w in live:
            count = max(1, int(vnodes_per_weight * w * scale))
            positions += ring_positions(ep.address, count)
            owners += [ep] * count
        order = sorted(range(len(positions)), key=positions.__getitem__)
        if len(order) > 1:
            gather = itemgetter(*order)  # gathers in C: the ring can hold tens of thousands of points
            self._points: list[int] = list(gather(positions))
            self._owners: list[Endpoint] = list(gather(owners))
        else:
            self._points = positions
            self._owners = owners
        self._distinct = len({ep.address for ep, _ in live})

    def pick(self, key: str | None = None, exclude: Container[str] = NOTHING) -> Endpoint | None:
        if key is None:
            return self._fallback.pick(None, exclude)
        points = self._points
        if not points:
            return None
        i = bisect_left(points, hash64(key))
        if i == len(points):
            i = 0
        ep = self._owners[i]
        if ep.address not in exclude:
            return ep
        return self._walk(i, exclude)

    def _walk(self, i: int, exclude: Container[str]) -> Endpoint | None:
        """The first allowed owner after point i, going round the ring once at most."""
        owners = self._owners
        size = len(owners)
        seen = {owners[i].address}
        for _ in range(size - 1):
            i += 1
            if i == size:
                i = 0
            ep = owners[i]
            address = ep.address
            if address not in exclude:
                return ep
            if address not in seen:
                seen.add(address)
                if len(seen) == self._distinct:
                    return None
        return None

    @property
    def ring_size(self) -> int:
        """How many points the ring holds."""
        return len(self._points)

    def __repr__(self) -> str:
        return f"RingHash({len(self.endpoints)} endpoints, {len(self._points)} points)"
