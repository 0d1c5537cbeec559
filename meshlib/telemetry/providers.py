"""Which OpenTelemetry provider to use, decided at near-zero cost when the app configured none.

The mesh uses a provider given to the Mesh, else the global one. Until the app installs an SDK,
the global provider is the API's proxy: its tracers and meters do nothing, yet each span still
costs a few microseconds and asking for the provider (`get_tracer_provider()`, which looks at
`os.environ`) costs about two. `ProviderSource.get` answers "nothing to do" with one attribute
read instead, and picks up a provider the app sets after creating the Mesh at the next request.
The API lets the global provider be set only once, so once found it is kept.

The API itself is imported only once the app has imported it: a global provider is set through
the API's module (`set_tracer_provider`, or a class named in `OTEL_PYTHON_TRACER_PROVIDER`,
loaded by the API's getter), so while that module is not loaded no provider can be set, and the
mesh does not pay the ~12 ms the API takes to import (docs/decisions.md).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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


def _module_with(module: ModuleType, slot: str) -> ModuleType | None:
    return module if hasattr(module, slot) else None


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal's API, named but not imported: `module` is loaded by any app that could have
    set a global provider; `load` imports the API and describes it."""

    module: str
    env: str  # environment variable naming a provider class the API loads on first use
    load: Callable[[], Api]


def _traces_api() -> Api:
    import opentelemetry.trace as trace_api

    return Api(
        "tracing",
        _module_with(trace_api, "_TRACER_PROVIDER"),
        "_TRACER_PROVIDER",
        trace_api.get_tracer_provider,
        trace_api.TracerProvider,
        trace_api.ProxyTracerProvider,
        trace_api.NoOpTracerProvider,
    )


def _metrics_api() -> Api:
    """Where the metrics API keeps its global provider and proxy (the public module re-exports
    neither); the public module stands in if a future API moves them."""
    import opentelemetry.metrics as metrics_api

    internal: ModuleType
    try:
        internal = importlib.import_module("opentelemetry.metrics._internal")
    except ImportError:  # pragma: no cover - depends on the API's layout
        internal = metrics_api
    return Api(
        "metrics",
        _module_with(internal, "_METER_PROVIDER"),
        "_METER_PROVIDER",
        metrics_api.get_meter_provider,
        metrics_api.MeterProvider,
        getattr(internal, "_ProxyMeterProvider", _Never),
        metrics_api.NoOpMeterProvider,
    )


# the variable names are the API's (opentelemetry.environment_variables), spelled out so that
# reading them does not import it
TRACES = Signal("opentelemetry.trace", "OTEL_PYTHON_TRACER_PROVIDER", _traces_api)
METRICS = Signal("opentelemetry.metrics", "OTEL_PYTHON_METER_PROVIDER", _metrics_api)


UNSETTLED: Any = object()
"""`ProviderSource.settled` while `get` still has to look for a global provider."""


class ProviderSource:
    """What a provider gives the mesh (`bind(provider)`: a tracer, a set of instruments), or None.

    `option`: a provider (used as is), None or True (the global provider, once the app sets a
    real one), False (off). A no-op provider, given or set globally, means off.
    `settled`: what `get` returns from now on, once that can no longer change (a provider bound,
    or off); UNSETTLED before. A caller on a hot path reads it and calls `get` only while
    UNSETTLED (an attribute read instead of a call).
    """

    __slots__ = ("_api", "_bind", "_next_check", "_signal", "settled")

    def __init__(self, option: Any, signal: Signal, bind: Callable[[Any], Any]) -> None:
        self._signal = signal
        self._api: Api | None = None
        self._bind = bind
        self._next_check = 0.0
        self.settled: Any = None if option is False else UNSETTLED
        if option is None or option is True or option is False:
            if option is not False and signal.env in os.environ:
                self._load().get_global()  # the API loads the named provider on its first call
            return
        api = self._load()
        if isinstance(option, api.proxy):
            return
        if not isinstance(option, api.base):
            raise TypeError(
                f"{api.what}= takes a {api.base.__name__}, True or None (the global one) or False (off), "
                f"not {type(option).__name__}"
            )
        self.settled = None if isinstance(option, api.noop) else bind(option)

    def _load(self) -> Api:
        api = self._api = self._signal.load()
        return api

    def get(self) -> Any:
        """The bound object, or None when there is nothing to report to."""
        settled = self.settled
        if settled is not UNSETTLED:
            return settled
        api = self._api
        if api is None:
            if self._signal.module not in sys.modules:  # not imported: no provider set yet
                return None
            api = self._load()
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
            self.settled = None  # the global provider cannot change once set
            return None
        bound = self.settled = self._bind(provider)
        log.debug("%s: using the global %s", api.what, type(provider).__name__)
        return bound

    def close(self) -> None:
        """Report nothing more (the Mesh is closing)."""
        self.settled = None
