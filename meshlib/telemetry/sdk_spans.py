"""Spans of the OpenTelemetry SDK, made by the mesh where the SDK's answer is known in advance.

The SDK's `Tracer.start_span` asks its sampler through a `SamplingResult`, builds a `_Span`
through a dozen keyword arguments and three bounded containers, and checks every attribute
(types, lengths) one by one: about 107,000 instructions for a span with no attribute, 160,000
with a server span's seven, where the mesh's whole inbound path is 50,000. For the tracers and
samplers the SDK ships with their defaults (an SDK `Tracer`; `ALWAYS_ON`, `ALWAYS_OFF`,
`TraceIdRatioBased`, `ParentBased` over those), the answer is a threshold on the trace id's low
64 bits, and the mesh makes the span itself, as the SDK would:

- unsampled (a dropped root, a child of an unsampled parent): a `NonRecordingSpan` with a new
  span id in the trace (the parent's, or a new random one), the parent's trace state, and the
  random flag as the SDK sets it; no span object, no sampler call;
- sampled: the SDK's own `_Span` class, filled from a template taken once per tracer from a span
  the SDK's constructor made (its resource, scope, limits, processors), with fresh containers;
  attributes known to be valid (str, int, bool, within the span's limits) go straight into the
  span's attribute map. Started and ended (`end`) as the SDK's `Span.start` and `Span.end` do,
  its `ReadableSpan` handed straight to the processors, where those are the SDK's batch and
  simple ones (`Pipeline`); through the SDK's `start` and `end` otherwise.
- sampled, with that pipeline: a light span, of a subclass of `_Span` made per tracer (the
  tracer's fields on the class, the span's own seven in its dict, its attribute map, lists and
  lock made the first time anything asks for them). Ended with none of them asked for (the
  usual server and client span, whose attributes are the mesh's own), its `ReadableSpan` holds
  a plain attribute dict and empty tuples, read by every `ReadableSpan` property as the SDK's
  containers are: a queued span is three objects the collector walks instead of a dozen.

Anything else (another tracer or sampler, a custom id generator or span limits that a value does
not fit, the SDK's own span metrics on, a span class whose fields are not the ones expected) is
left to the SDK, decided once per tracer. tests/telemetry/test_sdk_spans.py holds the two ways
side by side: the same fields, the same exported span.
"""

from __future__ import annotations

import contextlib
import dis
import random
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
)
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from meshlib.telemetry import current_span

LOW_64 = (1 << 64) - 1
ALWAYS = 1 << 64
"""A threshold every trace id's low 64 bits are under (sampled); 0: none is (dropped)."""
_FLAGS = tuple(TraceFlags(n) for n in range(4))
_RANDOM = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
CHILD_FLAGS = tuple(_FLAGS[flags & _RANDOM] for flags in range(16))
"""A dropped child's trace flags, by the low four bits of its parent's (the random bit kept)."""
_SPAN_FIELDS = frozenset(
    {
        "_name", "_context", "_kind", "_instrumentation_info", "_instrumentation_scope", "_parent",
        "_start_time", "_end_time", "_attributes", "_events", "_links", "_resource", "_status",
        "_sampler", "_trace_config", "_record_exception", "_set_status_on_exception",
        "_span_processor", "_limits", "_lock", "_record_end_metrics",
    }
)  # fmt: skip
"""The fields of the SDK's `_Span` (as of SDK 1.45): any other layout, and the SDK makes the
sampled spans."""
_PER_SPAN = frozenset(
    {
        "_name",
        "_context",
        "_kind",
        "_parent",
        "_start_time",
        "_end_time",
        "_attributes",
        "_events",
        "_links",
        "_lock",
    }
)
_ATTRIBUTE_FIELDS = frozenset({"_dict", "maxlen", "dropped", "max_value_len", "_lock", "_immutable"})
_LIST_FIELDS = frozenset({"dropped", "_dq", "_lock"})
MESH_ATTRIBUTES = 16
"""More than the mesh sets on one span, at its start and end together (a server span: 11)."""
_PLAIN = frozenset({str, int, bool})
"""Attribute values the SDK keeps as they are (a float would do too; the mesh sets none)."""
_READABLE_FIELDS = frozenset(
    {
        "_name", "_context", "_kind", "_instrumentation_info", "_instrumentation_scope", "_parent",
        "_start_time", "_end_time", "_attributes", "_events", "_links", "_resource", "_status",
    }
)  # fmt: skip
"""What the SDK's `_Span._readable_span` copies into the `ReadableSpan` its processors get."""
_KNOWN_NAMES = {
    "_Span.start": {"_lock", "_start_time", "logger", "warning", "time_ns", "_span_processor", "on_start"},
    "_Span.end": {
        "_lock", "_start_time", "RuntimeError", "_end_time", "logger", "warning", "time_ns", "_attributes",
        "_immutable", "_record_end_metrics", "_span_processor", "_on_ending", "on_end", "_readable_span",
    },
    "SynchronousMultiSpanProcessor.on_start": {"_span_processors", "on_start"},
    "SynchronousMultiSpanProcessor._on_ending": {"_span_processors", "_on_ending"},
    "SynchronousMultiSpanProcessor.on_end": {"_span_processors", "on_end"},
    "BatchSpanProcessor.on_end": {"context", "trace_flags", "sampled", "_batch_processor", "emit"},
}  # fmt: skip
"""The names each SDK method the mesh stands in for touches (SDK 1.45): a method that touches any
other has changed, and the SDK starts and ends every span again."""
_LIGHT_ATTRIBUTES = "_mesh_attributes"
"""A light span's attribute map (a plain dict of str, int and bool values: the collector does
not track it), the very dict its `_attributes` wraps once something asks for that."""
_ENDED = threading.Lock()
"""Set as `_lock` of a light span the mesh ends: a span whose lock nobody asked for before (no
SDK method that takes it ran), and that any later SDK call then finds ended."""
_NO_ITEMS: tuple[Any, ...] = ()
_LIGHT_DOC = """A sampled span of the SDK's span class as the mesh makes it (`Maker.make_light`):
the tracer's shared fields on the class, the span's own in its dict, and its attribute map,
event and link lists and lock made the first time anything reads them (`__getattr__`). Ended by
the mesh with none of those asked for (the usual server or client span: its attributes are the
mesh's own), it hands the processors a `ReadableSpan` holding the plain attribute dict and empty
tuples for events and links, which every property of a `ReadableSpan` reads as it reads the
SDK's bounded containers: a span queued for export is three objects the collector walks, not a
dozen. Any SDK method the app calls on it (`set_attribute`, `add_event`, `set_status`, `end`)
takes its lock first, and the mesh then ends it as it ends the SDK's own span."""
_new = object.__new__
_bits = random.getrandbits
_time_ns = time.time_ns
_tuple_new = tuple.__new__


def valid_context(
    trace_id: int, span_id: int, remote: bool, flags: TraceFlags, state: Any = None
) -> SpanContext:
    """`SpanContext(trace_id, span_id, remote, flags, state)` for ids known to be valid (non-zero
    and within their widths), without the constructor's checks where its layout is known."""
    if _FAST_CONTEXTS:
        state = DEFAULT_TRACE_STATE if state is None else state  # as the constructor replaces None
        return _tuple_new(SpanContext, (trace_id, span_id, remote, flags, state, True))
    return SpanContext(trace_id, span_id, remote, flags, state)


def _fast_contexts() -> bool:
    """Whether a `SpanContext` is the tuple (trace id, span id, remote, flags, state, valid): then
    one of ids known valid is made without the constructor's checks."""
    flags = TraceFlags(1)
    made = _tuple_new(SpanContext, (1, 2, False, flags, DEFAULT_TRACE_STATE, True))
    checked = SpanContext(1, 2, False, flags)
    return (
        len(checked) == 6
        and made == checked
        and (checked[2], checked[3], checked[4], checked[5]) == (False, flags, DEFAULT_TRACE_STATE, True)
        and checked[3] is flags
        and (made.trace_id, made.span_id, made.is_remote, made.is_valid) == (1, 2, False, True)
        and made.trace_flags is flags
        and made.trace_state is DEFAULT_TRACE_STATE
    )


_FAST_CONTEXTS = _fast_contexts()


def _bare_spans() -> bool:
    """Whether a `NonRecordingSpan` is an object whose `__init__` stores its context as
    `_context` and does nothing else: then one is made without that call."""
    init = NonRecordingSpan.__init__.__code__
    span = _new(NonRecordingSpan)
    span._context = INVALID_SPAN_CONTEXT
    return (
        _FAST_CONTEXTS
        and NonRecordingSpan.__new__ is object.__new__
        and init.co_names == ("_context",)
        and init.co_varnames == ("self", "context")
        and vars(span) == vars(NonRecordingSpan(INVALID_SPAN_CONTEXT))
        and span.get_span_context() is INVALID_SPAN_CONTEXT
    )


_BARE_SPANS = _bare_spans()


@dataclass(frozen=True, slots=True)
class Plan:
    """What the SDK would do for one tracer: a threshold per case (a root; a remote parent,
    sampled or not; a local parent, sampled or not), and how to make a sampled span (None: the
    SDK makes it, and only when its decision cannot differ from this plan's)."""

    root: int | None  # None: the SDK's sampler is asked in that case
    remote_sampled: int | None
    remote_unsampled: int | None
    local_sampled: int | None
    local_unsampled: int | None
    random_root: int  # the random-trace-id flag of a new trace
    new_trace_id: Callable[[], int]
    new_span_id: Callable[[], int]
    enabled: Callable[[], bool]
    maker: Maker | None
    valid_ids: bool  # the SDK's random generator: its ids are valid, their contexts made unchecked
    config: Any  # the tracer, when `enabled` reads only its `_tracer_config.is_enabled` (None: ask it)
    drops: bool = False  # a root `decide_roots` decides, or a `dropped_child`, may come out dropped


class Maker:
    """Makes the SDK's `_Span` from a template (one per tracer): a copy of the shared fields, and
    fresh containers and lock (dict literals, not the constructors' keyword arguments; an empty
    deque copied, not made: a third of the cost)."""

    __slots__ = (
        "_attributes", "_list", "cls", "events", "free", "light", "light_fields", "limits", "links",
        "max_attributes", "max_length", "pipeline", "readable_fields", "room", "shared",
    )  # fmt: skip

    def __init__(self, example: Any) -> None:
        fields = vars(example)
        self.cls = type(example)
        self.shared = dict.fromkeys(_PER_SPAN) | {k: v for k, v in fields.items() if k not in _PER_SPAN}
        self.limits = fields["_limits"]
        self._attributes = type(fields["_attributes"])
        self._list = type(fields["_events"])
        attributes = fields["_attributes"]
        self.max_attributes: int | None = attributes.maxlen
        self.max_length: int | None = attributes.max_value_len
        self.room = self.max_attributes if self.max_attributes is not None else sys.maxsize
        self.free = self.max_length is None and self.room >= MESH_ATTRIBUTES
        """No limit a span's own attributes could reach (the defaults: 128, no length limit):
        the mesh's attributes whose types it knows (`known=`) go in without a check."""
        self.events: deque[Any] = deque(maxlen=fields["_events"]._dq.maxlen)
        self.links: deque[Any] = deque(maxlen=fields["_links"]._dq.maxlen)
        self.pipeline = _pipeline(example)
        self.light: type | None = self._light_class() if self.pipeline is not None else None
        # what a light span and the `ReadableSpan` of one start from (a dict copied and seven
        # fields set costs two thirds of a dict literal of them all)
        self.light_fields = dict.fromkeys(
            ("_name", "_context", "_kind", "_parent", "_start_time", "_end_time", _LIGHT_ATTRIBUTES)
        )
        self.readable_fields = {
            "_name": None,
            "_context": None,
            "_kind": None,
            "_instrumentation_info": fields["_instrumentation_info"],
            "_instrumentation_scope": fields["_instrumentation_scope"],
            "_parent": None,
            "_start_time": None,
            "_end_time": None,
            "_attributes": None,
            "_events": _NO_ITEMS,
            "_links": _NO_ITEMS,
            "_resource": fields["_resource"],
            "_status": fields["_status"],
        }  # the order `_readable_span` gives them

    def _light_class(self) -> type:
        """A subclass of the SDK's span class (one per tracer) whose shared fields are class
        attributes and whose containers (attribute map, event and link lists, lock) are made on
        first use (`__getattr__`: called only for a field the span does not hold yet), so that a
        span nobody but the mesh touches is a dict of seven fields (see `LightSpan`)."""
        maker = self
        namespace: dict[str, Any] = {
            name: staticmethod(value) if hasattr(type(value), "__get__") else value
            for name, value in self.shared.items()
            if name not in _PER_SPAN
        }  # a function kept as a field (the end-of-span metrics callback) must not bind

        def __getattr__(self: Any, name: str) -> Any:
            fields = self.__dict__
            if name == "_lock":
                return fields.setdefault("_lock", threading.Lock())
            if name == "_attributes":
                made = _new(maker._attributes)
                made.__dict__ = {
                    "_dict": fields[_LIGHT_ATTRIBUTES],  # the same map: what the mesh put is there
                    "maxlen": maker.max_attributes,
                    "dropped": 0,
                    "max_value_len": maker.max_length,
                    "_lock": threading.Lock(),
                    "_immutable": fields["_end_time"] is not None,
                }
                return fields.setdefault("_attributes", made)
            if name == "_events" or name == "_links":
                made = _new(maker._list)
                made.__dict__ = {
                    "dropped": 0,
                    "_dq": (maker.events if name == "_events" else maker.links).copy(),
                    "_lock": threading.Lock(),
                }
                return fields.setdefault(name, made)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        namespace["__getattr__"] = __getattr__
        namespace["__module__"] = __name__
        namespace["__doc__"] = _LIGHT_DOC
        metaclass: Any = type(self.cls)  # the API's `Span` is an ABC
        made: type = metaclass("LightSpan", (self.cls,), namespace)
        return made

    def make_light(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind) -> Any:
        """A sampled span started now, of `light`'s class: its own fields only."""
        assert self.light is not None
        span: Any = _new(self.light)
        span.__dict__ = fields = self.light_fields.copy()  # `_end_time` None
        fields["_name"] = name
        fields["_context"] = context
        fields["_kind"] = kind
        fields["_parent"] = parent
        fields["_start_time"] = _time_ns()
        fields[_LIGHT_ATTRIBUTES] = {}
        return span

    def make(
        self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind, started: int | None
    ) -> Any:
        """A span as the SDK's constructor leaves it; `started`: its start time, when the
        processors' `on_start` do nothing (None: `_end_time` None too, started by the caller)."""
        new = _new
        lock = threading.Lock
        fields = self.shared.copy()  # `_start_time` and `_end_time` None, as the constructor leaves them
        fields["_name"] = name
        fields["_context"] = context
        fields["_kind"] = kind
        fields["_parent"] = parent
        fields["_start_time"] = started
        attributes = new(self._attributes)
        attributes.__dict__ = {
            "_dict": {},
            "maxlen": self.max_attributes,
            "dropped": 0,
            "max_value_len": self.max_length,
            "_lock": lock(),
            "_immutable": False,
        }
        fields["_attributes"] = attributes
        events = fields["_events"] = new(self._list)
        events.__dict__ = {"dropped": 0, "_dq": self.events.copy(), "_lock": lock()}
        links = fields["_links"] = new(self._list)
        links.__dict__ = {"dropped": 0, "_dq": self.links.copy(), "_lock": lock()}
        fields["_lock"] = lock()
        span = new(self.cls)
        span.__dict__ = fields
        return span

    def fits(self, span: Any, attributes: Mapping[str, Any]) -> bool:
        """Whether `attributes` (the mesh's own: every key a non-empty str) can go straight into
        `span`'s map: a span this maker made, no key already there, every value a str within the
        length limit, an int or a bool, and room for all."""
        kind = type(span)
        if (kind is not self.cls and kind is not self.light) or span._limits is not self.limits:
            return False
        return self.fits_into(span._attributes._dict, attributes)

    def fits_into(self, present: dict[str, Any], attributes: Mapping[str, Any]) -> bool:
        """Whether `attributes` can join the attribute map `present` as they are (see `fits`)."""
        if present:
            if len(present) + len(attributes) > self.room or not present.keys().isdisjoint(attributes):
                return False
        elif len(attributes) > self.room:
            return False
        values = attributes.values()
        if not _PLAIN.issuperset(map(type, values)):
            return False
        limit = self.max_length
        return limit is None or all(type(v) is not str or len(v) <= limit for v in values)


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A tracer's span processors when the mesh may start and end a span without them: the SDK's
    `SynchronousMultiSpanProcessor` over the SDK's batch and simple processors, none of which
    does anything when a span starts or is ending. `members`: the tuple the multi-processor held
    when planned (it makes a new one when a processor is added: then this pipeline no longer
    applies); `ends`: what each member does with an ended span's `ReadableSpan`, in order (the
    batch processor's queue, the simple processor's `on_end`)."""

    multi: Any
    members: tuple[Any, ...]
    ends: tuple[Callable[[Any], object], ...]
    readable: type
    noop: Any  # the end-of-span metrics callback of a tracer whose SDK self-metrics are off


def _names(function: Any) -> set[str]:
    code = getattr(function, "__code__", None)
    return set(code.co_names) if code is not None else {"?"}


def _does_nothing(function: Any) -> bool:
    """Whether `function`'s body is `pass` (a docstring at most)."""
    try:
        instructions = list(dis.get_instructions(function))
    except TypeError:
        return False
    quiet = {"RESUME", "NOP", "LOAD_CONST", "RETURN_VALUE", "RETURN_CONST", "CACHE"}
    return all(
        i.opname in quiet and (i.opname not in ("LOAD_CONST", "RETURN_CONST") or i.argval is None)
        for i in instructions
    )


def _pipeline(example: Any) -> Pipeline | None:
    """The pipeline of `example`'s processors, if the mesh knows every step of `Span.start` and
    `Span.end` through them (see `_KNOWN_NAMES`), else None: the SDK starts and ends spans."""
    try:
        from opentelemetry.sdk._shared_internal import BatchProcessor
        from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor, _Span
        from opentelemetry.sdk.trace._tracer_metrics import noop
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        return None
    multi = example._span_processor
    members = getattr(multi, "_span_processors", None)
    if not _FAST_CONTEXTS or type(multi) is not SynchronousMultiSpanProcessor or type(members) is not tuple:
        return None
    methods = {
        "_Span.start": _Span.start,
        "_Span.end": _Span.end,
        "SynchronousMultiSpanProcessor.on_start": SynchronousMultiSpanProcessor.on_start,
        "SynchronousMultiSpanProcessor._on_ending": SynchronousMultiSpanProcessor._on_ending,
        "SynchronousMultiSpanProcessor.on_end": SynchronousMultiSpanProcessor.on_end,
        "BatchSpanProcessor.on_end": BatchSpanProcessor.on_end,
    }
    if any(_names(method) != _KNOWN_NAMES[name] for name, method in methods.items()):
        return None
    ends: list[Callable[[Any], object]] = []
    for member in (multi, *members):
        if {"on_start", "_on_ending", "on_end"} & set(vars(member)):  # replaced on the instance
            return None
    for member in members:
        kind = type(member)
        if not (_does_nothing(kind.on_start) and _does_nothing(kind._on_ending)):
            return None
        if kind is BatchSpanProcessor and type(getattr(member, "_batch_processor", None)) is BatchProcessor:
            ends.append(member._batch_processor.emit)  # what its `on_end` does with a sampled span
        elif kind is SimpleSpanProcessor:
            ends.append(member.on_end)
        else:
            return None
    readable = example._readable_span()
    fields = vars(example)
    if (
        type(readable) is not ReadableSpan
        or set(vars(readable)) != _READABLE_FIELDS
        or any(value is not fields[name] for name, value in vars(readable).items())
        or fields["_record_end_metrics"] is not noop
    ):
        return None
    return Pipeline(multi, members, tuple(ends), ReadableSpan, noop)


def _threshold(sampler: Any) -> int | None:
    """The threshold that stands for one of the SDK's simple samplers, None for any other."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased

    if sampler is ALWAYS_ON:
        return ALWAYS
    if sampler is ALWAYS_OFF:
        return 0
    if type(sampler) is TraceIdRatioBased and type(sampler).should_sample is TraceIdRatioBased.should_sample:
        bound = sampler.bound
        limit = getattr(TraceIdRatioBased, "TRACE_ID_LIMIT", None)
        return bound if isinstance(bound, int) and limit == LOW_64 else None
    return None  # another sampler (or another StaticSampler than the SDK's two): asked as usual


def plan_for(tracer: Any) -> Plan | None:
    """The plan for `tracer`, or None: the SDK makes every span."""
    try:
        from opentelemetry.sdk.trace import Tracer as SdkTracer
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError:  # no SDK: a tracer of another kind
        return None
    if type(tracer) is not SdkTracer or type(tracer).start_span is not SdkTracer.start_span:
        return None
    metrics = getattr(tracer, "_tracer_metrics", None)  # the SDK's own span counters, when on
    if metrics is not None and type(metrics).__name__ != "NoOpTracerMetrics":
        return None
    ids: Any = getattr(tracer, "id_generator", None)
    enabled = getattr(tracer, "_is_enabled", None)
    if not callable(enabled) or not callable(getattr(ids, "generate_span_id", None)):
        return None
    sampler = getattr(tracer, "sampler", None)
    if isinstance(sampler, ParentBased) and type(sampler).should_sample is ParentBased.should_sample:
        parts = [
            getattr(sampler, name, None)
            for name in ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled",
                         "_local_parent_sampled", "_local_parent_not_sampled")
        ]  # fmt: skip
        thresholds = [_threshold(part) for part in parts]
    else:
        thresholds = [_threshold(sampler)] * 5
    if all(t is None for t in thresholds):
        return None
    root, remote_sampled, remote_unsampled, local_sampled, local_unsampled = thresholds
    if type(ids).is_trace_id_random is not RandomIdGenerator.is_trace_id_random:
        root = None  # whether a new trace id is random is the generator's to say, each time
    random_root = _RANDOM if ids.is_trace_id_random() else 0
    kind = type(ids)
    valid_ids = (
        _FAST_CONTEXTS
        and kind is RandomIdGenerator
        and not {"generate_span_id", "generate_trace_id"} & set(vars(ids))
        and _names(kind.generate_span_id) == {"random", "getrandbits", "trace", "INVALID_SPAN_ID"}
        and _names(kind.generate_trace_id) == {"random", "getrandbits", "trace", "INVALID_TRACE_ID"}
    )  # its draws are `random.getrandbits`, drawn again on a zero: the mesh draws so itself
    reads_config = _names(getattr(type(tracer), "_is_enabled", None)) == {"_tracer_config", "is_enabled"}
    config = tracer if reads_config and "_is_enabled" not in vars(tracer) else None
    maker = _maker(tracer)
    drops = (
        bool(valid_ids)
        and config is not None
        and (
            (root is not None and root < ALWAYS and (maker is not None or root == 0))  # decide_roots'
            or (remote_unsampled is not None and remote_unsampled < ALWAYS)  # dropped_child's
        )
    )
    return Plan(
        root, remote_sampled, remote_unsampled, local_sampled, local_unsampled, random_root,
        ids.generate_trace_id, ids.generate_span_id, enabled, maker, valid_ids, config, drops,
    )  # fmt: skip


def _maker(tracer: Any) -> Maker | None:
    """A maker from a span the SDK's constructor makes (never started: no processor sees it),
    if its fields are the ones `Maker` knows."""
    try:
        from opentelemetry.sdk.trace import _Span

        example = _Span(
            name="template",
            context=SpanContext(1, 1, is_remote=False),
            parent=None,
            sampler=tracer.sampler,
            resource=tracer.resource,
            attributes=None,
            span_processor=tracer.span_processor,
            kind=SpanKind.INTERNAL,
            links=(),
            instrumentation_info=tracer.instrumentation_info,
            limits=tracer._span_limits,
            instrumentation_scope=tracer._instrumentation_scope,
            record_end_metrics=tracer._tracer_metrics.start_span(None, None),
        )
        fields = vars(example)
        if (
            set(fields) != _SPAN_FIELDS
            or set(vars(fields["_attributes"])) != _ATTRIBUTE_FIELDS
            or set(vars(fields["_events"])) != _LIST_FIELDS
            or set(vars(fields["_links"])) != _LIST_FIELDS
            or type(fields["_events"]) is not type(fields["_links"])
            or fields["_attributes"]._dict
            or fields["_start_time"] is not None
        ):
            return None
        return Maker(example)
    except Exception:  # another SDK layout: the SDK makes sampled spans
        return None


class _Plans:
    """The plan of each tracer: the last one asked in one tuple (a service has one tracer; threads
    see a pair, never half of one), the others in a weak map, so a closed Mesh's provider is not
    kept alive here."""

    __slots__ = ("known", "others")

    def __init__(self) -> None:
        self.known: tuple[Callable[[], Any], Plan | None] = (lambda: None, None)
        self.others: weakref.WeakKeyDictionary[Any, Plan | None] = weakref.WeakKeyDictionary()

    def get(self, tracer: Any) -> Plan | None:
        known, plan = self.known
        if known() is tracer:
            return plan
        try:
            plan = self.others[tracer]
        except KeyError:
            plan = plan_for(tracer)
        except TypeError:  # a tracer without weak references: planned each time
            return plan_for(tracer)
        with contextlib.suppress(TypeError):
            self.others[tracer] = plan
            self.known = (weakref.ref(tracer), plan)
        return plan


plans = _Plans()


def decide_roots(tracer: Tracer, kind: SpanKind, count: int) -> list[Span | int]:
    """`count` new traces of `tracer`, decided before any request needs them (`server.observe`
    keeps a stack, refilled after a response), in the order drawn: for a dropped one, the very
    span `start` would make (a `NonRecordingSpan`: nothing of it depends on the request); for a
    sampled one, a light span of `kind`, made but not started (`begin` names and starts it),
    where the tracer's processors allow one, else its trace id, for `start(..., trace_id=)`.
    An empty list where the plan leaves roots to the SDK (its sampler, its ids or its enabled
    check asked each time). The plan is looked up once for the lot. Whether the tracer is still
    enabled is for the taker to check (`tracer._tracer_config.is_enabled`: the plan reads just
    that)."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    if plan is None or plan.root is None or not plan.valid_ids or plan.config is not tracer:
        return []
    threshold = plan.root
    maker = plan.maker
    if maker is None and 0 < threshold < ALWAYS:
        return []  # a sampled root's id is the SDK's to draw
    pipeline = maker.pipeline if maker is not None else None
    light = pipeline is not None and pipeline.multi._span_processors is pipeline.members
    # valid ids (`plan.valid_ids`): the tuple the constructor would make, as `valid_context`
    dropped, sampled = _FLAGS[plan.random_root], _FLAGS[plan.random_root | 1]
    new_trace_id, new_span_id = plan.new_trace_id, plan.new_span_id
    decided: list[Span | int] = []
    for _ in range(count):
        trace_id = _bits(128) or new_trace_id()
        if trace_id & LOW_64 >= threshold:
            context = (trace_id, _bits(64) or new_span_id(), False, dropped, DEFAULT_TRACE_STATE, True)
            if _BARE_SPANS:  # as in `dropped_child`
                span = _new(NonRecordingSpan)
                span._context = _tuple_new(SpanContext, context)
                decided.append(span)
            else:
                decided.append(NonRecordingSpan(_tuple_new(SpanContext, context)))
        elif light:
            assert maker is not None
            context = (trace_id, _bits(64) or new_span_id(), False, sampled, DEFAULT_TRACE_STATE, True)
            decided.append(maker.make_light("", _tuple_new(SpanContext, context), None, kind))
        else:
            decided.append(trace_id)
    return decided


def drops(tracer: Tracer) -> bool:
    """Whether some request of `tracer` may come out dropped as the mesh decides it (a new trace
    decided ahead, a child of a caller's unsampled trace): False for a sampler that keeps every
    trace (`ALWAYS_ON`), or one the SDK decides. A shell then has nothing to serve lightly."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    return plan is not None and plan.drops


def lightly(tracer: Tracer) -> bool:
    """Whether a shell may serve some request of `tracer` without the full sequence: one that
    comes out dropped (`drops`), or a new trace decided ahead as sampled whose light span is made
    ahead (`decide_roots`; `server.sampled` starts it). False for a sampler the SDK decides."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    if plan is None:
        return False
    if plan.drops:
        return True
    maker = plan.maker
    return (
        plan.root is not None
        and plan.root > 0
        and plan.valid_ids
        and plan.config is tracer
        and maker is not None
        and maker.pipeline is not None
    )


def dropped_child(tracer: Any, trace_id: int, flags: int) -> Span | None:
    """What `start` makes for a child of a remote parent in trace `trace_id` whose `flags` say
    unsampled (and whose trace state is empty), when the plan drops it: a `NonRecordingSpan`.
    None when the span would be sampled, or the SDK would decide it (the caller then `start`s as
    usual). A shell's request that comes out dropped needs nothing else of telemetry."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    if plan is None or not plan.valid_ids or plan.config is not tracer:
        return None  # `config`: the tracer, when its enabled check reads only `_tracer_config`
    threshold = plan.remote_unsampled
    if (
        threshold is None
        or (threshold and trace_id & LOW_64 < threshold)
        or not tracer._tracer_config.is_enabled
    ):
        return None  # `threshold and`: 0 (the parent-based default) drops every one, no bits read
    span_id = _bits(64) or plan.new_span_id()
    context = (trace_id, span_id, False, CHILD_FLAGS[flags], DEFAULT_TRACE_STATE, True)
    if _BARE_SPANS:  # its `__init__`'s one store, without the call
        span = _new(NonRecordingSpan)
        span._context = _tuple_new(SpanContext, context)
        return span
    return NonRecordingSpan(_tuple_new(SpanContext, context))


def dropped_shells(tracer: Any, count: int) -> list[tuple[Any, int, NonRecordingSpan, Context]]:
    """`count` dropped children of callers' unsampled traces, made before any request needs them,
    where `dropped_child` drops every such child: each (tracer, its span id, a `NonRecordingSpan`
    with no span context yet, the context holding it). A request stores the span context
    (`SpanContext(trace_id, span_id, False, CHILD_FLAGS[flags])`, as `dropped_child` makes it) in
    the span's `_context` and runs in that context: the span and its context are made off the
    request's path. Empty where the plan may sample such a child, or spans and contexts are not
    made this way (`_BARE_SPANS`, `current_span.SPAN_KEY`)."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    key = current_span.SPAN_KEY
    if (
        plan is None
        or not plan.valid_ids
        or plan.config is not tracer
        or plan.remote_unsampled != 0
        or not _BARE_SPANS
        or key is None
    ):
        return []
    new_span_id = plan.new_span_id
    shells = []
    for _ in range(count):
        span = _new(NonRecordingSpan)
        shells.append((tracer, _bits(64) or new_span_id(), span, Context({key: span})))
    return shells


def begin(span: Span, name: str, attributes: dict[str, Any]) -> bool:
    """Start `span`, a sampled root `decide_roots` made ahead, now: named `name`, with
    `attributes` (the mesh's own: every value a str, an int or a bool; the span keeps the dict).
    False when it can no longer start as the SDK would start it (its tracer's processors have
    changed since, or limits the attributes do not fit): the caller starts another span."""
    plan = plans.known[1]
    maker = plan.maker if plan is not None else None
    pipeline = maker.pipeline if maker is not None else None
    if (
        pipeline is None
        or maker is None
        or type(span) is not maker.light
        or pipeline.multi._span_processors is not pipeline.members
        or not (maker.free or maker.fits_into({}, attributes))
    ):
        return False
    fields = span.__dict__
    fields["_name"] = name
    fields[_LIGHT_ATTRIBUTES] = attributes
    fields["_start_time"] = _time_ns()
    return True


def start(
    tracer: Tracer, name: str, kind: SpanKind, context: Context | None = None, trace_id: int | None = None
) -> Span:
    """`tracer.start_span(name, context, kind)`, the span made by the mesh where the plan allows
    (see the module's doc). `context`: the parent's (an empty one: a new trace); None: the
    current context. `trace_id`: a new trace's id `decide_roots` drew (sampled), used when the
    span is a root."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    if plan is None:
        return tracer.start_span(name, context=context, kind=kind)
    parent: SpanContext | None = None
    if context is None or context:
        holder = trace.get_current_span() if context is None else current_span.span_in(context)
        parent = holder.get_span_context()
        if _FAST_CONTEXTS and type(parent) is SpanContext:  # its fields as the tuple holds them
            parent_trace, _, remote, parent_flags, parent_state, valid = parent
        else:
            parent_trace, remote, parent_flags = parent.trace_id, parent.is_remote, parent.trace_flags
            parent_state, valid = parent.trace_state, parent.is_valid
        if not valid:
            parent = None
    threshold: int | None
    if parent is None:
        threshold = plan.root
        if threshold is None or (plan.maker is None and 0 < threshold < ALWAYS):
            # a sampled new trace's span must have the trace id drawn here: without a maker, the
            # SDK (which draws its own) decides
            return tracer.start_span(name, context=context, kind=kind)
        trace_id = trace_id or (_bits(128) if plan.valid_ids else 0) or plan.new_trace_id()  # the generator's
        flags = plan.random_root
        state = None
    else:
        if remote:
            threshold = plan.remote_sampled if parent_flags & 1 else plan.remote_unsampled
        else:
            threshold = plan.local_sampled if parent_flags & 1 else plan.local_unsampled
        if threshold is None:
            return tracer.start_span(name, context=context, kind=kind)
        trace_id = parent_trace
        flags = parent_flags & _RANDOM
        state = parent_state
    span = _made(plan, name, kind, parent, trace_id, flags, state, threshold)
    if span is None:
        return tracer.start_span(name, context=context, kind=kind)
    if type(span) is _NotStarted:
        span = span.span
        span.start(parent_context=context)
    return span


def start_child(tracer: Tracer, name: str, kind: SpanKind, parent: SpanContext) -> Span | None:
    """`start(tracer, name, kind, <a context holding a NonRecordingSpan of parent>)` for a
    caller's `parent` (remote, valid, as `tracing.parent_of` reads it off a `traceparent`),
    without that context: the span the mesh makes (a `NonRecordingSpan`, or a light span), or
    None where the SDK would make it (the caller then starts one as usual)."""
    known, plan = plans.known
    if known() is not tracer:
        plan = plans.get(tracer)
    if plan is None or not _FAST_CONTEXTS:
        return None
    parent_trace, _, _, parent_flags, parent_state, _ = parent
    threshold = plan.remote_sampled if parent_flags & 1 else plan.remote_unsampled
    if threshold is None:
        return None
    span = _made(plan, name, kind, parent, parent_trace, parent_flags & _RANDOM, parent_state, threshold)
    return span if span is not None and type(span) is not _NotStarted else None


class _NotStarted:
    """`_made`'s answer for the SDK's own `_Span`, made but not started (`Span.start` wants the
    parent's context)."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span


def _made(
    plan: Plan,
    name: str,
    kind: SpanKind,
    parent: SpanContext | None,
    trace_id: int,
    flags: int,
    state: Any,
    threshold: int,
) -> Any:
    """The span `start` makes once its threshold is known: a `NonRecordingSpan`, a light span, or
    the SDK's `_Span` not yet started (`_NotStarted`); None where the SDK is to start it."""
    config = plan.config
    if not (config._tracer_config.is_enabled if config is not None else plan.enabled()):
        return None
    sampled = trace_id & LOW_64 < threshold
    maker = plan.maker
    if sampled and maker is None:  # as the SDK will decide too
        return None
    span_flags = _FLAGS[flags | 1 if sampled else flags]
    if plan.valid_ids:  # the constructor's checks would pass: the tuple it would make
        span_id = _bits(64) or plan.new_span_id()  # the generator's draw (it draws again on a zero)
        span_context = _tuple_new(
            SpanContext,
            (trace_id, span_id, False, span_flags, DEFAULT_TRACE_STATE if state is None else state, True),
        )
    else:
        span_context = SpanContext(trace_id, plan.new_span_id(), False, span_flags, state)
    if not sampled:
        return NonRecordingSpan(span_context)
    assert maker is not None
    pipeline = maker.pipeline
    if pipeline is not None and pipeline.multi._span_processors is pipeline.members:
        # every processor's `on_start` does nothing: `Span.start` would only set the time
        return maker.make_light(name, span_context, parent, kind)
    return _NotStarted(maker.make(name, span_context, parent, kind, None))


def end(
    span: Span, attributes: dict[str, Any] | None = None, name: str | None = None, known: bool = False
) -> None:
    """`put(span, attributes)` (if any), `span.update_name(name)` (if given), then `span.end()`.
    `known`: `attributes` are the mesh's own, every value a str, an int or a bool, no key one
    that the span's start was given (see `put`).
    A sampled span of the SDK's class, while its tracer's processors are the plan's `Pipeline`,
    is ended as `Span.end` ends it (its time, its attributes frozen, under its lock, with
    `attributes` added under the same lock) and its `ReadableSpan`, the one `_readable_span`
    would build, goes straight to each processor's queue or exporter: no keyword-argument
    constructor, no loop through the multi-processor, no calls that do nothing. A light span
    (`Maker.make_light`) nothing else touched is ended without its containers ever made.
    Anything else: `span.end()`."""
    ours: Any = span  # the SDK's private fields, when it is the SDK's span
    plan = plans.known[1]
    maker = plan.maker if plan is not None else None
    pipeline = maker.pipeline if maker is not None else None
    if pipeline is None or maker is None or pipeline.multi._span_processors is not pipeline.members:
        _end_as_sdk(span, attributes, name)
        return
    kind = type(ours)
    if kind is maker.light:  # sampled, of this pipeline's processors (its class's fields)
        fields = ours.__dict__
        plain = fields[_LIGHT_ATTRIBUTES]
        if attributes and not (known and maker.free) and not maker.fits_into(plain, attributes):
            span.set_attributes(attributes)  # the SDK's checks (and its map made): ended below
            attributes = None
        light = "_attributes" not in fields and "_events" not in fields and "_links" not in fields
        if light:
            _ENDED.acquire()  # an SDK method of another thread that finds `_ENDED` waits for the end
            try:
                # no SDK method has taken its lock (it would have made one), nor ended it
                light = fields.setdefault("_lock", _ENDED) is _ENDED and fields["_end_time"] is None
                if light:
                    if attributes:
                        plain.update(attributes)
                    if name is not None:
                        fields["_name"] = name
                    fields["_end_time"] = ended = _time_ns()
            finally:
                _ENDED.release()
        if light:
            readable: Any = _new(pipeline.readable)
            readable.__dict__ = made = maker.readable_fields.copy()
            made["_name"] = fields["_name"]
            made["_context"] = fields["_context"]
            made["_kind"] = fields["_kind"]
            made["_parent"] = fields["_parent"]
            made["_start_time"] = fields["_start_time"]
            made["_end_time"] = ended
            made["_attributes"] = plain
            for hand_over in pipeline.ends:
                hand_over(readable)
            return
    elif (
        kind is not maker.cls
        or ours._span_processor is not pipeline.multi
        or ours._record_end_metrics is not pipeline.noop
        or not ours._context[3] & 1  # its trace flags: sampled
    ):
        _end_as_sdk(span, attributes, name)
        return
    if attributes and not maker.fits(ours, attributes):
        span.set_attributes(attributes)
        attributes = None
    if name is not None:
        span.update_name(name)
    lock = ours._lock
    lock.acquire()
    try:
        over = ours._start_time is None or ours._end_time is not None
        if not over:
            if attributes:
                ours._attributes._dict.update(attributes)
            ours._end_time = _time_ns()
            ours._attributes._immutable = True
    finally:
        lock.release()
    if over:  # never started, or ended already: the SDK's error or warning
        if attributes:
            span.set_attributes(attributes)
        span.end()
        return
    readable = _new(pipeline.readable)
    readable.__dict__ = {
        "_name": ours._name,
        "_context": ours._context,
        "_kind": ours._kind,
        "_instrumentation_info": ours._instrumentation_info,
        "_instrumentation_scope": ours._instrumentation_scope,
        "_parent": ours._parent,
        "_start_time": ours._start_time,
        "_end_time": ours._end_time,
        "_attributes": ours._attributes,
        "_events": ours._events,
        "_links": ours._links,
        "_resource": ours._resource,
        "_status": ours._status,
    }
    for hand_over in pipeline.ends:
        hand_over(readable)


def _end_as_sdk(span: Span, attributes: dict[str, Any] | None, name: str | None) -> None:
    if attributes:
        put(span, attributes)
    if name is not None:
        span.update_name(name)
    span.end()


def put(span: Span, attributes: dict[str, Any], new: bool = False, known: bool = False) -> None:
    """Set `attributes` on a recording `span` (one call): straight into the map of a span the
    mesh made when every value is known to be valid, else the SDK's `set_attributes`. `new`: the
    span `start` has just returned, not yet handed to anything: made by the mesh without any
    processor's `on_start`, no other code can hold it, so its lock is not taken (and a light
    span's attribute map becomes `attributes` itself: the caller gives it up). `known`: every
    value a str, an int or a bool, as the mesh builds its own (then, under the default limits,
    nothing to check: `Maker.free`)."""
    ours: Any = span
    plan = plans.known[1]
    maker = plan.maker if plan is not None else None
    if maker is None:
        span.set_attributes(attributes)
        return
    if new and type(ours) is maker.light:
        fields = ours.__dict__
        if not fields[_LIGHT_ATTRIBUTES] and ((known and maker.free) or maker.fits_into({}, attributes)):
            fields[_LIGHT_ATTRIBUTES] = attributes  # a new span: no other code holds it yet
            return
    if not maker.fits(ours, attributes):
        span.set_attributes(attributes)
        return
    pipeline = maker.pipeline
    if new and pipeline is not None and pipeline.multi._span_processors is pipeline.members:
        ours._attributes._dict.update(attributes)
        return
    lock = ours._lock
    lock.acquire()
    try:
        done = ours._end_time is not None
        if not done:
            ours._attributes._dict.update(attributes)
    finally:
        lock.release()
    if done:  # the SDK's warning
        span.set_attributes(attributes)
