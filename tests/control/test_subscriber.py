"""Folding watch events into the client's state."""

from __future__ import annotations

from meshlib.control.subscriber import ControlState, fold


def snapshot() -> ControlState:
    state = fold(
        None, "snapshot", {"epoch": "e1", "revision": 3, "version": 2, "documents": [], "endpoints": {}}
    )
    assert state is not None
    return state


def test_rules_and_endpoints_events_move_the_revision_and_apply() -> None:
    state = fold(snapshot(), "rules", {"epoch": "e1", "revision": 4, "version": 3, "documents": []})
    assert state is not None and (state.revision, state.version) == (4, 3)
    state = fold(state, "endpoints", {"epoch": "e1", "revision": 5, "service": "orders", "endpoints": []})
    assert state is not None and state.revision == 5 and "orders" in state.endpoints


def test_other_event_kinds_move_the_revision_without_changing_anything_else() -> None:
    """A `bundle` event (or a kind added later) must not leave the acked revision behind,
    or the control service would list this client as stale."""
    before = snapshot()
    after = fold(before, "bundle", {"epoch": "e1", "revision": 4, "bundle": "PEM"})
    assert after is not None and after.revision == 4
    assert (after.version, after.documents, after.endpoints) == (
        before.version,
        before.documents,
        before.endpoints,
    )


def test_an_event_of_another_epoch_cannot_be_folded() -> None:
    assert fold(snapshot(), "bundle", {"epoch": "e2", "revision": 4}) is None
