"""RuleSet: the immutable, validated set of rules documents."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from meshlib.rules.errors import RulesError, _shown

if TYPE_CHECKING:
    from meshlib.rules.models import (
        AuthorizationDoc,
        ConcurrencyLimitDoc,
        DestinationDoc,
        Document,
        EndpointsDoc,
        ExternalDoc,
        GatewayDoc,
        RateLimitDoc,
        RequestAuthenticationDoc,
        RouteDoc,
    )

# The checks and the models (pydantic) are imported by the methods that need them: a set with
# documents has them loaded already (its documents are models), and RuleSet.EMPTY needs none.

__all__ = ["RuleSet"]


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
        from meshlib.rules.checks import _checked

        self._init(_checked([(d, f"document {i}") for i, d in enumerate(documents, start=1)]))

    @classmethod
    def _trusted(cls, documents: Iterable[Any]) -> RuleSet:
        self = object.__new__(cls)
        self._init(documents)
        return self

    def _init(self, documents: Iterable[Any]) -> None:
        docs = tuple(documents)
        if docs:
            from meshlib.rules.models import _KIND_ORDER

            docs = tuple(sorted(docs, key=lambda d: (_KIND_ORDER[d.kind], d.service)))
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
        _check_kind(kind)
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

    def concurrency_limit(self, service: str) -> ConcurrencyLimitDoc | None:
        return self._by_key.get(("ConcurrencyLimit", service))

    def gateway(self, service: str) -> GatewayDoc | None:
        return self._by_key.get(("Gateway", service))

    def external(self, service: str) -> ExternalDoc | None:
        return self._by_key.get(("External", service))

    def externals(self) -> tuple[ExternalDoc, ...]:
        """Every External document (hosts outside the mesh that may be called)."""
        return tuple(d for d in self._documents if d.kind == "External")

    def request_authentication(self, service: str) -> RequestAuthenticationDoc | None:
        return self._by_key.get(("RequestAuthentication", service))

    def services(self) -> frozenset[str]:
        """Every service some document is about (the `service` field of each)."""
        return frozenset(d.service for d in self._documents)

    def apply(self, docs: Iterable[Document | Mapping[str, Any]], *, source: str = "update") -> RuleSet:
        """A new set with `docs` added or replacing those of the same (kind, service).

        `docs` may be models or raw mappings (validated here, every problem collected).
        Problems in the result name the new documents by their position in `docs`.
        """
        from meshlib.rules.checks import _checked, _where

        items = ((d, _where(i, source)) for i, d in enumerate(docs, start=1))
        return RuleSet._trusted(_checked(items, self._documents))

    def without(self, kind: str, service: str) -> RuleSet:
        """A new set without that document (unchanged if absent); refused if others need it."""
        _check_kind(kind)
        if (kind, service) not in self._by_key:
            return self
        from meshlib.rules.checks import _label, _reference_checks

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


def _check_kind(kind: str) -> None:
    from meshlib.rules.checks import _KIND_LIST, _known_kind

    if not _known_kind(kind):
        raise ValueError(f"unknown kind {_shown(kind)}; expected one of: {_KIND_LIST}")
