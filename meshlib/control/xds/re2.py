"""Whether gRPC's regex engine (RE2) takes a pattern that Python's `re` took.

A path or header regex RE2 refuses makes a gRPC xDS client NACK the whole route configuration
that carries it, so such a pattern is refused at apply time on a control service that serves xDS
(meshlib.control.plane) and left out by the translation otherwise (translate.py).

The check walks Python's own parse of the pattern (`re._parser`, private: its node kinds are
read by name, and any kind not known here counts as one RE2 lacks) and scans the text for what
the parse hides (escapes, comments). It errs on the side of refusing: a pattern it cannot check
(no `re._parser` on this Python, or a parse it does not know) is refused too. Imports nothing
of Envoy's protos: the apply-time check runs without them.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from typing import Any

from meshlib.rules import RuleSet
from meshlib.rules.errors import RuleProblem
from meshlib.rules.models import RouteDoc

_parser: Any
try:  # private (and untyped): present from 3.11 (sre_parse before); without it every regex is refused
    _parser = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - the Pythons meshlib supports have it
    _parser = None

MAX_REPEAT = 1000  # RE2's largest {n,m}
MAX_SIZE = 300_000  # instructions, estimated high: RE2's default memory budget was measured to hold 699,000

_LACKING = {
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group (?(...)...)",
    "ATOMIC_GROUP": "an atomic group (?>...)",
    "POSSESSIVE_REPEAT": "a possessive repeat (*+, ++, ?+, {n,m}+)",
}
_NODES = {"LITERAL", "NOT_LITERAL", "ANY", "IN", "BRANCH", "SUBPATTERN", "MAX_REPEAT", "MIN_REPEAT", "AT"}
_CLASS_ITEMS = {"LITERAL", "NOT_LITERAL", "RANGE", "CATEGORY", "NEGATE"}
_ANCHORS = {"AT_BEGINNING", "AT_BEGINNING_STRING", "AT_BOUNDARY", "AT_NON_BOUNDARY", "AT_END"}
_ESCAPES = set("aftnrvxdDsSwWbBA")  # the letters both engines read the same way
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLAGS = {re.VERBOSE: "x", re.ASCII: "a", re.LOCALE: "L"}


class Refused(Exception):
    """The reason RE2 would not take the pattern (or might not)."""


@functools.lru_cache(maxsize=1024)  # every rebuild asks again about the same few patterns
def refusal(pattern: str) -> str | None:
    """Why RE2 would refuse `pattern` (a pattern Python compiles), or None if it takes it."""
    try:
        pattern.encode("utf-8")
        _walk_parse(pattern)
        _scan(pattern)
    except UnicodeEncodeError:
        return "not valid UTF-8 (RE2 reads UTF-8 only)"
    except Refused as exc:
        return f"RE2 does not take {exc}; gRPC's xDS clients would refuse the whole route configuration"
    return None


def route_regexes(doc: RouteDoc) -> Iterator[tuple[int, str, str]]:
    """(rule index, field path, pattern) of every regex in a Route document."""
    for index, rule in enumerate(doc.routes):
        if rule.match.path is not None and rule.match.path.regex is not None:
            yield index, f"routes[{index}].match.path.regex", rule.match.path.regex
        for name, header in rule.match.headers.items():
            if header.regex is not None:
                yield index, f"routes[{index}].match.headers.{name}.regex", header.regex


def problems(before: RuleSet, after: RuleSet) -> list[RuleProblem]:
    """The regexes RE2 refuses in the Route documents `after` adds or changes: those already in
    force are not refused again (the translation leaves their rules out), so an unrelated
    change is never blocked by an old document."""
    out = []
    for doc in after:
        if doc.kind != "Route" or before.route(doc.service) == doc:
            continue
        for _, where, pattern in route_regexes(doc):
            reason = refusal(pattern)
            if reason is not None:
                out.append(RuleProblem(f"Route/{doc.service}", where, reason))
    return out


def _scan(pattern: str) -> None:
    """What the parse does not show: escapes RE2 reads otherwise, comments, `{,n}`, `[:`."""
    i, n, in_class, class_start = 0, len(pattern), False, 0
    while i < n:
        c = pattern[i]
        if c == "\\":
            escaped = pattern[i + 1] if i + 1 < n else ""
            if escaped == "Z":
                raise Refused("\\Z (RE2 writes the end of the text \\z)")
            if not escaped.isascii():
                raise Refused(f"the escape \\{escaped}")
            if escaped.isalpha() and (escaped not in _ESCAPES or (in_class and escaped == "b")):
                raise Refused(f"the escape \\{escaped}")
            digit = pattern[i + 2 : i + 3]
            if escaped in tuple("89") or (escaped in tuple("1234567") and digit not in tuple("01234567")):
                raise Refused(f"the escape \\{escaped} (RE2 reads octal from two digits)")
            i += 2
            continue
        if in_class:
            if c == "]" and i > class_start:
                in_class = False
            elif c == "[" and pattern[i + 1 : i + 2] == ":":
                raise Refused("'[:' in a class (RE2 reads a POSIX class)")
        elif c == "[":
            in_class = True
            class_start = i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1
        elif pattern.startswith("(?#", i):
            raise Refused("a comment (?#...)")
        elif pattern.startswith("(?", i):
            flags = re.match(r"[aiLmsux-]*", pattern[i + 2 :])
            letters = set(flags.group()) - set("ims-") if flags else set()
            if letters:  # Python sets `u` already, and `a`, `L`, `x` change what is read
                raise Refused(f"the flag {''.join(sorted(letters))}")
        elif pattern.startswith("{,", i):
            raise Refused("{,n} (RE2 reads it as text)")
        i += 1


def _walk_parse(pattern: str) -> None:
    if _parser is None:
        raise Refused("a regex this Python cannot check for RE2")
    try:
        parsed = _parser.parse(pattern)
        _check_flags(parsed.state.flags)
        for name in parsed.state.groupdict:
            if not _GROUP_NAME.fullmatch(name):
                raise Refused(f"the group name {name!r}")
        size = _size(list(parsed), MAX_REPEAT)
    except Refused:
        raise
    except Exception:  # the private parser changed shape (or a pattern Python would not compile)
        raise Refused("a regex this Python cannot check for RE2") from None
    if "(?i" in pattern or parsed.state.flags & re.IGNORECASE:
        size *= 2  # a letter is two instructions
    if size > MAX_SIZE:
        raise Refused(f"a pattern this large (about {size} instructions; {MAX_SIZE} are allowed)")


def _class_size(items: list[tuple[Any, Any]]) -> int:
    """A class's instructions, estimated high: UTF-8 ranges past ASCII and a negation (the rest
    of Unicode) cost the most; RE2's \\d, \\w and \\s are ASCII."""
    total = 0
    for item, arg in items:
        kind = str(item)
        if kind not in _CLASS_ITEMS:
            raise Refused(f"a class item RE2 may lack ({item})")
        if kind == "RANGE":
            total += 2 if arg[1] < 0x80 else 16
        elif kind == "NEGATE":
            total += 24
        else:
            total += 4
    return total


def _check_flags(flags: int) -> None:
    for flag, letter in _FLAGS.items():
        if flags & flag:
            raise Refused(f"the flag {letter}")


def _size(nodes: list[tuple[Any, Any]], budget: int) -> int:
    """About how many instructions RE2 compiles the pattern to, repeats multiplied out; Refused
    at a node RE2 lacks. `budget`: what nested counted repeats may still multiply to (RE2
    refuses a product of nested {n,m} counts over 1000)."""
    total = 0
    for op, arg in nodes:
        kind = str(op)
        if kind in _LACKING:
            raise Refused(_LACKING[kind])
        if kind not in _NODES:
            raise Refused(f"a construct RE2 may lack ({kind})")
        if kind == "LITERAL":
            total += len(chr(arg).encode("utf-8", "replace"))
        elif kind in ("NOT_LITERAL", "ANY"):
            total += 16  # any UTF-8 sequence but one: measured 12
        elif kind == "AT":
            if str(arg) not in _ANCHORS:
                end = str(arg) == "AT_END_STRING"
                raise Refused("\\Z (RE2 writes the end of the text \\z)" if end else f"the anchor {arg}")
            total += 1
        elif kind == "IN":
            total += _class_size(arg)
        elif kind == "BRANCH":
            total += sum(_size(list(branch), budget) + 1 for branch in arg[1])
        elif kind == "SUBPATTERN":
            _, add, remove, inner = arg
            _check_flags(add | remove)
            total += _size(list(inner), budget) + 2  # a capture's two marks
        else:  # MAX_REPEAT, MIN_REPEAT
            low, high, inner = arg
            count = low if str(high) == "MAXREPEAT" else high
            if low > MAX_REPEAT or count > MAX_REPEAT:
                raise Refused(f"a repeat count over {MAX_REPEAT}")
            within = budget // count if count >= 2 else budget
            if within == 0:
                raise Refused(f"nested repeat counts multiplying past {MAX_REPEAT}")
            total += _size(list(inner), within) * max(count, 1) + 1
    return total
