"""ORCA load reports in the `endpoint-load-metrics` header's TEXT form.

A server says how loaded it is on its responses (HTTP header, gRPC trailing metadata), e.g.
`TEXT cpu_utilization=0.31, application_utilization=0.5, rps_fractional=120.0, named_metrics.rif=4`.
Parsing is lenient, as a balancer's input should be: a key it does not know or a value it cannot
read is skipped, a header with nothing usable is None, and nothing here raises on what a peer
sends. The BIN and JSON forms are not read (None): meshlib servers send TEXT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshlib.headers import LOAD_REPORT

HEADER = LOAD_REPORT
"""The response header (HTTP) and trailing metadata key (gRPC) a report travels in."""

_PREFIX = "TEXT "
_NAMED = "named_metrics."
_FIELDS = ("cpu_utilization", "mem_utilization", "application_utilization", "rps_fractional", "eps")
_KNOWN = frozenset(_FIELDS)
_EMPTY: Mapping[str, float] = MappingProxyType({})
MAX_HEADER = 4096
"""Longer values are not parsed: a report is a few figures, not a document."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One server's load as it reported it (ORCA's OrcaLoadReport, the fields meshlib uses).

    Utilizations are fractions (cpu_utilization may exceed 1 on a busy multi-core host, as ORCA
    allows); `rps_fractional` and `eps` are requests and errors per second.
    """

    cpu_utilization: float = 0.0
    mem_utilization: float = 0.0
    application_utilization: float = 0.0
    rps_fractional: float = 0.0
    eps: float = 0.0
    named_metrics: Mapping[str, float] = field(default_factory=lambda: _EMPTY)

    @property
    def utilization(self) -> float:
        """A58's choice: the application's own figure when it set one, else the CPU's."""
        return self.application_utilization if self.application_utilization > 0.0 else self.cpu_utilization


def valid_name(name: str) -> bool:
    """A named metric's name fits the TEXT form: no separator, no space, not empty."""
    return bool(name) and not any(c in name for c in ",= \t\r\n")


def _figure(value: float) -> str:
    return f"{value:.6g}"


def format_report(report: LoadReport) -> str:
    """The header value for `report`: zero figures left out but the CPU's (always said)."""
    parts = [f"cpu_utilization={_figure(report.cpu_utilization)}"]
    if report.mem_utilization:
        parts.append(f"mem_utilization={_figure(report.mem_utilization)}")
    if report.application_utilization:
        parts.append(f"application_utilization={_figure(report.application_utilization)}")
    if report.rps_fractional:
        parts.append(f"rps_fractional={_figure(report.rps_fractional)}")
    if report.eps:
        parts.append(f"eps={_figure(report.eps)}")
    for name, value in report.named_metrics.items():
        if valid_name(name):
            parts.append(f"{_NAMED}{name}={_figure(value)}")
    return _PREFIX + ", ".join(parts)


def parse_report(value: str | bytes | None) -> LoadReport | None:
    """The report in a header value, or None when there is none to read (never raises)."""
    if not value or len(value) > MAX_HEADER:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value.startswith(_PREFIX):
        return None
    figures: dict[str, float] = {}
    named: dict[str, float] = {}
    for pair in value[len(_PREFIX) :].split(","):
        key, sep, text = pair.partition("=")
        if not sep:
            continue
        key = key.strip()
        try:
            number = float(text)
        except ValueError:
            continue
        if not math.isfinite(number) or number < 0.0:
            continue
        if key in _KNOWN:
            figures[key] = number
        elif key.startswith(_NAMED) and valid_name(key[len(_NAMED) :]):
            named[key[len(_NAMED) :]] = number
    if not figures and not named:
        return None
    return LoadReport(**figures, named_metrics=MappingProxyType(named) if named else _EMPTY)
