"""The caller's context the middleware makes per request is the dataclass's own, field for field."""

from __future__ import annotations

import dataclasses

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
