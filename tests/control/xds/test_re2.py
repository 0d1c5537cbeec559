"""Which regexes RE2 (gRPC's regex engine) would refuse: a refused one would make every gRPC
xDS client refuse the whole route configuration. Checked against google-re2 by random patterns when the
check was written (docs/decisions.md); here, one case of each kind."""

from __future__ import annotations

import re

import pytest

from meshlib.control.xds import re2
from meshlib.rules import RuleSet

REFUSED = {
    "/(?=x).*": "a lookahead or lookbehind",
    "/(?<!x)y": "a negative lookahead or lookbehind",
    "/(a)\\1": "a backreference",
    "/(?P<n>a)(?P=n)": "a backreference",
    "/(a)?(?(1)b|c)": "a conditional group",
    "/(?>a)": "an atomic group",
    "/a*+": "a possessive repeat",
    "/a\\Z": "\\Z",
    "(?x)/a b": "the flag x",
    "(?u)/a": "the flag u",
    "/(?#note)a": "a comment",
    "/[\\b]": "the escape \\b",
    "/\\u00e9": "the escape \\u",
    "/[\\1]": "the escape \\1",
    "/a{1001}": "a repeat count over 1000",
    "/(a{100}){11}": "nested repeat counts multiplying past 1000",
    # RE2 takes these, but reads the first two otherwise than Python (as text, as a POSIX class)
    # and the last two may be past what it takes (names beyond ASCII, its memory budget)
    "/a{,3}": "{,n}",
    "/[[:alpha:]]": "'[:' in a class",
    "/(?P<é>a)": "the group name",
    "/" + ".{1000}" * 20: "a pattern this large",
}
TAKEN = [
    "/meshlib\\.test\\.Echo/(Unary|Bidi)",
    "(?i)/orders/[a-z0-9_-]{1,64}",
    "/(?P<svc>[^/]+)/Get.*",
    "\\d+\\s?\\w*\\b[\\]\\-]$",
    "/(a{10}){100}",
    "/\\x41\\0\\012\\t\\_\\ é",
    "(?s:.)(?-i:a)(?m:^)",
    "[]a][^]b]",
]


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize("pattern", sorted(REFUSED))
def test_what_re2_lacks_is_refused_with_its_name(pattern: str) -> None:
    re.compile(pattern)  # every one is a Python regex
    reason = re2.refusal(pattern)
    assert reason is not None and reason.startswith(f"RE2 does not take {REFUSED[pattern]}"), reason


@pytest.mark.parametrize("pattern", TAKEN)
def test_what_both_engines_read_alike_is_taken(pattern: str) -> None:
    assert re2.refusal(pattern) is None


def test_without_python_s_parser_every_regex_is_refused(monkeypatch) -> None:
    """The parser is private: a Python without it refuses rather than guesses."""
    monkeypatch.setattr(re2, "_parser", None)
    re2.refusal.cache_clear()
    try:
        assert "cannot check" in (re2.refusal("/orders/.*") or "")
    finally:
        monkeypatch.undo()
        re2.refusal.cache_clear()
    assert re2.refusal("/orders/.*") is None


def test_only_route_documents_changed_are_checked() -> None:
    old = {"kind": "Route", "service": "old", "routes": [{"match": {"path": {"regex": "/(?=a)"}}}]}
    before = RuleSet().apply([old])
    header = {"match": {"headers": {"x-user": {"regex": "(?!bot).*"}}}}
    after = before.apply([{"kind": "Route", "service": "orders", "routes": [{}, header]}])
    (problem,) = re2.problems(before, after)  # Route/old is in force already: not refused again
    assert (problem.document, problem.field) == ("Route/orders", "routes[1].match.headers.x-user.regex")
    assert problem.reason.startswith("RE2 does not take a negative lookahead")
