"""The one table of provider kinds, and how a kind becomes a class, an `Options` model or a provider.

Modules are imported when a kind is first used, never here: validating rules that name
`consul` needs `meshlib.discovery.consul` (its pydantic `Options`), not the Consul client, and
a process that uses no discovery imports none of it. A provider's client library is imported
by the provider when it is made (`from_url`); a missing one is reported with the extra to
install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "PROVIDERS",
    "DiscoveryUnavailable",
    "ProviderEntry",
    "kinds",
    "options_model",
    "provider_class",
    "provider_from_url",
    "shown_url",
]


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """Where a kind's provider lives ("module:Class"; the module defines `Options` too) and the
    pip extra that brings its client library."""

    target: str
    extra: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]


PROVIDERS: dict[str, ProviderEntry] = {
    "consul": ProviderEntry("meshlib.discovery.consul:ConsulProvider", "consul"),
    "kubernetes": ProviderEntry("meshlib.discovery.kubernetes:KubernetesProvider", "kubernetes"),
    "dns": ProviderEntry("meshlib.discovery.dns:DnsProvider", "dns"),
}
"""kind (the URL scheme, and `provider:` in a `discovery:` block) -> its provider."""


class DiscoveryUnavailable(ValueError):
    """A kind that is not in the table, or whose module or client library is not installed."""


def kinds() -> list[str]:
    return sorted(PROVIDERS)


def _entry(kind: str) -> ProviderEntry:
    entry = PROVIDERS.get(kind)
    if entry is None:
        raise DiscoveryUnavailable(f"unknown discovery provider {kind!r}; one of: {', '.join(kinds())}")
    return entry


def _import(kind: str, entry: ProviderEntry) -> Any:
    try:
        return importlib.import_module(entry.module)
    except ModuleNotFoundError as exc:
        raise _unavailable(kind, entry, exc) from exc


def _unavailable(kind: str, entry: ProviderEntry, exc: ModuleNotFoundError) -> DiscoveryUnavailable:
    if exc.name is not None and (exc.name == entry.module or entry.module.startswith(f"{exc.name}.")):
        return DiscoveryUnavailable(
            f"the {kind} provider is not part of this meshlib ({entry.module} is missing)"
        )
    return DiscoveryUnavailable(
        f"the {kind} provider needs {exc.name or 'its client library'}: pip install meshlib[{entry.extra}]"
    )


def options_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a kind's per-service options (importable without its client library)."""
    from pydantic import BaseModel

    entry = _entry(kind)
    model = getattr(_import(kind, entry), "Options", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise DiscoveryUnavailable(f"{entry.module} defines no pydantic Options model")
    return model


def provider_class(kind: str) -> Any:
    """The provider class of a kind (a class with `kind` and `from_url`)."""
    entry = _entry(kind)
    name = entry.target.partition(":")[2]
    cls = getattr(_import(kind, entry), name, None)
    if cls is None:
        raise DiscoveryUnavailable(f"{entry.module} has no {name}")
    return cls


def provider_from_url(url: str) -> Any:
    """A provider made from its URL, whose scheme is its kind (`consul://127.0.0.1:8500?dc=eu1`;
    `kubernetes://` and `dns://` take their defaults). A missing client library is a
    DiscoveryUnavailable naming the extra to install."""
    kind = urlsplit(url).scheme.lower() if "://" in url else ""
    if not kind:
        schemes = ", ".join(f"{k}://" for k in kinds())
        raise DiscoveryUnavailable(f"a discovery URL starts with its provider, one of: {schemes}")
    entry = _entry(kind)
    cls = provider_class(kind)
    try:
        return cls.from_url(url)
    except ModuleNotFoundError as exc:  # the client library, imported when the provider is made
        raise _unavailable(kind, entry, exc) from exc


def shown_url(url: str) -> str:
    """A provider URL fit for a log line: scheme, host and port only (no user, token or query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a port number: the provider said so when it was made, or will
        port = None
    if port is not None:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}{parts.path}"
