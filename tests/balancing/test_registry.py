"""The balancer registry is the one list of balancers: the rules and the docs follow it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshlib.balancing import BALANCERS, REGISTRY
from meshlib.rules import DestinationDoc, RulesError, validate_document

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"


def test_balancers_maps_every_registered_name_to_its_class() -> None:
    assert list(BALANCERS.items()) == [(name, cls) for name, cls, _ in REGISTRY]


@pytest.mark.parametrize("name", list(BALANCERS))
def test_rules_accept_every_registered_balancer(name: str) -> None:
    doc = validate_document({"kind": "Destination", "service": "orders", "load_balancer": name})
    assert isinstance(doc, DestinationDoc) and doc.load_balancer == name


def test_rules_refuse_other_names_and_list_the_registered_ones() -> None:
    with pytest.raises(RulesError) as exc:
        validate_document({"kind": "Destination", "service": "orders", "load_balancer": "least_conn"})
    [problem] = exc.value.problems
    names = [f"'{name}'" for name in BALANCERS]
    assert problem.field == "load_balancer"
    assert problem.reason == f"Input should be {', '.join(names[:-1])} or {names[-1]}"


def test_docs_list_the_registered_balancers() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("| balancer | how it picks |") :].split("\n\n", 1)[0]
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|")) for line in table.splitlines()[2:]]
    assert rows == [(f"`{name}`", about) for name, _, about in REGISTRY]
    field_row = re.search(r"^\| `load_balancer` \| (.+?) \| `round_robin` \|", text, re.M)
    assert field_row is not None
    assert field_row.group(1) == r" \| ".join(f"`{name}`" for name in BALANCERS)
