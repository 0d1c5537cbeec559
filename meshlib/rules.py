"""Configuration documents: pydantic models, YAML loading and whole-set validation.

Rules arrive as YAML or JSON documents (one per kind and service). They are validated whole:
a set with any problem is refused, and the error lists every problem with the document, the
field path and the reason, so an operator fixes a file in one pass. Nothing here does IO apart
from `load_file` reading its file.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeGuard, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

from meshlib.addresses import check_address

__all__ = [
    "KINDS",
    "AllowRule",
    "AuthorizationDoc",
    "BackoffSpec",
    "BudgetSpec",
    "CircuitBreakerSpec",
    "DestinationDoc",
    "Document",
    "Duration",
    "EmptyRulesFile",
    "EndpointSpec",
    "EndpointsDoc",
    "FaultAbort",
    "FaultDelay",
    "FaultSpec",
    "HeaderMatch",
    "HedgeSpec",
    "Match",
    "MirrorSpec",
    "OutlierSpec",
    "RateLimitDoc",
    "RetrySpec",
    "RewriteSpec",
    "RouteDoc",
    "RouteRule",
    "RuleProblem",
    "RuleSet",
    "RulesError",
    "StringMatch",
    "Target",
    "format_duration",
    "load_bytes",
    "load_file",
    "load_yaml",
    "parse_documents",
    "parse_duration",
    "validate_document",
]

KINDS = ("Endpoints", "Destination", "Route", "Authorization", "RateLimit")

log = logging.getLogger("meshlib.rules")

# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong with one document: where (document, field path) and why."""

    document: str
    field: str
    reason: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.document}: {self.field}: {self.reason}"
        return f"{self.document}: {self.reason}"


class RulesError(ValueError):
    """Rules refused as a whole; `problems` holds every problem found, not just the first."""

    def __init__(self, problems: Iterable[RuleProblem]) -> None:
        self.problems: list[RuleProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid rules")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))

    def to_dicts(self) -> list[dict[str, str]]:
        """The problems as JSON-able dicts (for API error bodies)."""
        return [asdict(p) for p in self.problems]


class EmptyRulesFile(RulesError):
    """A rules file with no document at all: refused, as it may be an edit caught half-way."""


# --------------------------------------------------------------------------------------------
# Durations

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

# --------------------------------------------------------------------------------------------
# Shared field types

_SERVICE_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_SUBSET_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")


def _check_service(name: str) -> str:
    if len(name) > 253:
        raise ValueError(f"service name is longer than 253 characters ({len(name)})")
    if not _SERVICE_RE.match(name):
        raise ValueError(
            f"invalid service name {name!r}: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return name


def _check_subset_name(name: str) -> str:
    if not _SUBSET_RE.match(name):
        raise ValueError(
            f"invalid subset name {name!r}: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return name


def _one_or_many(value: object) -> object:
    """Let a list field be written as a single string (`source: checkout`)."""
    return [value] if isinstance(value, str) else value


def _upper_all(value: object) -> object:
    value = _one_or_many(value)
    if isinstance(value, (list, tuple)):
        return [v.upper() if isinstance(v, str) else v for v in value]
    return value


def _check_method(method: str) -> str:
    if not _METHOD_RE.match(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    return method


def _check_source(name: str) -> str:
    return name if name == "*" else _check_service(name)


ServiceName = Annotated[str, AfterValidator(_check_service)]
SubsetName = Annotated[str, AfterValidator(_check_subset_name)]
Methods = Annotated[tuple[Annotated[str, AfterValidator(_check_method)], ...], BeforeValidator(_upper_all)]
Sources = Annotated[tuple[ServiceName, ...], BeforeValidator(_one_or_many)]
Percent = Annotated[float, Field(ge=0, le=100)]

# Bounds of number fields (docs/rules.md lists them): far above any sensible setting, low enough
# that a typo or a hostile document cannot make the mesh do something absurd.
MAX_WEIGHT = 10_000
MAX_ATTEMPTS = 10
MAX_HEDGES = 5
MAX_COUNT = 1_000_000
"""Counts: consecutive failures, probes, requests in flight, burst, minimum requests."""
MAX_RATE = 1_000_000
"""Rates per second: requests_per_second, budget.min_per_second."""
MAX_BODY_BYTES = 64 * 1024 * 1024


def _freeze(value: object) -> object:
    """A hashable stand-in for a field value (dicts become frozensets of items)."""
    if isinstance(value, dict):
        return frozenset((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _is_number_field(field: FieldInfo) -> bool:
    """An int or float field (durations aside: they are written as text and say so themselves)."""
    metadata = [*field.metadata, *_metadata(field.annotation)]  # Optional[...] keeps its own
    if any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in metadata):
        return False
    tp = _unwrap(field.annotation)
    return isinstance(tp, type) and issubclass(tp, (int, float)) and not issubclass(tp, bool)


def _metadata(tp: Any) -> Iterator[Any]:
    """Every Annotated metadata item in a type, through unions and nested Annotated."""
    if get_origin(tp) is Annotated:
        yield from get_args(tp)[1:]
        yield from _metadata(get_args(tp)[0])
    elif get_origin(tp) is Union or get_origin(tp) is types.UnionType:
        for member in get_args(tp):
            yield from _metadata(member)


def _plain(value: object, deep: bool) -> None:
    """Refuse bytes in a value: lax pydantic would decode them into text silently (YAML's
    `!!binary` makes them), and a name is never binary. Not `deep`: the value holds models,
    which check their own fields (so the error names the innermost field)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (bytes, bytearray, memoryview)):
            raise ValueError("expected text, got binary data (bytes)")
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            if deep:
                stack.extend(item.values())
        elif isinstance(item, (list, tuple)) and (deep or item is value):
            stack.extend(item)


@functools.cache
def _field_kinds(model: type[BaseModel], name: str) -> tuple[bool, bool]:
    """(a number field, a field holding models) of one model field."""
    field = model.model_fields[name]
    holds_models = any(isinstance(t, type) and issubclass(t, BaseModel) for t in _types_in(field.annotation))
    return _is_number_field(field), holds_models


def _types_in(tp: Any) -> Iterator[Any]:
    """Every type mentioned in a type expression (through Annotated, unions, containers)."""
    yield tp
    for arg in get_args(tp):
        if not isinstance(arg, (str, int, float, bool)) and arg is not Ellipsis:
            yield from _types_in(arg)


class _Model(BaseModel):
    """Base of every rules model: immutable, strict about unknown fields, hashable."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: object, info: ValidationInfo) -> object:
        # Lax pydantic reads true as 1 and bytes as text; neither is ever meant in rules.
        if info.field_name is None or info.field_name not in cls.model_fields:
            _plain(value, deep=True)
            return value
        number, holds_models = _field_kinds(cls, info.field_name)
        if number and isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        _plain(value, deep=not holds_models)
        return value

    def __hash__(self) -> int:
        # pydantic's frozen hash fails on dict fields (labels, subsets, headers).
        return hash((type(self), _freeze(tuple(self.__dict__.values()))))


# --------------------------------------------------------------------------------------------
# Endpoints


def _check_address(address: str) -> str:
    return check_address(address)  # the registry's check too: one notion of a valid address


class EndpointSpec(_Model):
    """One instance of a service as static discovery (or the registry) describes it."""

    address: Annotated[str, AfterValidator(_check_address)]
    labels: dict[str, str] = {}
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)


class EndpointsDoc(_Model):
    """Static discovery: the instances of one service."""

    kind: Literal["Endpoints"]
    service: ServiceName
    endpoints: tuple[EndpointSpec, ...]


# --------------------------------------------------------------------------------------------
# Destination


class ProbeBackoffSpec(_Model):
    """How long an open breaker waits before its next probe: `base`, doubled at each failed
    probe, up to `max` (the breaker's `open_for` when not set), with jitter (Linkerd's 1 s to 60 s)."""

    base: PositiveDuration = 1.0
    max: PositiveDuration | None = None


class CircuitBreakerSpec(_Model):
    """Stop calling an endpoint after consecutive failures; probe it again after a growing,
    jittered backoff (see docs/rules.md). `open_for` caps the backoff unless `backoff.max` is set."""

    consecutive_failures: int = Field(5, ge=1, le=MAX_COUNT)
    open_for: PositiveDuration = 30.0
    half_open_requests: int = Field(1, ge=1, le=MAX_COUNT)
    backoff: ProbeBackoffSpec = ProbeBackoffSpec()

    @property
    def probe_max(self) -> float:
        """The longest wait before a probe (seconds)."""
        return float(self.backoff.max if self.backoff.max is not None else self.open_for)

    @property
    def probe_base(self) -> float:
        """The first wait before a probe (seconds); never above `probe_max`."""
        return min(float(self.backoff.base), self.probe_max)


class OutlierSpec(_Model):
    """Ejection of misbehaving endpoints; defaults follow Envoy's outlier detection."""

    consecutive_5xx: int = Field(5, ge=1, le=MAX_COUNT)
    consecutive_gateway_errors: int | None = Field(None, ge=1, le=MAX_COUNT)
    interval: PositiveDuration = 10.0
    base_ejection: PositiveDuration = 30.0
    max_ejection_percent: int = Field(50, ge=0, le=100)
    success_rate_threshold: float = Field(0.8, ge=0, le=1)
    success_rate_window: PositiveDuration = 30.0
    success_rate_min_requests: int = Field(100, ge=1, le=MAX_COUNT)


def _check_selector(selector: dict[str, str]) -> dict[str, str]:
    if not selector:
        raise ValueError(
            "a subset must select at least one label; leave subset out of a target for every endpoint"
        )
    return selector


Selector = Annotated[dict[str, str], AfterValidator(_check_selector)]
LoadBalancer = Literal["round_robin", "random", "least_request", "peak_ewma", "ring_hash"]
_HASH_ON_RE = re.compile(r"^(header|cookie):(.+)$")


class DestinationDoc(_Model):
    """How to reach a service: balancer, subsets, breaker, outlier detection, bulkhead."""

    kind: Literal["Destination"]
    service: ServiceName
    load_balancer: LoadBalancer = "round_robin"
    hash_on: str | None = None
    subsets: dict[SubsetName, Selector] = {}
    circuit_breaker: CircuitBreakerSpec | None = None
    outlier_detection: OutlierSpec | None = None
    max_concurrent_requests: int | None = Field(None, ge=1, le=MAX_COUNT)
    panic_threshold: int = Field(50, ge=0, le=100)
    """Percent of a pool's endpoints that must be usable (breaker not open, not ejected); below it
    every endpoint is used anyway (Envoy's healthy_panic_threshold). 0 turns panic mode off."""

    @field_validator("hash_on")
    @classmethod
    def _hash_on_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("load_balancer", "ring_hash") != "ring_hash":
            raise ValueError("hash_on is only used with load_balancer: ring_hash")
        if value == "source":
            return value
        m = _HASH_ON_RE.match(value)
        if m is None:
            raise ValueError(f"invalid hash_on {value!r}: use header:NAME, cookie:NAME or source")
        kind, name = m.groups()
        if kind == "header":
            name = name.lower()
            if not _HEADER_RE.match(name):
                raise ValueError(f"invalid header name {name!r} in hash_on")
        return f"{kind}:{name}"


# --------------------------------------------------------------------------------------------
# Route


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        choices = ", ".join(names)
        if not given:
            raise ValueError(f"set exactly one of {choices}")
        raise ValueError(f"set exactly one of {choices}, not {' and '.join(given)}")


def _check_regex(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        except (RecursionError, OverflowError, MemoryError):
            raise ValueError("regular expression too large or too deeply nested") from None
    return pattern


Regex = Annotated[str, AfterValidator(_check_regex)]


class StringMatch(_Model):
    """Match a string (the path) exactly, by prefix, or by a regex matching it whole."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StringMatch:
        _exactly_one(self, ("exact", "prefix", "regex"))
        return self


class HeaderMatch(_Model):
    """Match a header's value, or only whether it is present (`present: false`: absent)."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> HeaderMatch:
        _exactly_one(self, ("exact", "prefix", "regex", "present"))
        return self


def _lower_header_names(value: object) -> object:
    if not isinstance(value, Mapping):
        return value
    out: dict[object, object] = {}
    for key, v in value.items():
        name = key.lower() if isinstance(key, str) else key
        if name in out:
            raise ValueError(f"header {name!r} is listed twice (header names are case-insensitive)")
        out[name] = v
    return out


def _check_header_name(name: str) -> str:
    if not _HEADER_RE.match(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


class Match(_Model):
    """Conditions a request must all meet; an empty Match matches every request."""

    path: StringMatch | None = None
    headers: Annotated[
        dict[Annotated[str, AfterValidator(_check_header_name)], HeaderMatch],
        BeforeValidator(_lower_header_names),
    ] = {}
    methods: Methods = ()
    source: Sources = ()

    @field_validator("path")
    @classmethod
    def _paths_are_absolute(cls, value: StringMatch | None) -> StringMatch | None:
        if value is not None:
            literal = value.exact if value.exact is not None else value.prefix
            if literal is not None and not literal.startswith("/"):
                raise ValueError(f"path {literal!r} must start with '/'")
        return value


class Target(_Model):
    """A share of traffic for a subset (None: every endpoint of the service)."""

    subset: SubsetName | None = None
    weight: int = Field(100, ge=0, le=MAX_WEIGHT)


RetryOn = Literal["5xx", "gateway-error", "reset", "connect-failure", "retriable-status-codes", "429"]


def _retry_on(value: object) -> object:
    value = _one_or_many(value)
    if isinstance(value, (list, tuple)):
        # YAML reads an unquoted 429 as a number.
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class BackoffSpec(_Model):
    """Exponential backoff with jitter between retries (Envoy's 25 ms base, 250 ms cap)."""

    base: Duration = 0.025
    max: Duration = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> BackoffSpec:
        if self.max < self.base:
            raise ValueError(
                f"max ({format_duration(self.max)}) is shorter than base ({format_duration(self.base)})"
            )
        return self


class BudgetSpec(_Model):
    """Retries allowed as a share of requests, plus a floor (Finagle's RetryBudget)."""

    percent: Percent = 20.0
    min_per_second: float = Field(10.0, ge=0, le=MAX_RATE)
    window: PositiveDuration = 10.0


class RetrySpec(_Model):
    """When and how often to retry. `attempts` counts every try, the first one included."""

    attempts: int = Field(2, ge=1, le=MAX_ATTEMPTS)
    per_try_timeout: PositiveDuration | None = None
    on: Annotated[tuple[RetryOn, ...], BeforeValidator(_retry_on)] = ("5xx", "reset", "connect-failure")
    retriable_status_codes: tuple[Annotated[int, Field(ge=100, le=599)], ...] = Field(
        (), validate_default=True
    )
    non_idempotent: bool = False
    backoff: BackoffSpec = BackoffSpec()
    budget: BudgetSpec = BudgetSpec()
    max_body_bytes: int = Field(65536, ge=0, le=MAX_BODY_BYTES)

    @model_validator(mode="before")
    @classmethod
    def _yaml11_on_key(cls, data: object) -> object:
        # YAML 1.1 loaders (yaml.safe_load) read the key `on` as the boolean True.
        if isinstance(data, Mapping) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("retriable_status_codes")
    @classmethod
    def _codes_need_condition(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        on = info.data.get("on")
        if value and on is not None and "retriable-status-codes" not in on:
            raise ValueError("listed codes are only retried when 'retriable-status-codes' is in on")
        if not value and on is not None and "retriable-status-codes" in on:
            raise ValueError("'retriable-status-codes' is in on, so list at least one status code here")
        return value


_PERCENTILE_RE = re.compile(r"^p(\d+(?:\.\d+)?)$")


class HedgeSpec(_Model):
    """Send a second copy of a slow request: after a fixed delay, or after a latency percentile.

    Written as `delay: 50ms` or `delay: p95`; the model holds either `delay` (seconds) or
    `percentile` (e.g. 95.0). Without either, hedging waits for the observed p95.
    """

    delay: PositiveDuration | None = None
    percentile: float | None = Field(None, gt=0, lt=100)
    max_hedges: int = Field(1, ge=1, le=MAX_HEDGES)

    @model_validator(mode="before")
    @classmethod
    def _split_delay(cls, data: object) -> object:
        if isinstance(data, Mapping):
            delay = data.get("delay")
            if isinstance(delay, str) and (m := _PERCENTILE_RE.match(delay.strip())):
                if data.get("percentile") is not None:
                    raise ValueError("give the percentile once: delay: p95 or percentile: 95, not both")
                data = {**data, "percentile": float(m.group(1))}
                del data["delay"]
            elif delay is None and data.get("percentile") is None:
                data = {**data, "percentile": 95.0}
        return data

    @model_validator(mode="after")
    def _one_trigger(self) -> HedgeSpec:
        if self.delay is not None and self.percentile is not None:
            raise ValueError("set delay or percentile, not both")
        return self

    @model_serializer(mode="wrap")
    def _dump_percentile_as_delay(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.percentile is not None and "percentile" in data:
            del data["percentile"]
            data["delay"] = f"p{self.percentile!r}".removesuffix(".0")
        return data


class FaultDelay(_Model):
    """Hold a share of requests for `duration` before sending them."""

    percent: Percent = 100.0
    duration: Duration


class FaultAbort(_Model):
    """Answer a share of requests with `status` without sending them."""

    percent: Percent = 100.0
    status: int = Field(503, ge=100, le=599)


class FaultSpec(_Model):
    """Injected faults, for testing how callers cope (Istio's HTTPFaultInjection)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _something(self) -> FaultSpec:
        if self.delay is None and self.abort is None:
            raise ValueError("set delay, abort or both")
        return self


class MirrorSpec(_Model):
    """Copy a share of traffic to a subset; the copy's response is discarded."""

    subset: SubsetName | None = None
    percent: Percent = 100.0


class RewriteSpec(_Model):
    """Replace the matched path prefix before sending."""

    prefix: str

    @field_validator("prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"prefix {value!r} must start with '/'")
        return value


class RouteRule(_Model):
    """One rule of a Route: if `match`, send `to` these targets with these policies."""

    match: Match = Match()
    to: tuple[Target, ...] = Field((Target(),), min_length=1)
    timeout: PositiveDuration | None = None
    retries: RetrySpec | None = None
    fault: FaultSpec | None = None
    mirror: MirrorSpec | None = None
    rewrite: RewriteSpec | None = None
    hedge: HedgeSpec | None = None
    name: str | None = None

    @field_validator("to")
    @classmethod
    def _weights(cls, value: tuple[Target, ...]) -> tuple[Target, ...]:
        if sum(t.weight for t in value) <= 0:
            raise ValueError("the target weights add up to 0; at least one must be positive")
        seen: set[str | None] = set()
        for t in value:
            if t.subset in seen:
                label = f"subset {t.subset!r}" if t.subset is not None else "the whole service"
                raise ValueError(f"{label} is listed twice")
            seen.add(t.subset)
        return value

    @field_validator("rewrite")
    @classmethod
    def _rewrite_needs_prefix(cls, value: RewriteSpec | None, info: ValidationInfo) -> RewriteSpec | None:
        if value is None or "match" not in info.data:
            return value
        path = info.data["match"].path
        if path is None or path.prefix is None:
            raise ValueError("rewrite.prefix needs a prefix path match (match: {path: {prefix: ...}})")
        return value


class RouteDoc(_Model):
    """What traffic for a service goes where; the first rule that matches wins."""

    kind: Literal["Route"]
    service: ServiceName
    routes: tuple[RouteRule, ...] = Field(min_length=1)

    @field_validator("routes")
    @classmethod
    def _unique_names(cls, value: tuple[RouteRule, ...]) -> tuple[RouteRule, ...]:
        names = [r.name for r in value if r.name is not None]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"rule name {name!r} is used more than once")
        return value


# --------------------------------------------------------------------------------------------
# Authorization and rate limits


def _check_path_glob(value: str) -> str:
    if not value.startswith(("/", "*")):
        raise ValueError(f"path pattern {value!r} must start with '/', or with '*' for a suffix ('*.json')")
    return value


class AllowRule(_Model):
    """Calls that are allowed; an empty list in a field means any value."""

    sources: Annotated[
        tuple[Annotated[str, AfterValidator(_check_source)], ...], BeforeValidator(_one_or_many)
    ] = Field((), alias="from")
    methods: Methods = ()
    paths: Annotated[
        tuple[Annotated[str, AfterValidator(_check_path_glob)], ...], BeforeValidator(_one_or_many)
    ] = ()


class AuthorizationDoc(_Model):
    """Who may call a service. Once one exists, a call no rule allows is refused."""

    kind: Literal["Authorization"]
    service: ServiceName
    allow: tuple[AllowRule, ...] = ()


class RateLimitDoc(_Model):
    """A token bucket for a service's inbound requests."""

    kind: Literal["RateLimit"]
    service: ServiceName
    requests_per_second: float = Field(gt=0, le=MAX_RATE)
    burst: int | None = Field(None, ge=0, le=MAX_COUNT)
    scope: Literal["local", "global"] = "local"

    @model_validator(mode="after")
    def _default_burst(self) -> RateLimitDoc:
        if self.burst is None:
            object.__setattr__(self, "burst", math.ceil(self.requests_per_second))
        return self


def _kind_of(value: object) -> object:
    return value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)


# A callable discriminator, not `Field(discriminator="kind")`: pydantic refuses a field
# discriminator whose field has a before-validator, and every rules field has one (`_Model`).
Document = Annotated[
    Annotated[EndpointsDoc, Tag("Endpoints")]
    | Annotated[DestinationDoc, Tag("Destination")]
    | Annotated[RouteDoc, Tag("Route")]
    | Annotated[AuthorizationDoc, Tag("Authorization")]
    | Annotated[RateLimitDoc, Tag("RateLimit")],
    Discriminator(_kind_of),
]

_MODELS: dict[str, type[BaseModel]] = {
    "Endpoints": EndpointsDoc,
    "Destination": DestinationDoc,
    "Route": RouteDoc,
    "Authorization": AuthorizationDoc,
    "RateLimit": RateLimitDoc,
}
_DOC_TYPES = (EndpointsDoc, DestinationDoc, RouteDoc, AuthorizationDoc, RateLimitDoc)
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
_KIND_LIST = ", ".join(KINDS)

# --------------------------------------------------------------------------------------------
# Turning pydantic errors into problems

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _format_loc(loc: Iterable[int | str]) -> str:
    """("routes", 0, "to", 1, "weight") -> "routes[0].to[1].weight"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _unwrap(tp: Any) -> Any:
    """The model or container type under Annotated/Optional wrappers."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that the location `loc` inside `model` points into, if any."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                info = next((f for f in tp.model_fields.values() if f.alias == part), None)
            if info is None:
                return None
            tp = info.annotation
        elif get_origin(tp) in (tuple, list, dict):
            tp = get_args(tp)[-1] if get_origin(tp) is dict else get_args(tp)[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _problems_from(exc: ValidationError, model: type[BaseModel], document: str) -> list[RuleProblem]:
    errors = exc.errors(include_url=False)
    failed_locs = [tuple(e["loc"]) for e in errors]
    problems = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in failed_locs
        ):
            continue  # a list counted short only because its items failed: reported already
        if loc and loc[0] in _MODELS:  # a discriminated union's tag
            loc = loc[1:]
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            msg = f"invalid key: {msg}"
        if err["type"] == "extra_forbidden" and loc:
            parent = _model_at(model, loc[:-1])
            allowed = f"; allowed: {', '.join(_field_names(parent))}" if parent else ""
            msg = f"unknown field{allowed}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "too_short":
            n = err.get("ctx", {}).get("min_length", 1)
            msg = f"needs at least {n} {'entry' if n == 1 else 'entries'}"
        problems.append(RuleProblem(document, _format_loc(loc), msg))
    return problems


# --------------------------------------------------------------------------------------------
# Validation of one document and of a set


def _label(kind: object, service: object, where: str | None) -> str:
    """A document's name for problems: "Route/orders (document 2 of mesh.yaml)", or less."""
    name = ""
    if _known_kind(kind):
        if isinstance(service, str) and len(service) > 1000:  # hostile: do not repeat it whole
            service = f"{service[:100]}..."
        name = f"{kind}/{service}" if isinstance(service, str) and service else kind
    if where is None:
        return name or "document"
    return f"{name} ({where})" if name else where


def _where(index: int, source: str) -> str:
    return f"document {index} of {source}"


def _known_kind(kind: object) -> TypeGuard[str]:
    """Whether `kind` names a model; False for anything else, lists and mappings included."""
    return isinstance(kind, str) and kind in _MODELS


def _shown(value: object, limit: int = 60) -> str:
    """A value for an error message, cut short: hostile input may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _validate_one(raw: object, where: str) -> tuple[Any | None, list[RuleProblem]]:
    if not isinstance(raw, Mapping):
        got = "nothing" if raw is None else type(raw).__name__
        return None, [RuleProblem(where, "", f"a document must be a mapping of fields, got {got}")]
    kind, service = raw.get("kind"), raw.get("service")
    label = _label(kind, service, where)
    if kind is None:
        return None, [RuleProblem(label, "kind", f"required field is missing; one of: {_KIND_LIST}")]
    if not _known_kind(kind):
        reason = f"unknown kind {_shown(kind)}; expected one of: {_KIND_LIST}"
        return None, [RuleProblem(label, "kind", reason)]
    model = _MODELS[kind]
    try:
        doc = model.model_validate(raw)
    except ValidationError as exc:
        return None, _problems_from(exc, model, label) + _raw_checks(raw, label)
    except Exception as exc:  # a validator bug must be a refusal, never a crash of the caller
        log.exception("unexpected error validating %s", label)
        return None, [RuleProblem(label, "", f"could not be validated ({type(exc).__name__})")]
    return doc, _document_checks(doc, label)


def _document_checks(doc: Any, label: str) -> list[RuleProblem]:
    """Checks on one valid document that need a more precise path than a validator can give."""
    if isinstance(doc, EndpointsDoc):
        return _duplicate_addresses([ep.address for ep in doc.endpoints], label)
    return []


def _duplicate_addresses(addresses: Iterable[object], label: str) -> list[RuleProblem]:
    first: dict[str, int] = {}
    problems = []
    for i, address in enumerate(addresses):
        if not isinstance(address, str):
            continue
        if address in first:
            problems.append(
                RuleProblem(
                    label,
                    f"endpoints[{i}].address",
                    f"duplicate address {address} (also endpoints[{first[address]}])",
                )
            )
        else:
            first[address] = i
    return problems


def _raw_checks(raw: Mapping[str, Any], label: str) -> list[RuleProblem]:
    """The checks of `_document_checks` on a document that failed validation, where possible."""
    endpoints = raw.get("endpoints")
    if raw.get("kind") == "Endpoints" and isinstance(endpoints, list):
        return _duplicate_addresses(
            [e.get("address") if isinstance(e, Mapping) else None for e in endpoints], label
        )
    return []


def _reference_checks(
    docs: Iterable[tuple[Any, str]], failed: Mapping[tuple[str, str], frozenset[str] | None] | None = None
) -> list[RuleProblem]:
    """Cross-document checks: route subsets against the Destination of the same service.

    `failed` maps the (kind, service) of documents that did not validate to what is known of
    them: for a Destination, its subset names if they could be read. References into a failed
    document whose subsets are unknown are not checked, so one mistake is not reported as many.
    """
    pairs = list(docs)
    failed = failed or {}
    defined: dict[str, frozenset[str] | None] = {
        d.service: frozenset(d.subsets) for d, _ in pairs if isinstance(d, DestinationDoc)
    }
    for (kind, service), names in failed.items():
        if kind == "Destination":
            defined[service] = names
    problems = []
    for doc, label in pairs:
        if not isinstance(doc, RouteDoc):
            continue
        has_destination = doc.service in defined
        subsets = defined.get(doc.service)
        if has_destination and subsets is None:
            continue
        for i, rule in enumerate(doc.routes):
            refs = [(f"routes[{i}].to[{j}].subset", t.subset) for j, t in enumerate(rule.to)]
            if rule.mirror is not None:
                refs.append((f"routes[{i}].mirror.subset", rule.mirror.subset))
            for field, subset in refs:
                if subset is None:
                    continue
                if not has_destination:
                    reason = f"subset {subset!r} needs a Destination for {doc.service}, and there is none"
                elif subset not in (subsets or ()):
                    reason = f"subset {subset!r} is not defined in Destination/{doc.service}"
                else:
                    continue
                problems.append(RuleProblem(label, field, reason))
    return problems


def validate_document(raw: Mapping[str, Any], *, index: int = 1, source: str = "rules") -> Document:
    """Validate one document on its own (no cross-references); raises RulesError."""
    doc, problems = _validate_one(raw, _where(index, source))
    if problems or doc is None:
        raise RulesError(problems)
    return doc


class _Collected:
    """Raw documents sorted into valid models, what is known of failed ones, and problems."""

    def __init__(self, items: Iterable[tuple[object, str]]) -> None:
        self.valid: list[tuple[Any, str]] = []
        self.failed: dict[tuple[str, str], frozenset[str] | None] = {}
        self.keys: list[tuple[str, str, str]] = []  # (kind, service, where) of every document
        self.problems: list[RuleProblem] = []
        for raw, where in items:
            if isinstance(raw, _DOC_TYPES):
                self.valid.append((raw, where))
                self.keys.append((raw.kind, raw.service, where))
                self.problems.extend(_document_checks(raw, _label(raw.kind, raw.service, where)))
                continue
            doc, found = _validate_one(raw, where)
            self.problems.extend(found)
            if doc is not None and not found:
                self.valid.append((doc, where))
                self.keys.append((doc.kind, doc.service, where))
            elif isinstance(raw, Mapping):
                kind, service = raw.get("kind"), raw.get("service")
                if _known_kind(kind) and isinstance(service, str):
                    self.failed[(kind, service)] = _subset_names(raw)
                    self.keys.append((kind, service, where))


def _subset_names(raw: Mapping[str, Any]) -> frozenset[str] | None:
    """The subset names of a Destination that failed validation, if they can be read."""
    if raw.get("kind") != "Destination":
        return None
    subsets = raw.get("subsets", {})
    if isinstance(subsets, Mapping) and all(isinstance(k, str) for k in subsets):
        return frozenset(subsets)
    return None


def _duplicates(keys: Iterable[tuple[str, str, str | None]]) -> list[RuleProblem]:
    first: dict[tuple[str, str], str | None] = {}
    problems = []
    for kind, service, where in keys:
        if (kind, service) in first:
            earlier = first[(kind, service)] or "the current rules"
            problems.append(
                RuleProblem(
                    _label(kind, service, where),
                    "",
                    f"duplicate {kind} for service {service!r} (already defined by {earlier})",
                )
            )
        else:
            first[(kind, service)] = where
    return problems


def parse_documents(raw: Iterable[Mapping[str, Any]], *, source: str = "rules") -> RuleSet:
    """Validate every document and then the references between them; raises RulesError."""
    items = [(doc, _where(i, source)) for i, doc in enumerate(raw, start=1)]
    return _build(items)


def _build(items: Sequence[tuple[object, str]]) -> RuleSet:
    got = _Collected(items)
    problems = got.problems + _duplicates(got.keys)
    labelled = [(d, _label(d.kind, d.service, w)) for d, w in got.valid]
    problems += _reference_checks(labelled, got.failed)
    if problems:
        raise RulesError(problems)
    return RuleSet._trusted(d for d, _ in got.valid)


# --------------------------------------------------------------------------------------------
# YAML


def _yaml_loader() -> type[yaml.SafeLoader]:
    """A safe loader with YAML 1.2 booleans and no silently repeated keys.

    PyYAML follows YAML 1.1, where `on`, `off`, `yes` and `no` are booleans: the retry key
    `on:` would become True. Only true/false are booleans here.
    """
    base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[valid-type,misc]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key].line + 1})",
                        key_node.start_mark,
                    )
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for ch, resolvers in base.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    return Loader


_Loader = _yaml_loader()


def _yaml_problem(exc: yaml.YAMLError, where: str) -> RuleProblem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    detail = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and "duplicate key" not in str(detail):
        detail = f"{detail} ({context})"
    if mark is not None:
        return RuleProblem(
            where, "", f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {detail}"
        )
    return RuleProblem(where, "", f"YAML error: {detail}")


def load_yaml(text: str, *, source: str = "rules") -> RuleSet:
    """Rules from multi-document YAML (documents separated by `---`; empty ones skipped).

    A document `[]` stands for "no rules" and is skipped too (see `load_bytes`).
    """
    return _build(_yaml_documents(text, source)[0])


def _yaml_documents(text: str, source: str) -> tuple[list[tuple[object, str]], bool]:
    """The raw documents with their names, and whether the text held any document at all."""
    items: list[tuple[object, str]] = []
    index = 0
    found = False
    try:
        for index, raw in enumerate(yaml.load_all(text, Loader=_Loader), start=1):
            found = found or raw is not None
            if raw is not None and raw != []:
                items.append((raw, _where(index, source)))
    except yaml.YAMLError as exc:
        raise RulesError([_yaml_problem(exc, _where(index + 1, source))]) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors let these through: a 5,000-digit integer, very deep nesting.
        problem = f"YAML error: {type(exc).__name__}: {_shown(str(exc), 200)}"
        raise RulesError([RuleProblem(_where(index + 1, source), "", problem)]) from None
    return items, found


_EMPTY_FILE = (
    "the file has no documents; refused so that an emptied or half-written file does not drop "
    "every rule (write [] to have no rules on purpose)"
)


def load_bytes(data: bytes, *, source: str) -> RuleSet:
    """Rules from the content of a rules file, refused whole (RulesError) if anything is wrong.

    Unlike `load_yaml`, a file with no document (empty, only comments or `---`) is refused: an
    editor's truncate-then-write caught in between looks just like it. A file that means to
    hold no rules says so with the document `[]`.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([RuleProblem(source, "", f"not UTF-8 text (byte {exc.start})")]) from None
    items, found = _yaml_documents(text, source)
    if not found:
        raise EmptyRulesFile([RuleProblem(source, "", _EMPTY_FILE)])
    return _build(items)


def load_file(path: str | Path) -> RuleSet:
    """Rules from a YAML file (as `load_bytes`); problems name the file. OSError propagates."""
    p = Path(path)
    return load_bytes(p.read_bytes(), source=p.name)


# --------------------------------------------------------------------------------------------
# The set


class RuleSet:
    """An immutable, validated set of documents: at most one per (kind, service).

    Every way of making a changed set (`apply`, `without`) validates the result whole, so a
    RuleSet in hand is always consistent.
    """

    __slots__ = ("_by_key", "_documents", "_hash")

    EMPTY: ClassVar[RuleSet]
    _documents: tuple[Document, ...]
    _by_key: dict[tuple[str, str], Any]  # (kind, service) -> the document of that kind
    _hash: int | None

    def __init__(self, documents: Iterable[Document] = ()) -> None:
        docs = list(documents)
        checked = _build([(d, f"document {i}") for i, d in enumerate(docs, start=1)])
        self._init(checked.documents)

    @classmethod
    def _trusted(cls, documents: Iterable[Any]) -> RuleSet:
        self = object.__new__(cls)
        self._init(documents)
        return self

    def _init(self, documents: Iterable[Any]) -> None:
        docs = tuple(sorted(documents, key=lambda d: (_KIND_ORDER[d.kind], d.service)))
        object.__setattr__(self, "_documents", docs)
        object.__setattr__(self, "_by_key", {(d.kind, d.service): d for d in docs})
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RuleSet is immutable; use apply() or without()")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RuleSet._trusted, (self._documents,))

    @property
    def documents(self) -> tuple[Document, ...]:
        """Every document, by kind (in KINDS order) then service."""
        return self._documents

    def get(self, kind: str, service: str) -> Document | None:
        """The document of this kind for this service; ValueError for an unknown kind."""
        if not _known_kind(kind):
            raise ValueError(f"unknown kind {_shown(kind)}; expected one of: {_KIND_LIST}")
        return self._by_key.get((kind, service))

    def endpoints(self, service: str) -> EndpointsDoc | None:
        return self._by_key.get(("Endpoints", service))

    def destination(self, service: str) -> DestinationDoc | None:
        return self._by_key.get(("Destination", service))

    def route(self, service: str) -> RouteDoc | None:
        return self._by_key.get(("Route", service))

    def authorization(self, service: str) -> AuthorizationDoc | None:
        return self._by_key.get(("Authorization", service))

    def rate_limit(self, service: str) -> RateLimitDoc | None:
        return self._by_key.get(("RateLimit", service))

    def services(self) -> frozenset[str]:
        """Every service some document is about (the `service` field of each)."""
        return frozenset(d.service for d in self._documents)

    def apply(self, docs: Iterable[Document | Mapping[str, Any]], *, source: str = "update") -> RuleSet:
        """A new set with `docs` added or replacing those of the same (kind, service).

        `docs` may be models or raw mappings (validated here, every problem collected).
        Problems in the result name the new documents by their position in `docs`.
        """
        got = _Collected((d, _where(i, source)) for i, d in enumerate(docs, start=1))
        problems = got.problems + _duplicates(got.keys)
        replaced = {(kind, service) for kind, service, _ in got.keys}
        kept = [d for d in self._documents if (d.kind, d.service) not in replaced]
        labelled = [(d, _label(d.kind, d.service, None)) for d in kept]
        labelled += [(d, _label(d.kind, d.service, w)) for d, w in got.valid]
        problems += _reference_checks(labelled, got.failed)
        if problems:
            raise RulesError(problems)
        return RuleSet._trusted(kept + [d for d, _ in got.valid])

    def without(self, kind: str, service: str) -> RuleSet:
        """A new set without that document (unchanged if absent); refused if others need it."""
        if not _known_kind(kind):
            raise ValueError(f"unknown kind {_shown(kind)}; expected one of: {_KIND_LIST}")
        if (kind, service) not in self._by_key:
            return self
        rest = [d for d in self._documents if (d.kind, d.service) != (kind, service)]
        problems = _reference_checks([(d, _label(d.kind, d.service, None)) for d in rest])
        if problems:
            raise RulesError(problems)
        return RuleSet._trusted(rest)

    def to_dicts(self) -> list[dict[str, Any]]:
        """JSON-able documents without defaults; `parse_documents` of them gives this set back."""
        return [
            d.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
            for d in self._documents
        ]

    def __iter__(self) -> Iterator[Document]:
        return iter(self._documents)

    def __len__(self) -> int:
        return len(self._documents)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return self._documents == other._documents

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(self._documents))
        return self._hash  # type: ignore[return-value]

    def __repr__(self) -> str:
        names = ", ".join(f"{d.kind}/{d.service}" for d in self._documents)
        return f"RuleSet([{names}])"


RuleSet.EMPTY = RuleSet._trusted(())
