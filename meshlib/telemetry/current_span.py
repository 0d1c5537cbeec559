"""Making a server span the current one, as the OpenTelemetry API does, with fewer calls.

`trace.set_span_in_context` copies the parent context through `set_value`, and
`context.attach` / `detach` reach the context variable through the runtime context's methods:
about 7,000 instructions per request for one dict, one `ContextVar.set` and one `reset`. Where
the runtime context is the API's default (`ContextVarsRuntimeContext`, whose `attach` and
`detach` touch nothing but its context variable), the mesh does those three things itself;
with any other runtime context (`OTEL_PYTHON_CONTEXT`), or an API whose methods changed, it
calls the API. A failed reset goes to the API's `detach`, which fails the same way and logs it
as the API logs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, Span, get_current_span, set_span_in_context

_KNOWN = {
    "attach": {"_current_context", "set"},
    "detach": {"_current_context", "reset"},
    "set_span_in_context": {"set_value", "_SPAN_KEY"},
    "set_value": {"get_current", "copy", "Context"},
    "get_current_span": {"get_value", "_SPAN_KEY", "isinstance", "Span", "INVALID_SPAN"},
    "get_value": {"get", "get_current"},
}


def _variable() -> tuple[ContextVar[Context] | None, str]:
    """The API's context variable and the key a span is kept under, or None: the API's calls."""
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:
        return None, ""
    runtime: Any = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    functions = {
        "attach": ContextVarsRuntimeContext.attach,
        "detach": ContextVarsRuntimeContext.detach,
        "set_span_in_context": set_span_in_context,
        "set_value": otel_context.set_value,
        "get_current_span": get_current_span,
        "get_value": otel_context.get_value,
    }
    if (
        type(runtime) is not ContextVarsRuntimeContext
        or type(variable) is not ContextVar
        or {"attach", "detach"} & set(vars(runtime))
        or type(_SPAN_KEY) is not str
        or any(set(f.__code__.co_names) != _KNOWN[name] for name, f in functions.items())
    ):
        return None, ""
    return variable, _SPAN_KEY


_VARIABLE, _KEY = _variable()
SPAN_KEY: str | None = _KEY if _VARIABLE is not None else None
"""The key a context holds its span under, where the mesh makes contexts itself (then
`Context({SPAN_KEY: span})` is `context_with(span, EMPTY)` without the call); None: ask the API."""


set_context: Callable[[Context], Token[Context]] = otel_context.attach if _VARIABLE is None else _VARIABLE.set
"""The API's `attach(context)`: a token for `detach`."""


def context_with(span: Span, parent: Context) -> Context:
    """The API's `set_span_in_context(span, parent)`."""
    if _VARIABLE is None:
        return set_span_in_context(span, parent)
    return Context({**parent, _KEY: span}) if parent else Context({_KEY: span})


def span_in(context: Context) -> Span:
    """The API's `get_current_span(context)`: the span `context` holds, else the invalid span."""
    if _VARIABLE is None:
        return get_current_span(context)
    span = context.get(_KEY)
    if type(span) is NonRecordingSpan:  # an inbound caller's: no ABC check needed
        return span
    return span if isinstance(span, Span) else INVALID_SPAN


def attach(span: Span, parent: Context) -> Token[Context]:
    """Make `span`, a child of `parent`, the current span: the API's
    `attach(set_span_in_context(span, parent))`."""
    if _VARIABLE is None:
        return otel_context.attach(set_span_in_context(span, parent))
    return _VARIABLE.set(Context({**parent, _KEY: span}) if parent else Context({_KEY: span}))


def detach(token: Token[Context]) -> None:
    """The API's `detach(token)`."""
    if _VARIABLE is None:
        otel_context.detach(token)
        return
    try:
        _VARIABLE.reset(token)
    except Exception:  # reset in another context, or twice: the API's own error and log
        otel_context.detach(token)
