"""Which OpenTelemetry provider to use, decided at near-zero cost when the app configured none.

The mesh uses a provider given to the Mesh, else the global one. Until the app installs an SDK,
the global provider is the API's proxy: its tracers and meters do nothing, yet each span still
costs a few microseconds and asking for the provider (`get_tracer_provider()`, which looks at
`os.environ`) costs about two. `ProviderSource.get` answers "nothing to do" with one attribute
read instead, and picks up a provider the app sets after creating the Mesh at the next request.
The API lets the global provider be set only once, so once found it is kept.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import opentelemetry.metrics as metrics_api
import opentelemetry.trace as trace_api
from opentelemetry.environment_variables import OTEL_PYTHON_METER_PROVIDER, OTEL_PYTHON_TRACER_PROVIDER

log = logging.getLogger("meshlib.telemetry")

RECHECK_S = 1.0
"""Without the API's global slot to read, how often to ask the public getter again."""


class _Never:
    """Stands for a provider class this version of the API does not have."""


@dataclass(frozen=True, slots=True)
class Api:
    """What the source needs to know of one OpenTelemetry signal's API."""

    what: str  # for messages: "tracing", "metrics"
    module: ModuleType | None  # the module whose `slot` holds the global provider (None: unknown)
    slot: str
    get_global: Callable[[], Any]
    base: type  # the API's provider class
    proxy: type  # the placeholder returned while no global provider is set
    noop: type
    env: str  # environment variable naming a provider class the API loads on first use


def _module_with(module: ModuleType, slot: str) -> ModuleType | None:
    return module if hasattr(module, slot) else None


def _internal_metrics() -> ModuleType:
    """Where the metrics API keeps its global provider and proxy (the public module re-exports
    neither); the public module stands in if a future API moves them."""
    try:
        import opentelemetry.metrics._internal as internal
    except ImportError:  # pragma: no cover - depends on the API's layout
        return metrics_api
    return internal


_metrics_internal = _internal_metrics()

TRACES = Api(
    "tracing",
    _module_with(trace_api, "_TRACER_PROVIDER"),
    "_TRACER_PROVIDER",
    trace_api.get_tracer_provider,
    trace_api.TracerProvider,
    trace_api.ProxyTracerProvider,
    trace_api.NoOpTracerProvider,
    OTEL_PYTHON_TRACER_PROVIDER,
)
METRICS = Api(
    "metrics",
    _module_with(_metrics_internal, "_METER_PROVIDER"),
    "_METER_PROVIDER",
    metrics_api.get_meter_provider,
    metrics_api.MeterProvider,
    getattr(_metrics_internal, "_ProxyMeterProvider", _Never),
    metrics_api.NoOpMeterProvider,
    OTEL_PYTHON_METER_PROVIDER,
)


class ProviderSource:
    """What a provider gives the mesh (`bind(provider)`: a tracer, a set of instruments), or None.

    `option`: a provider (used as is), None or True (the global provider, once the app sets a
    real one), False (off). A no-op provider, given or set globally, means off.
    """

    __slots__ = ("_api", "_bind", "_bound", "_next_check", "_off")

    def __init__(self, option: Any, api: Api, bind: Callable[[Any], Any]) -> None:
        self._api = api
        self._bind = bind
        self._bound: Any = None
        self._off = option is False
        self._next_check = 0.0
        if option is None or option is True or option is False or isinstance(option, api.proxy):
            if not self._off and api.env in os.environ:
                api.get_global()  # the API loads the named provider on its first call
            return
        if not isinstance(option, api.base):
            raise TypeError(
                f"{api.what}= takes a {api.base.__name__}, True or None (the global one) or False (off), "
                f"not {type(option).__name__}"
            )
        if isinstance(option, api.noop):
            self._off = True
        else:
            self._bound = bind(option)

    def get(self) -> Any:
        """The bound object, or None when there is nothing to report to."""
        bound = self._bound
        if bound is not None or self._off:
            return bound
        api = self._api
        if api.module is not None:
            if getattr(api.module, api.slot) is None:
                return None
        else:
            now = time.monotonic()
            if now < self._next_check:
                return None
            self._next_check = now + RECHECK_S
        provider = api.get_global()
        if isinstance(provider, api.proxy):
            return None
        if isinstance(provider, api.noop):
            self._off = True  # the global provider cannot change once set
            return None
        bound = self._bound = self._bind(provider)
        log.debug("%s: using the global %s", api.what, type(provider).__name__)
        return bound

    def close(self) -> None:
        """Report nothing more (the Mesh is closing)."""
        self._off = True
        self._bound = None
