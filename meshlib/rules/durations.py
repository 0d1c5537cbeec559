"""Durations in rules: text with a unit ("250ms", "1m30s"), seconds as a float in Python."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

__all__ = ["MAX_DURATION", "Duration", "PositiveDuration", "format_duration", "parse_duration"]

_UNITS: dict[str, Fraction] = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
    "us": Fraction(1, 1_000_000),
    "µs": Fraction(1, 1_000_000),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs)")
_DURATION_HINT = "write a number and a unit (h, m, s, ms, us), e.g. '250ms', '2s', '1.5s' or '1m30s'"
_DURATION_MAX_TEXT = 64  # longer duration text is a mistake, and a huge number is costly to parse

MAX_DURATION = 86400.0
"""The longest duration a rule may hold (24h): longer is a mistake, never a setting."""


def parse_duration(value: object) -> float:
    """Seconds from a duration string such as "250ms", "2s", "1.5s", "1m", "1h" or "1m30s".

    Bare numbers are refused on purpose: "timeout: 30" could mean seconds or milliseconds,
    and guessing wrong by a factor of 1000 is the kind of mistake that takes a service down.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"a duration needs a unit, e.g. '250ms' or '2s'; got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative: {value!r}")
    if not text:
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    if len(text) > _DURATION_MAX_TEXT:
        raise ValueError(f"duration text is longer than {_DURATION_MAX_TEXT} characters ({len(text)})")
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            if text[pos:].replace(".", "", 1).isdigit():
                raise ValueError(f"duration {value!r} has no unit; {_DURATION_HINT}")
            raise ValueError(f"invalid duration {value!r}; {_DURATION_HINT}")
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    try:
        return float(total)
    except OverflowError:
        raise ValueError(f"duration {value!r} is too long to represent") from None


def format_duration(seconds: float) -> str:
    """The shortest single-unit string that parses back to exactly `seconds`."""
    if seconds == 0:
        return "0s"
    for unit in ("h", "m", "s", "ms", "us"):
        n = round(seconds / _UNITS[unit])
        if n >= 1 and float(n * _UNITS[unit]) == seconds:
            return f"{n}{unit}"
    for places in range(1, 40):
        text = f"{seconds:.{places}f}".rstrip("0")
        if parse_duration(f"{text}s") == seconds:
            return f"{text}s"
    return f"{seconds:.60f}s"  # exact: every float is a finite decimal


def _positive_duration(value: float) -> float:
    if value <= 0:
        raise ValueError("must be longer than 0s")
    return value


def _bounded_duration(value: float) -> float:
    if value > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)}")
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(_bounded_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""Seconds as a float; written as a string with a unit, and dumped back to one."""

PositiveDuration = Annotated[Duration, AfterValidator(_positive_duration)]
