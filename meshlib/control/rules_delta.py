"""`rules` events as deltas: the shape both ends of the watch agree on (docs/control-api.md).

A delta is a `rules` event with `"base": V` whose `documents` list names each document that
version V has as well by its index in V's list, and gives the others whole. The hub
(`meshlib.control.stream`) sends one only to a stream whose client asked (`?delta=1`) and holds
V (a resuming client names the version it holds in `meshlib.headers.RULES_VERSION`); the client
rebuilds the whole list here, and a delta it cannot apply (another base, an index out of range)
is refused, never guessed at: its watch then starts again, taking the next rules whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Held = tuple[str, int, tuple[dict[str, Any], ...]]
"""(epoch, version, documents): the rules a client received last."""


def expand(data: Mapping[str, Any], held: Held | None) -> tuple[dict[str, Any], ...] | None:
    """The whole document list of a delta `rules` event, given the rules held; None if the
    delta does not apply to them."""
    base, entries = data.get("base"), data.get("documents")
    if held is None or not isinstance(entries, list):
        return None
    epoch, version, documents = held
    if data.get("epoch") != epoch or base != version:
        return None
    out: list[dict[str, Any]] = []
    for entry in entries:
        if isinstance(entry, dict):
            out.append(entry)
        elif type(entry) is int and 0 <= entry < len(documents):
            out.append(documents[entry])
        else:
            return None
    return tuple(out)


def documents_of(keys: Sequence[str], documents: Sequence[Any], index: Mapping[str, int]) -> list[Any] | None:
    """A delta's `documents`: each document whose JSON (`keys`, in order) the base has too
    (`index`: JSON -> its position there) as that position; None when none is shared."""
    out = [index.get(key, doc) for key, doc in zip(keys, documents, strict=True)]
    return out if any(type(entry) is int for entry in out) else None
