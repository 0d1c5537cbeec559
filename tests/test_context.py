"""The caller's context the middleware makes per request is the dataclass's own, field for field."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from meshlib.context import InboundContext, inbound_context


@pytest.mark.parametrize("deadline", [None, 12.5])
def test_inbound_context_is_the_frozen_dataclass_made_by_its_constructor(deadline: float | None) -> None:
    made = inbound_context("orders", "checkout", deadline, "GET", "/items/7")
    expected = InboundContext("orders", "checkout", deadline, "GET", "/items/7")
    assert type(made) is InboundContext
    assert made == expected and hash(made) == hash(expected) and repr(made) == repr(expected)
    assert dataclasses.astuple(made) == ("orders", "checkout", deadline, "GET", "/items/7")
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.source = "other"  # type: ignore[misc]


def test_inbound_context_keeps_the_dataclass_equality_copy_and_replace() -> None:
    made = inbound_context("orders", "checkout", 12.5, "GET", "/items/7")
    values = ("orders", "checkout", 12.5, "GET", "/items/7")
    assert made != values and values != made and (made == values) is False  # a tuple of its values is not it
    assert made != inbound_context("orders", "checkout", 13.0, "GET", "/items/7")
    assert copy.copy(made) == made and copy.deepcopy(made) == made
    assert pickle.loads(pickle.dumps(made)) == made
    moved = dataclasses.replace(made, deadline=20.0)
    assert type(moved) is InboundContext and moved.deadline == 20.0 and moved.path == "/items/7"
    assert InboundContext("orders", None).remaining() is None and made.remaining(now=10.0) == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        del made.path  # type: ignore[misc]
