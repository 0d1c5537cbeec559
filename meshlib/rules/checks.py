"""Validation of one document and of a set: every problem collected, references checked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from pydantic import AliasChoices, BaseModel, ValidationError

from meshlib.rules.errors import RuleProblem, RulesError, _problems_from, _shown
from meshlib.rules.models import (
    _DOC_TYPES,
    _KIND_LIST,
    _MODELS,
    ConcurrencyLimitDoc,
    DestinationDoc,
    DiscoverySpec,
    Document,
    EndpointsDoc,
    ExternalDoc,
    GatewayDoc,
    RateLimitDoc,
    RouteDoc,
    _is_number_field,
)

__all__ = ["validate_document"]

log = logging.getLogger("meshlib.rules")


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
        if doc.endpoints is None and doc.discovery is None:
            return [RuleProblem(label, "endpoints", "required field is missing (or a discovery: block)")]
        problems = _duplicate_addresses([ep.address for ep in doc.listed], label)
        if doc.discovery is not None:
            problems += _discovery_checks(doc.discovery, label)
        return problems
    return []


def _discovery_checks(spec: DiscoverySpec, label: str) -> list[RuleProblem]:
    """The provider is known and installed, and its `Options` model accepts the options."""
    from meshlib.discovery.registry import DiscoveryUnavailable, options_model  # lazily: it imports rules

    try:
        model = options_model(spec.provider)
    except DiscoveryUnavailable as exc:
        return [RuleProblem(label, "discovery.provider", str(exc))]
    except Exception as exc:  # a provider module that fails to import: a refusal, never a crash
        log.exception("cannot load the options of discovery provider %r", spec.provider)
        return [RuleProblem(label, "discovery.provider", f"cannot be loaded ({type(exc).__name__})")]
    # A provider's model is lax pydantic, which reads true as 1 (a port of 1, a wait of 1 s):
    # booleans where it wants numbers are refused here, as in every other rules field.
    booleans = _booleans_as_numbers(model, spec.options)
    problems = [
        RuleProblem(label, f"discovery.options.{key}", f"expected a number, got {str(value).lower()}")
        for key, value in booleans.items()
    ]
    try:
        model.model_validate({k: v for k, v in spec.options.items() if k not in booleans})
    except ValidationError as exc:
        problems += [
            RuleProblem(
                p.document, f"discovery.options.{p.field}" if p.field else "discovery.options", p.reason
            )
            for p in _problems_from(exc, model, label)
            # nothing more about a field refused above (not "missing", nor a check across fields)
            if not booleans or (p.field and p.field.split(".")[0] not in booleans)
        ]
    except Exception as exc:  # a provider's validator bug is a refusal, never a crash
        log.exception("unexpected error validating the discovery options of %s", label)
        return [RuleProblem(label, "discovery.options", f"could not be validated ({type(exc).__name__})")]
    return problems


def _booleans_as_numbers(model: type[BaseModel], options: Mapping[str, Any]) -> dict[str, bool]:
    """The options (by the key they were given under) that hold true or false for a number field."""
    found = {}
    for name, field in model.model_fields.items():
        if not _is_number_field(field):
            continue
        keys = {name, field.alias}
        if isinstance(field.validation_alias, str):
            keys.add(field.validation_alias)
        elif isinstance(field.validation_alias, AliasChoices):
            keys.update(c for c in field.validation_alias.choices if isinstance(c, str))
        found.update({k: v for k, v in options.items() if k in keys and isinstance(v, bool)})
    return found


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
    """Cross-document checks: route subsets against the Destination of the same service; a
    name is an External host or a mesh service with Endpoints, not both.

    `failed` maps the (kind, service) of documents that did not validate to what is known of
    them: for a Destination, its subset names if they could be read. References into a failed
    document whose subsets are unknown are not checked, so one mistake is not reported as many.
    """
    pairs = list(docs)
    failed = failed or {}
    defined: dict[str, frozenset[str] | None] = {
        d.service: frozenset(d.subsets) for d, _ in pairs if isinstance(d, DestinationDoc)
    }
    gateways = {d.service for d, _ in pairs if isinstance(d, GatewayDoc)}
    for (kind, service), names in failed.items():
        if kind == "Destination":
            defined[service] = names
        elif kind == "Gateway":
            gateways.add(service)
    problems = _external_checks(pairs)
    for doc, label in pairs:
        if not isinstance(doc, RouteDoc):
            continue
        if doc.service in gateways:
            problems += _gateway_route_checks(doc, label)
            continue
        problems += _client_route_checks(doc, label)
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


# the policies of a call through a gateway are the target service's own Route's
_CALL_POLICIES = ("retries", "hedge", "fault", "mirror")


def _gateway_route_checks(doc: RouteDoc, label: str) -> list[RuleProblem]:
    """A gateway's Route names a mesh service in each target, and leaves subsets and call
    policies to that service's own Route (docs/gateway.md)."""
    problems = []
    for i, rule in enumerate(doc.routes):
        if getattr(rule, "redirect", None) is not None:  # answered by the gateway itself
            continue
        for j, target in enumerate(rule.to):
            if target.service is None:
                reason = f"required in a gateway's Route (Gateway/{doc.service}): the mesh service to call"
                problems.append(RuleProblem(label, f"routes[{i}].to[{j}].service", reason))
            if target.subset is not None:
                owner = target.service or "the service"
                reason = f"a gateway's Route picks a service; {owner}'s own Route picks subsets"
                problems.append(RuleProblem(label, f"routes[{i}].to[{j}].subset", reason))
        for name in _CALL_POLICIES:
            if getattr(rule, name) is not None:
                reason = "set it in the target service's own Route: that applies to calls through a gateway"
                problems.append(RuleProblem(label, f"routes[{i}].{name}", reason))
    return problems


def _client_route_checks(doc: RouteDoc, label: str) -> list[RuleProblem]:
    """`hosts` and target services belong to a gateway's Route only."""
    problems = []
    for i, rule in enumerate(doc.routes):
        if rule.match.hosts:
            reason = f"only a gateway's Route matches hosts, and there is no Gateway/{doc.service}"
            problems.append(RuleProblem(label, f"routes[{i}].match.hosts", reason))
        for j, target in enumerate(rule.to):
            if target.service is not None:
                reason = f"only a gateway's Route names a service to call; there is no Gateway/{doc.service}"
                problems.append(RuleProblem(label, f"routes[{i}].to[{j}].service", reason))
    return problems


def _external_checks(pairs: list[tuple[Any, str]]) -> list[RuleProblem]:
    """An External names a host outside the mesh: an Endpoints document of the same name
    would make it a mesh service too, and which one a call meant would be a guess; its Route
    mirrors nothing (a copy would leave the mesh with the mesh's identity or none)."""
    meshed = {d.service for d, _ in pairs if isinstance(d, EndpointsDoc)}
    outside = {d.service for d, _ in pairs if isinstance(d, ExternalDoc)}
    problems = [
        RuleProblem(
            label,
            "service",
            f"{d.service!r} has an Endpoints document too: it is a mesh service or an "
            "External host, not both (remove one of them)",
        )
        for d, label in pairs
        if isinstance(d, ExternalDoc) and d.service in meshed
    ]
    for d, label in pairs:  # enforced by each calling process: no shared (Redis) bucket yet
        if isinstance(d, RateLimitDoc) and d.service in outside and d.scope == "global":
            problems.append(
                RuleProblem(
                    label,
                    "scope",
                    f"{d.service} is an External host: its RateLimit is kept by each calling "
                    "process, so only scope: local is supported",
                )
            )
    for d, label in pairs:  # an External runs no meshlib: nothing would apply its inbound limit
        if isinstance(d, ConcurrencyLimitDoc) and d.service in outside:
            problems.append(
                RuleProblem(
                    label,
                    "service",
                    f"{d.service} is an External host: it runs no meshlib to apply a ConcurrencyLimit "
                    "(limit its callers with adaptive_concurrency on its Destination)",
                )
            )
    for d, label in pairs:  # a mirrored copy would leave the mesh: not for an External
        if isinstance(d, RouteDoc) and d.service in outside:
            problems += [
                RuleProblem(
                    label,
                    f"routes[{i}].mirror",
                    f"{d.service} is an External host: copies of its "
                    "calls are not sent outside the mesh (remove mirror)",
                )
                for i, rule in enumerate(d.routes)
                if rule.mirror is not None
            ]
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


def _checked(items: Iterable[tuple[object, str]], current: Iterable[Any] = ()) -> list[Any]:
    """The documents of `current` with `items` (raw or models, each with its name) added or
    replacing those of the same (kind, service), checked whole; RulesError if anything is wrong."""
    got = _Collected(items)
    problems = got.problems + _duplicates(got.keys)
    replaced = {(kind, service) for kind, service, _ in got.keys}
    kept = [d for d in current if (d.kind, d.service) not in replaced]
    labelled = [(d, _label(d.kind, d.service, None)) for d in kept]
    labelled += [(d, _label(d.kind, d.service, w)) for d, w in got.valid]
    problems += _reference_checks(labelled, got.failed)
    if problems:
        raise RulesError(problems)
    return kept + [d for d, _ in got.valid]
