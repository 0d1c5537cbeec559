"""The rules models: one pydantic model per kind of document, and the field types they share."""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

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
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

from meshlib.addresses import MAX_HOST, check_address, dns_name
from meshlib.balancing import BALANCERS
from meshlib.balancing.prequal import DEFAULT_OPTIONS as PREQUAL
from meshlib.balancing.prequal import PrequalOptions
from meshlib.endpoint import DEFAULT_DECAY_S
from meshlib.names import service_name_error

__all__ = [
    "KINDS",
    "MAX_ATTEMPTS",
    "MAX_BODY_BYTES",
    "MAX_COUNT",
    "MAX_DURATION",
    "MAX_HEDGES",
    "MAX_RATE",
    "MAX_WEIGHT",
    "AdaptiveConcurrencySpec",
    "AllowRule",
    "AuthorizationDoc",
    "BackoffSpec",
    "BudgetSpec",
    "CircuitBreakerSpec",
    "ConcurrencyLimitDoc",
    "DestinationDoc",
    "DiscoverySpec",
    "Document",
    "Duration",
    "EndpointSpec",
    "EndpointsDoc",
    "ExternalDoc",
    "ExternalPort",
    "ExternalTLS",
    "FaultAbort",
    "FaultDelay",
    "FaultSpec",
    "GatewayDoc",
    "HeaderMatch",
    "HedgeSpec",
    "HostPattern",
    "JwtHeader",
    "JwtRule",
    "ListenerSpec",
    "LoadBalancer",
    "Match",
    "MirrorSpec",
    "OutlierSpec",
    "PeakEwmaSpec",
    "PositiveDuration",
    "PrequalSpec",
    "ProbeBackoffSpec",
    "RateLimitDoc",
    "RedirectSpec",
    "RequestAuthenticationDoc",
    "RetrySpec",
    "RewriteSpec",
    "RouteDoc",
    "RouteRule",
    "ServiceName",
    "StringMatch",
    "SubsetName",
    "Target",
    "TlsCertificateSpec",
    "WeightedRoundRobinSpec",
    "format_duration",
    "parse_duration",
]

KINDS = (
    "Endpoints",
    "Destination",
    "Route",
    "Authorization",
    "RateLimit",
    "RequestAuthentication",
    "Gateway",
    "External",
    "ConcurrencyLimit",
)

# --------------------------------------------------------------------------------------------
# Durations: text with a unit ("250ms", "1m30s"), seconds as a float in Python

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

_SUBSET_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")


def _check_service(name: str) -> str:
    problem = service_name_error(name)  # the one rule (`Mesh(...)` and callers' claims too)
    if problem is not None:
        raise ValueError(problem)
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

_HOST_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*$")


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _check_host_pattern(name: str) -> str:
    if len(name) > 253:
        raise ValueError(f"host name is longer than 253 characters ({len(name)})")
    if not _HOST_RE.match(name):
        raise ValueError(
            f"invalid host {name!r}: a DNS name (shop.example.com) or a wildcard of one (*.example.com), "
            "without a port"
        )
    return name


HostPattern = Annotated[str, BeforeValidator(_lower), AfterValidator(_check_host_pattern)]
"""A host a gateway answers for: an exact DNS name, or `*.suffix` for any name under suffix."""
Hosts = Annotated[tuple[HostPattern, ...], BeforeValidator(_one_or_many), Field(max_length=256)]
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
        # Lax pydantic reads true as 1, "7" as 7 and bytes as text; none is ever meant in rules
        # (a quoted number is a slip the file's author should see, as `true` is).
        if info.field_name is None or info.field_name not in cls.model_fields:
            _plain(value, deep=True)
            return value
        number, holds_models = _field_kinds(cls, info.field_name)
        if number and isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if number and isinstance(value, str):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(f"expected a number, got the string {shown!r} (write it without quotes)")
        _plain(value, deep=not holds_models)
        return value

    def __hash__(self) -> int:
        # pydantic's frozen hash fails on dict fields (labels, subsets, headers).
        return hash((type(self), _freeze(tuple(self.__dict__.values()))))


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


# --------------------------------------------------------------------------------------------
# Endpoints


class EndpointSpec(_Model):
    """One instance of a service as static discovery (or the registry) describes it."""

    address: Annotated[str, AfterValidator(check_address)]  # the registry's too: one notion of an address
    labels: dict[str, str] = {}
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)


class DiscoverySpec(_Model):
    """Where a service's endpoints are discovered (docs/discovery.md): a provider kind, the
    service's name there (the mesh name when not set) and the provider's own options, checked
    against its `Options` model with the rest of the rules. The provider's address and
    credentials are process configuration (`Mesh(discovery=...)`), never rules."""

    provider: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=253)
    options: dict[str, Any] = {}


class EndpointsDoc(_Model):
    """The instances of one service: listed (`endpoints`), discovered (`discovery`), or both;
    at least one of the two (an empty list says "none", on purpose)."""

    kind: Literal["Endpoints"]
    service: ServiceName
    endpoints: tuple[EndpointSpec, ...] | None = None
    discovery: DiscoverySpec | None = None

    @property
    def listed(self) -> tuple[EndpointSpec, ...]:
        """The static endpoints (none when only discovered)."""
        return self.endpoints or ()


# --------------------------------------------------------------------------------------------
# Adaptive concurrency (meshlib.resilience.concurrency_limit): the client's `adaptive_concurrency`
# on a Destination and the server's ConcurrencyLimit document


class MinRttSpec(_Model):
    """The gradient controller's minRTT measurement (Envoy's min_rtt_calc_params): the limit
    pinned to `concurrency` for `requests` requests, again every `interval` plus a random delay
    of up to `jitter` percent of it."""

    interval: PositiveDuration = 60.0
    jitter: float = Field(15.0, ge=0, le=100)
    requests: int = Field(50, ge=1, le=10_000)
    concurrency: int = Field(3, ge=1, le=MAX_COUNT)


class GradientSpec(_Model):
    """Options of `algorithm: gradient` (Envoy's gradient controller): the limit is recomputed
    every `interval` from the `percentile` of its latencies; `buffer`: percent over minRTT
    tolerated before the limit shrinks."""

    interval: PositiveDuration = 0.1
    percentile: float = Field(50.0, gt=0, le=100)
    buffer: float = Field(25.0, ge=0, le=1000)
    min_rtt: MinRttSpec = MinRttSpec()


class Gradient2Spec(_Model):
    """Options of `algorithm: gradient2` (Netflix's): a window of at least `window` and
    `min_samples` requests; `tolerance`: how much slower than the long-term latency is still no
    queue; `queue_size`: the growth per window; `long_window`: windows in the long-term average."""

    window: PositiveDuration = 0.1
    min_samples: int = Field(10, ge=1, le=10_000)
    smoothing: float = Field(0.2, gt=0, le=1)
    tolerance: float = Field(1.5, ge=1, le=10)
    queue_size: int = Field(4, ge=0, le=MAX_COUNT)
    long_window: int = Field(600, ge=1, le=1_000_000)


class VegasSpec(_Model):
    """Options of `algorithm: vegas` (Netflix's): `smoothing` of each change (1: none);
    the no-load latency is re-probed every `probe_multiplier` x limit requests (jittered)."""

    smoothing: float = Field(1.0, gt=0, le=1)
    probe_multiplier: int = Field(30, ge=1, le=10_000)


_ALGORITHM_OPTIONS = {"gradient": GradientSpec, "gradient2": Gradient2Spec, "vegas": VegasSpec}


def _only_with_algorithm(value: _Model | None, info: ValidationInfo) -> _Model | None:
    name = info.field_name
    if value is not None and info.data.get("algorithm", name) != name:
        raise ValueError(f"{name} options are only used with algorithm: {name}")
    return value


class AdaptiveConcurrencySpec(_Model):
    """A concurrency limit found from latency: the algorithm, its bounds and its options (the
    options of the algorithm named, defaults when not given; docs/rules.md)."""

    algorithm: Literal["gradient", "gradient2", "vegas"] = "gradient"
    min_limit: int = Field(3, ge=1, le=MAX_COUNT)
    max_limit: int = Field(1000, ge=1, le=MAX_COUNT)
    initial_limit: int = Field(20, ge=1, le=MAX_COUNT)
    gradient: GradientSpec | None = None
    gradient2: Gradient2Spec | None = None
    vegas: VegasSpec | None = None

    @field_validator("max_limit")
    @classmethod
    def _max_over_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_limit")
        if low is not None and value < low:
            raise ValueError(f"must be at least min_limit ({low})")
        return value

    @field_validator("initial_limit")
    @classmethod
    def _initial_within(cls, value: int, info: ValidationInfo) -> int:
        low, high = info.data.get("min_limit"), info.data.get("max_limit")
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"must be between min_limit ({low}) and max_limit ({high})")
        return value

    _options = field_validator("gradient", "gradient2", "vegas")(_only_with_algorithm)

    @model_validator(mode="after")
    def _default_options(self) -> AdaptiveConcurrencySpec:
        if getattr(self, self.algorithm) is None:  # the algorithm's defaults, spelled out
            object.__setattr__(self, self.algorithm, _ALGORITHM_OPTIONS[self.algorithm]())
        return self


MAX_PARTITIONS = 16
_PARTITION_BY_RE = re.compile(r"^(source|header:[!#$%&'*+.^_`|~0-9a-z-]+)$")


def _check_partition_by(value: str | None) -> str | None:
    if value is not None:
        value = value.lower() if value.lower().startswith("header:") else value
        if not _PARTITION_BY_RE.match(value):
            raise ValueError(f"invalid partition_by {value!r}: use source or header:NAME")
    return value


class _ConcurrencyLimitHead(_Model):
    kind: Literal["ConcurrencyLimit"]
    service: ServiceName


class ConcurrencyLimitDoc(AdaptiveConcurrencySpec, _ConcurrencyLimitHead):
    """An adaptive concurrency limit on a service's inbound requests: the excess is answered 503
    with retry-after. `partitions`: caller classes (by `partition_by`, the calling service or a
    header's value) and the share of the limit each is guaranteed. (`kind` and `service` come
    from a base of their own so that they come first, as in every document.)"""

    retry_after: PositiveDuration = 1.0
    partition_by: Annotated[str | None, AfterValidator(_check_partition_by)] = None
    partitions: dict[Annotated[str, Field(min_length=1, max_length=253)], float] = Field(
        {}, max_length=MAX_PARTITIONS
    )

    @field_validator("partitions")
    @classmethod
    def _shares(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if value and info.data.get("partition_by") is None:
            raise ValueError("partitions need partition_by (source or header:NAME)")
        for name, share in value.items():
            if not 0 < share <= 1:
                raise ValueError(f"the share of {name!r} must be above 0 and at most 1, not {share:g}")
        if sum(value.values()) > 1 + 1e-9:
            raise ValueError("the shares add up to more than 1")
        return value


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


class ZoneAwareSpec(_Model):
    """Prefer the caller's zone while it holds its share of healthy endpoints (Envoy's zone
    aware routing; docs/discovery.md). Pools smaller than `min_cluster_size` balance normally."""

    min_cluster_size: int = Field(6, ge=1, le=MAX_COUNT)


PEAK_EWMA_DECAY_MIN = 0.1
PEAK_EWMA_DECAY_MAX = 600.0


class PeakEwmaSpec(_Model):
    """Options of the peak_ewma balancer. `decay`: how long a peak is remembered, and how long an
    endpoint nobody hears from takes to look cheap again (Finagle's and Linkerd's 10 s)."""

    decay: PositiveDuration = DEFAULT_DECAY_S

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, value: float) -> float:
        if not PEAK_EWMA_DECAY_MIN <= value <= PEAK_EWMA_DECAY_MAX:
            low, high = format_duration(PEAK_EWMA_DECAY_MIN), format_duration(PEAK_EWMA_DECAY_MAX)
            raise ValueError(f"must be between {low} and {high}")
        return value


def _within(low: float, high: float) -> AfterValidator:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be between {format_duration(low)} and {format_duration(high)}")
        return value

    return AfterValidator(check)


class PrequalSpec(_Model):
    """Options of the prequal balancer: the Prequal paper's parameters this mesh keeps
    (docs/rules.md#prequal); the defaults suit a Python caller, where a probe costs about what
    a request does."""

    probes_per_query: float = Field(PREQUAL.probes_per_query, ge=0.05, le=8)
    pool_size: int = Field(PREQUAL.pool_size, ge=1, le=64)
    max_age: Annotated[PositiveDuration, _within(0.01, 60.0)] = PREQUAL.max_age
    reuse_budget: int | None = Field(None, ge=1, le=1000)
    remove_per_query: float = Field(PREQUAL.remove_per_query, ge=0, le=4)
    q_rif: float = Field(PREQUAL.q_rif, ge=0, le=1)
    probe_timeout: Annotated[PositiveDuration, _within(0.01, 10.0)] = PREQUAL.probe_timeout
    max_probe_rate: float = Field(PREQUAL.max_probe_rate, ge=1, le=10_000)

    def options(self) -> PrequalOptions:
        """The balancer's options (meshlib.balancing.prequal)."""
        return PrequalOptions(
            probes_per_query=self.probes_per_query,
            pool_size=self.pool_size,
            max_age=self.max_age,
            reuse_budget=self.reuse_budget,
            remove_per_query=self.remove_per_query,
            q_rif=self.q_rif,
            probe_timeout=self.probe_timeout,
            max_probe_rate=self.max_probe_rate,
        )


WRR_PERIOD_MAX = 3600.0
WRR_UPDATE_MIN = 0.1  # A58's floor for weight_update_period
WRR_UPDATE_MAX = 60.0
WRR_PENALTY_MAX = 100.0
WRR_TOLERANCE_MAX = 100.0


class WeightedRoundRobinSpec(_Model):
    """Options of the weighted_round_robin balancer, by gRFC A58's names and defaults: a weight
    counts once reports have come for `blackout_period`, is forgotten when none has come for
    `weight_expiration_period`, the schedule is rebuilt every `weight_update_period`, and errors
    weigh as `eps/qps * error_utilization_penalty` of utilization. Not A58's: an endpoint the
    caller sees answer (or keep a request waiting) more than `latency_tolerance` times longer
    than the median endpoint has its weight cut by the square of as much, and a pick passes
    over one holding more than `latency_tolerance`
    times its share of the requests in flight (0: A58 as written)."""

    blackout_period: Duration = 10.0
    weight_expiration_period: PositiveDuration = 180.0
    weight_update_period: PositiveDuration = 1.0
    error_utilization_penalty: float = Field(1.0, ge=0.0, le=WRR_PENALTY_MAX)
    latency_tolerance: float = Field(2.0, ge=0.0, le=WRR_TOLERANCE_MAX)

    @field_validator("latency_tolerance")
    @classmethod
    def _tolerance_range(cls, value: float) -> float:
        if 0.0 < value < 1.0:
            raise ValueError("must be 0 (off) or at least 1 (the median endpoint itself is never cut)")
        return value

    @field_validator("blackout_period", "weight_expiration_period")
    @classmethod
    def _period_range(cls, value: float) -> float:
        if value > WRR_PERIOD_MAX:
            raise ValueError(f"must be at most {format_duration(WRR_PERIOD_MAX)}")
        return value

    @field_validator("weight_update_period")
    @classmethod
    def _update_range(cls, value: float) -> float:
        if not WRR_UPDATE_MIN <= value <= WRR_UPDATE_MAX:
            low, high = format_duration(WRR_UPDATE_MIN), format_duration(WRR_UPDATE_MAX)
            raise ValueError(f"must be between {low} and {high}")
        return value


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
if TYPE_CHECKING:
    LoadBalancer = str
else:  # the registered names (meshlib.balancing), in their order: one list of balancers
    LoadBalancer = Literal[tuple(BALANCERS)]
_HASH_ON_RE = re.compile(r"^(header|cookie):(.+)$")


class DestinationDoc(_Model):
    """How to reach a service: balancer, subsets, breaker, outlier detection, bulkhead."""

    kind: Literal["Destination"]
    service: ServiceName
    load_balancer: LoadBalancer = "round_robin"
    hash_on: str | None = None
    peak_ewma: PeakEwmaSpec | None = None
    """Options of `load_balancer: peak_ewma` (its decay); only allowed with it."""
    prequal: PrequalSpec | None = None
    """Options of `load_balancer: prequal` (probing and the hot-cold rule); only allowed with it."""
    weighted_round_robin: WeightedRoundRobinSpec | None = None
    """Options of `load_balancer: weighted_round_robin` (A58's periods, error penalty); only with it."""
    subsets: dict[SubsetName, Selector] = {}
    circuit_breaker: CircuitBreakerSpec | None = None
    outlier_detection: OutlierSpec | None = None
    max_concurrent_requests: int | None = Field(None, ge=1, le=MAX_COUNT)
    panic_threshold: int = Field(50, ge=0, le=100)
    """Percent of a pool's endpoints that must be usable (breaker not open, not ejected); below it
    every endpoint is used anyway (Envoy's healthy_panic_threshold). 0 turns panic mode off."""
    zone_aware: ZoneAwareSpec | None = None
    """Zone-aware routing by the endpoints' and the caller's `zone` labels; off when absent."""
    adaptive_concurrency: AdaptiveConcurrencySpec | None = None
    """A limit on requests in flight found from their latency, in place of max_concurrent_requests."""

    @field_validator("adaptive_concurrency")
    @classmethod
    def _one_bulkhead(
        cls, value: AdaptiveConcurrencySpec | None, info: ValidationInfo
    ) -> AdaptiveConcurrencySpec | None:
        if value is not None and info.data.get("max_concurrent_requests") is not None:
            raise ValueError("set max_concurrent_requests or adaptive_concurrency, not both")
        return value

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

    @field_validator("peak_ewma")
    @classmethod
    def _peak_ewma_only(cls, value: PeakEwmaSpec | None, info: ValidationInfo) -> PeakEwmaSpec | None:
        if value is not None and info.data.get("load_balancer", "peak_ewma") != "peak_ewma":
            raise ValueError("peak_ewma options are only used with load_balancer: peak_ewma")
        return value

    @field_validator("prequal")
    @classmethod
    def _prequal_only(cls, value: PrequalSpec | None, info: ValidationInfo) -> PrequalSpec | None:
        if value is not None and info.data.get("load_balancer", "prequal") != "prequal":
            raise ValueError("prequal options are only used with load_balancer: prequal")
        return value

    @field_validator("weighted_round_robin")
    @classmethod
    def _wrr_only(
        cls, value: WeightedRoundRobinSpec | None, info: ValidationInfo
    ) -> WeightedRoundRobinSpec | None:
        if (
            value is not None
            and info.data.get("load_balancer", "weighted_round_robin") != "weighted_round_robin"
        ):
            raise ValueError(
                "weighted_round_robin options are only used with load_balancer: weighted_round_robin"
            )
        return value

    @property
    def ewma_decay(self) -> float | None:
        """The peak-EWMA decay this Destination sets (seconds), or None for the default."""
        return self.peak_ewma.decay if self.peak_ewma is not None else None


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
    hosts: Hosts = ()
    """The request's authority without its port, exact or `*.suffix`; only in a gateway's Route."""

    @field_validator("path")
    @classmethod
    def _paths_are_absolute(cls, value: StringMatch | None) -> StringMatch | None:
        if value is not None:
            literal = value.exact if value.exact is not None else value.prefix
            if literal is not None and not literal.startswith("/"):
                raise ValueError(f"path {literal!r} must start with '/'")
        return value


class Target(_Model):
    """A share of traffic for a subset (None: every endpoint of the service); in a gateway's
    Route, for a mesh `service` instead (whose own Route then picks the subset)."""

    subset: SubsetName | None = None
    weight: int = Field(100, ge=0, le=MAX_WEIGHT)
    service: ServiceName | None = None


RetryOn = Literal[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-status-codes",
    "429",
    # gRPC status codes, judged on the code itself (an HTTP 500 could be INTERNAL or UNKNOWN)
    "unavailable",
    "resource-exhausted",
    "deadline-exceeded",
    "internal",
    "cancelled",
]


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
    status: int = Field(503, ge=200, le=599)  # a final answer: a 1xx is never one


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


_DEFAULT_TO = (Target(),)
_AUTHORITY_MAX = 253 + 6


def _host_or_address(value: str) -> str:
    """host:port or a bare host (a name, an IPv4 or a bracketed IPv6 literal)."""
    if ":" in value.rpartition("]")[2]:  # a port given
        return check_address(value)
    try:
        check_address(f"{value}:1")
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"{value}:1", value)) from None
    return value


class RedirectSpec(_Model):
    """Answer with a redirect instead of calling the service (Istio's HTTPRedirect): each part
    given replaces that part of the request's URL (`prefix` the matched path prefix)."""

    uri: str | None = Field(None, max_length=2048)
    prefix: str | None = Field(None, max_length=2048)
    authority: Annotated[str, AfterValidator(_host_or_address)] | None = Field(
        None, max_length=_AUTHORITY_MAX
    )
    scheme: Literal["http", "https"] | None = None
    code: Literal[301, 302, 303, 307, 308] = 301

    @field_validator("uri", "prefix")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.startswith("/"):
                raise ValueError(f"{value[:80]!r} must start with '/'")
            if any(c in value for c in " \r\n\t#") or not value.isascii():
                raise ValueError(f"{value[:80]!r} must be an encoded URL path (no spaces, '#' or non-ASCII)")
        return value

    @model_validator(mode="after")
    def _something(self) -> RedirectSpec:
        if self.uri is not None and self.prefix is not None:
            raise ValueError("set uri or prefix, not both")
        if self.uri is None and self.prefix is None and self.authority is None and self.scheme is None:
            raise ValueError(
                "set at least one of uri, prefix, authority, scheme (else it redirects to itself)"
            )
        return self


_NOT_WITH_REDIRECT = ("timeout", "retries", "fault", "mirror", "rewrite", "hedge")


class RouteRule(_Model):
    """One rule of a Route: if `match`, send `to` these targets with these policies, or answer
    with a `redirect` (then none of the others)."""

    match: Match = Match()
    to: tuple[Target, ...] = Field((Target(),), min_length=1)
    timeout: PositiveDuration | None = None
    retries: RetrySpec | None = None
    fault: FaultSpec | None = None
    mirror: MirrorSpec | None = None
    rewrite: RewriteSpec | None = None
    hedge: HedgeSpec | None = None
    redirect: RedirectSpec | None = None
    name: str | None = None

    @field_validator("redirect")
    @classmethod
    def _redirect_alone(cls, value: RedirectSpec | None, info: ValidationInfo) -> RedirectSpec | None:
        if value is None:
            return value
        given = [n for n in _NOT_WITH_REDIRECT if info.data.get(n) is not None]
        if info.data.get("to", _DEFAULT_TO) != _DEFAULT_TO:
            given.insert(0, "to")
        if given:
            raise ValueError(
                f"a rule with redirect calls no service, so it takes no {', '.join(given)}; "
                "put those on another rule"
            )
        if value.prefix is not None and "match" in info.data:
            path = info.data["match"].path
            if path is None or path.prefix is None:
                raise ValueError("redirect.prefix needs a prefix path match (match: {path: {prefix: ...}})")
        return value

    @field_validator("to")
    @classmethod
    def _weights(cls, value: tuple[Target, ...]) -> tuple[Target, ...]:
        if sum(t.weight for t in value) <= 0:
            raise ValueError("the target weights add up to 0; at least one must be positive")
        seen: set[tuple[str | None, str | None]] = set()
        for t in value:
            if (t.service, t.subset) in seen:
                if t.service is not None:
                    label = f"service {t.service!r}"
                else:
                    label = f"subset {t.subset!r}" if t.subset is not None else "the whole service"
                raise ValueError(f"{label} is listed twice")
            seen.add((t.service, t.subset))
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


MAX_USERS = 64
"""Entries of `from_users`, values of one claim, audiences: lists a person writes and reads."""
MAX_CLAIMS = 16
_MAX_TEXT = 1024  # an issuer, a principal, an audience, a claim name or value


def _check_user(value: str) -> str:
    if value != "*" and "/" not in value:
        raise ValueError(f"{value[:100]!r} is not a principal: write <issuer>/<subject>, or * for any user")
    return value


def _check_claim_name(name: str) -> str:
    if not name or len(name) > 256:
        raise ValueError("a claim name has 1 to 256 characters")
    return name


_Text = Annotated[str, Field(min_length=1, max_length=_MAX_TEXT)]
ClaimValues = Annotated[
    tuple[_Text, ...], BeforeValidator(_one_or_many), Field(min_length=1, max_length=MAX_USERS)
]


class AllowRule(_Model):
    """Calls that are allowed; an empty list in a field means any value."""

    sources: Annotated[
        tuple[Annotated[str, AfterValidator(_check_source)], ...], BeforeValidator(_one_or_many)
    ] = Field((), alias="from")
    methods: Methods = ()
    paths: Annotated[
        tuple[Annotated[str, AfterValidator(_check_path_glob)], ...], BeforeValidator(_one_or_many)
    ] = ()
    from_users: Annotated[
        tuple[Annotated[_Text, AfterValidator(_check_user)], ...], BeforeValidator(_one_or_many)
    ] = Field((), max_length=MAX_USERS)
    claims: dict[Annotated[str, AfterValidator(_check_claim_name)], ClaimValues] = Field(
        {}, max_length=MAX_CLAIMS
    )

    @property
    def needs_user(self) -> bool:
        """The rule names end users: a request without a verified token never matches it."""
        return bool(self.from_users or self.claims)


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


# --------------------------------------------------------------------------------------------
# End users: JWT verification (docs/security.md, "End users")

MAX_JWT_RULES = 16
MAX_JWKS_BYTES = 256 * 1024
_LOOPBACK_HOSTS = frozenset(("127.0.0.1", "::1", "localhost"))


class JwtHeader(_Model):
    """Where a token is read: a header (lower-cased) and the text before the token in it."""

    name: Annotated[str, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]
    prefix: str = Field("", max_length=64)

    @field_validator("name")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_RE.match(value) or len(value) > 256:
            raise ValueError(f"invalid header name {value[:100]!r}")
        return value


def _jwks_text(value: object) -> object:
    """An inline JWKS may be written as YAML (a mapping) or as JSON text; kept as text."""
    if isinstance(value, Mapping):
        import json

        return json.dumps(value, separators=(",", ":"))
    return value


def _check_jwks(value: str | None) -> str | None:
    if value is None:
        return value
    if len(value) > MAX_JWKS_BYTES:
        raise ValueError(f"longer than {MAX_JWKS_BYTES} characters")
    from meshlib.security.jwk import parse_jwks  # lazily: it loads PyJWT and cryptography

    parse_jwks(value)  # ValueError with the reason
    return value


def _check_jwks_uri(value: str | None) -> str | None:
    if value is None:
        return value
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("write an https:// URL")
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise ValueError("must be https (plain http only to a loopback address): the keys decide who is who")
    return value


class JwtRule(_Model):
    """One token issuer (Istio's JWTRule): who signs, for whom, with which keys, found where."""

    issuer: _Text
    audiences: Annotated[tuple[_Text, ...], BeforeValidator(_one_or_many)] = Field((), max_length=MAX_USERS)
    jwks: Annotated[str | None, BeforeValidator(_jwks_text), AfterValidator(_check_jwks)] = None
    jwks_uri: Annotated[str | None, Field(max_length=2048), AfterValidator(_check_jwks_uri)] = None
    from_headers: tuple[JwtHeader, ...] = Field(
        (JwtHeader(name="authorization", prefix="Bearer "),), min_length=1, max_length=8
    )
    forward: bool = True

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtRule:
        if (self.jwks is None) == (self.jwks_uri is None):
            raise ValueError("give the keys once: jwks (inline) or jwks_uri, not both and not neither")
        return self


class RequestAuthenticationDoc(_Model):
    """How a service verifies its end users' tokens (Istio's RequestAuthentication).

    A request without a token passes (it has no user); one with a token no rule verifies is
    refused with 401. Who may do what is the Authorization document's (`from_users`, `claims`)."""

    kind: Literal["RequestAuthentication"]
    service: ServiceName
    jwt: tuple[JwtRule, ...] = Field(min_length=1, max_length=MAX_JWT_RULES)

    @field_validator("jwt")
    @classmethod
    def _unique_issuers(cls, value: tuple[JwtRule, ...]) -> tuple[JwtRule, ...]:
        issuers = [r.issuer for r in value]
        for issuer in issuers:
            if issuers.count(issuer) > 1:
                raise ValueError(f"issuer {issuer[:100]!r} has more than one rule")
        return value


# --------------------------------------------------------------------------------------------
# Gateway

MAX_LISTENERS = 64
MAX_CERTIFICATES = 256
MAX_TRUSTED_HOPS = 16


class TlsCertificateSpec(_Model):
    """One certificate of an HTTPS listener and the hosts (SNI names) it is served for."""

    hosts: Annotated[tuple[HostPattern, ...], BeforeValidator(_one_or_many)] = Field(
        min_length=1, max_length=256
    )
    certificate: str = Field(min_length=1, max_length=4096)
    """The PEM chain's path (leaf first), read by the gateway process."""
    key: str = Field(min_length=1, max_length=4096)
    """The PEM private key's path."""


class ListenerSpec(_Model):
    """One port of a gateway: plain HTTP, HTTPS (`tls`), or a redirect of everything to HTTPS."""

    port: int = Field(ge=1, le=65535)
    tls: tuple[TlsCertificateSpec, ...] | None = Field(None, min_length=1, max_length=MAX_CERTIFICATES)
    """Certificates chosen by the client's SNI name; the first is the default."""
    https_redirect: bool = False
    """Answer every request with a 301 to https://<host>[:<port of the first tls listener>]<path>."""

    @model_validator(mode="after")
    def _redirect_is_plain(self) -> ListenerSpec:
        if self.https_redirect and self.tls is not None:
            raise ValueError("https_redirect is for a plain HTTP listener; this one has tls")
        return self


class GatewayDoc(_Model):
    """An ingress gateway: its mesh name (`service`) and its listeners. A Route whose service
    names a Gateway is that gateway's route table (docs/gateway.md)."""

    kind: Literal["Gateway"]
    service: ServiceName
    listeners: tuple[ListenerSpec, ...] = Field(min_length=1, max_length=MAX_LISTENERS)
    trusted_hops: int = Field(0, ge=0, le=MAX_TRUSTED_HOPS)
    """Proxies in front of the gateway whose `x-forwarded-for` entries are believed (0: none)."""

    @field_validator("listeners")
    @classmethod
    def _ports(cls, value: tuple[ListenerSpec, ...]) -> tuple[ListenerSpec, ...]:
        ports = [listener.port for listener in value]
        for port in ports:
            if ports.count(port) > 1:
                raise ValueError(f"port {port} is listed more than once")
        if any(listener.https_redirect for listener in value) and not any(
            listener.tls is not None for listener in value
        ):
            raise ValueError("https_redirect needs a listener with tls in this Gateway (where it points)")
        return value

    @property
    def https_port(self) -> int | None:
        """The port HTTPS redirects point at: the first TLS listener's."""
        return next((listener.port for listener in self.listeners if listener.tls is not None), None)


# --------------------------------------------------------------------------------------------
# External hosts (egress)

MAX_PORTS = 64
MAX_EXTERNAL_ENDPOINTS = 1000
_PEM_BEGIN = "-----BEGIN "


def _check_host(name: str) -> str:
    if not dns_name(name, MAX_HOST):
        raise ValueError(f"{name[:80]!r} is not a host name")
    return name


Port = Annotated[int, Field(ge=1, le=65535)]


class ExternalTLS(_Model):
    """TLS originated by the mesh: the app speaks plain HTTP on the declared port, the mesh
    speaks HTTPS upstream (SNI `sni` or the host; verified against `ca`, else the system's CAs)."""

    origination: bool = True
    port: Port = 443
    sni: Annotated[str, AfterValidator(_check_host)] | None = None
    ca: str | None = Field(None, min_length=1, max_length=1_000_000)

    @field_validator("origination")
    @classmethod
    def _originates(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "tls is for origination only; leave tls out for a port the app calls over https itself"
            )
        return value

    @field_validator("ca")
    @classmethod
    def _ca_form(cls, value: str | None) -> str | None:
        if value is not None and _PEM_BEGIN not in value and "\n" in value:
            raise ValueError("ca is a PEM file's path, or PEM text starting with -----BEGIN CERTIFICATE-----")
        return value


class ExternalPort(_Model):
    """One port the app calls an external host on; `tls` makes the mesh originate TLS."""

    port: Port
    tls: ExternalTLS | None = None

    @property
    def upstream(self) -> int:
        """The port the mesh connects to (the TLS port when it originates TLS)."""
        return self.tls.port if self.tls is not None else self.port


class ExternalDoc(_Model):
    """A host outside the mesh that its processes may call (Istio's ServiceEntry): its ports,
    TLS origination, and fixed addresses (else the host's DNS). Destination and Route
    documents for the same name apply to calls to it."""

    kind: Literal["External"]
    service: ServiceName
    ports: tuple[ExternalPort, ...] = Field(
        (ExternalPort(port=80), ExternalPort(port=443)), min_length=1, max_length=MAX_PORTS
    )
    endpoints: tuple[Annotated[str, AfterValidator(_host_or_address)], ...] | None = Field(
        None, min_length=1, max_length=MAX_EXTERNAL_ENDPOINTS
    )

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: tuple[ExternalPort, ...]) -> tuple[ExternalPort, ...]:
        seen: set[int] = set()
        for p in value:
            if p.port in seen:
                raise ValueError(f"port {p.port} is declared twice")
            seen.add(p.port)
        return value

    @field_validator("endpoints")
    @classmethod
    def _unique_endpoints(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            twice = next(e for e in value if value.count(e) > 1)
            raise ValueError(f"endpoint {twice!r} is listed twice")
        return value

    def port(self, number: int) -> ExternalPort | None:
        """The declaration of the port the app called, None if not declared."""
        for p in self.ports:
            if p.port == number:
                return p
        return None


def _kind_of(value: object) -> object:
    return value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)


# A callable discriminator, not `Field(discriminator="kind")`: pydantic refuses a field
# discriminator whose field has a before-validator, and every rules field has one (`_Model`).
Document = Annotated[
    Annotated[EndpointsDoc, Tag("Endpoints")]
    | Annotated[DestinationDoc, Tag("Destination")]
    | Annotated[RouteDoc, Tag("Route")]
    | Annotated[AuthorizationDoc, Tag("Authorization")]
    | Annotated[RateLimitDoc, Tag("RateLimit")]
    | Annotated[RequestAuthenticationDoc, Tag("RequestAuthentication")]
    | Annotated[GatewayDoc, Tag("Gateway")]
    | Annotated[ExternalDoc, Tag("External")]
    | Annotated[ConcurrencyLimitDoc, Tag("ConcurrencyLimit")],
    Discriminator(_kind_of),
]

_DOC_TYPES = (
    EndpointsDoc,
    DestinationDoc,
    RouteDoc,
    AuthorizationDoc,
    RateLimitDoc,
    RequestAuthenticationDoc,
    GatewayDoc,
    ExternalDoc,
    ConcurrencyLimitDoc,
)
_MODELS: dict[str, type[BaseModel]] = dict(zip(KINDS, _DOC_TYPES, strict=True))
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}
_KIND_LIST = ", ".join(KINDS)
