"""The control service's HTTP API (docs/control-api.md), as a Starlette app.

`create_app(data_dir)` builds the app around a `ControlPlane` (reachable as
`app.state.control`), which holds the rules store, the registry, the SSE hub and the in-memory
telemetry, and does the work; the handlers here only parse requests and shape answers.

Request handling is defensive by design: every handler reads its body through one capped
reader (Content-Length checked first, then counted while reading: 413), parses JSON strictly
(400 for anything that is not JSON, including NaN and absurd numbers), validates shapes with
pydantic in strict mode (422 with a list of problems), and checks path and query parameters
(400 for a malformed one, 404 for a well-formed one naming nothing). A bug that still raises
is logged and answered with a JSON 500, as a last resort only.

Rules changes are serialised by one lock and committed off the event loop; the in-memory copy
of the current rules is only updated once the store has the new version, and the `rules` event
goes out after that. The loop-side state (registry, hub) is only touched from the event loop.

The data dir holds `admin.token`, `rules.db` (the store) and `registry.json`: the registry is
saved there (at most every half second, when instances came, went or heartbeated) so that a
restart of the control service does not tell every client that every registered service is
gone; restored instances keep the time they had left (their expiry is saved as wall-clock
time, and heartbeats are saved at most once a second), so one that died while the service was
down does not come back for a fresh TTL. Serve the app with its lifespan on: the lifespan runs
the reaper that expires instances and saves the registry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from meshlib.control import dashboard, graph
from meshlib.control.auth import AdminToken, ensure_token
from meshlib.control.binding import ClientBindings, ClientTaken
from meshlib.control.registry import MAX_TTL, MIN_TTL, Registry, RegistryFull, check_address, check_labels
from meshlib.control.store import MAX_VERSION, SQLiteStore, Store
from meshlib.control.stream import Event, Hub, WatchResponse
from meshlib.rules import EndpointSpec, RulesError, RuleSet, ServiceName
from meshlib.rules.loading import RulesLoader

if TYPE_CHECKING:
    from meshlib.security.ca import CertificateAuthority
    from meshlib.security.tokens import TokenStore

__all__ = ["ApiError", "ControlPlane", "create_app"]

log = logging.getLogger("meshlib.control")

STORE_FILE = "rules.db"
REGISTRY_FILE = "registry.json"
REGISTRY_BEATS_SAVE = 1.0  # seconds between saves when only heartbeats moved expiries on
DRAIN_FACTOR = 16  # read (and discard) up to this many times max_body before answering 413

_JSON_TYPES = ("application/json", "text/json")
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_NODE_BUDGET = 2_000_000  # values in a parsed JSON body (a 1 MiB body holds fewer)
_YAML_NODE_BUDGET = 200_000  # values in a YAML body once its aliases are expanded
_VERSION_RE = re.compile(r"^[0-9]{1,19}$")


class ApiError(Exception):
    """An answer other than success: status, message and any extra JSON fields."""

    def __init__(self, status: int, error: str, *, headers: Mapping[str, str] | None = None, **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.extra = extra
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, **self.extra}, self.status, headers=self.headers)


def _rules_error(exc: RulesError) -> ApiError:
    return ApiError(422, "invalid rules", problems=exc.to_dicts())


# --------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """The control service's state and operations, independent of HTTP.

    Async methods run on the app's event loop; `store` is also safe to read from other threads.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        stale_after: float = 5.0,
        ping: float = 15.0,
        queue_size: int = 256,
        buffer_size: int = 1024,
        send_timeout: float | None = 30.0,
        max_instances: int = 100_000,
        store: Store | None = None,
        security: bool = False,
        trust_domain: str = "mesh.local",
        ca_cert: str | Path | None = None,
        ca_key: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        token, created = ensure_token(self.data_dir)
        self.auth = AdminToken(token)
        self.new_admin_token: str | None = token if created else None
        """The admin token if this start created it (for the CLI to print once), else None."""
        self.ca: CertificateAuthority | None = None
        self.tokens: TokenStore | None = None
        if security:  # the CA and join tokens (meshlib.control.security_api)
            from meshlib.security.ca import CertificateAuthority
            from meshlib.security.tokens import TokenStore

            self.ca = CertificateAuthority(
                self.data_dir, trust_domain=trust_domain, ca_cert=ca_cert, ca_key=ca_key
            )
            self.tokens = TokenStore(self.data_dir)
        self.store: Store = store if store is not None else SQLiteStore(self.data_dir / STORE_FILE)
        self.version, self.rules = self.store.current()
        self._documents = self.rules.to_dicts()
        self.registry = Registry(max_instances=max_instances)
        self.clients = ClientBindings()  # client id -> service, with security on
        self._registry_path = self.data_dir / REGISTRY_FILE
        self._registry_dirty = False
        self._registry_beats = False  # heartbeats since the last save (saved less often)
        self._registry_saved = 0.0
        self._load_registry()
        self.hub = Hub(queue_size=queue_size, buffer_size=buffer_size, stale_after=stale_after)
        self.ping = ping
        self.send_timeout = send_timeout
        self.applies_total = 0
        self.rejected_total = 0
        self.started = time.time()
        self._lock = asyncio.Lock()
        self._snapshot: tuple[int, Event] | None = None
        self._telemetry: collections.OrderedDict[str, tuple[float, Any, int]] = collections.OrderedDict()
        self._telemetry_bytes = 0
        self.telemetry_budget = 64 << 20
        self.telemetry_max_clients = 10_000

    # -- rules --------------------------------------------------------------------------------

    @property
    def documents(self) -> list[dict[str, Any]]:
        """The current documents as JSON-able dicts (shared: do not modify)."""
        return self._documents

    async def apply(
        self, docs: list[Any], *, message: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """Upsert documents by (kind, service) as one new version; RulesError if invalid."""
        if dry_run:
            current = self.rules
            try:
                new = await asyncio.to_thread(current.apply, docs, source="request")
            except RulesError:
                self.rejected_total += 1
                raise
            return {"valid": True, "version": self.version, "changed": new != current}

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            new = current.apply(docs, source="request")
            return new, message or _describe_change("apply", current, new)

        version, changed = await self._change(compute)
        return {"version": version, "changed": changed}

    async def delete(self, kind: str, service: str) -> int:
        """Remove one document; ApiError 404 if absent, RulesError if others refer to it."""

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            try:
                doc = current.get(kind, service)
            except ValueError:
                raise ApiError(404, f"no such document: unknown kind {kind!r}") from None
            if doc is None:
                raise ApiError(404, f"no such document: {kind}/{service}")
            return current.without(kind, service), f"delete {kind}/{service}"

        version, _ = await self._change(compute)
        return version

    async def rollback(self, version: int) -> dict[str, Any]:
        """Commit the documents of an old version as a new one; KeyError if there is no such version."""
        _, old = await asyncio.to_thread(self.store.get, version)

        def compute(current: RuleSet) -> tuple[RuleSet, str]:
            return old, f"rollback to version {version}"

        new_version, changed = await self._change(compute)
        return {"version": new_version, "changed": changed}

    async def _change(self, compute: Callable[[RuleSet], tuple[RuleSet, str]]) -> tuple[int, bool]:
        # Shielded: once a commit starts, the store, the in-memory copy and the event all happen,
        # even if the request that asked for it goes away.
        return await _shielded(self._change_locked(compute))

    async def _change_locked(self, compute: Callable[[RuleSet], tuple[RuleSet, str]]) -> tuple[int, bool]:
        async with self._lock:
            current = self.rules
            try:
                new, message = await asyncio.to_thread(compute, current)
            except RulesError:
                self.rejected_total += 1
                raise
            if new == current:
                return self.version, False
            version = await asyncio.to_thread(self.store.commit, new, message)
            self.version, self.rules, self._documents = version, new, new.to_dicts()
            self.applies_total += 1
            log.info("rules version %d committed: %s", version, message)
            self.hub.publish("rules", {"version": version, "documents": self._documents})
            return version, True

    async def history(self, limit: int) -> list[dict[str, Any]]:
        return [info.to_dict() for info in await asyncio.to_thread(self.store.history, limit)]

    async def get_version(self, version: int) -> dict[str, Any]:
        """One stored version with its documents; KeyError if there is none."""
        info, rules = await asyncio.to_thread(self.store.get, version)
        return {
            "version": info.version,
            "created": info.created,
            "message": info.message,
            "documents": rules.to_dicts(),
        }

    # -- registry -----------------------------------------------------------------------------

    def register(self, service: str, endpoint: EndpointSpec, ttl: float) -> str:
        old = self.registry.at(service, endpoint.address)
        before = (old.id, old.endpoint()) if old is not None else None
        instance_id = self.registry.register(
            service, endpoint.address, labels=endpoint.labels, weight=endpoint.weight, ttl=ttl
        )
        inst = self.registry.get(service, instance_id)
        assert inst is not None
        if (inst.id, inst.endpoint()) != before:
            self._publish_endpoint(service, inst.address, inst.endpoint(), inst.id)
        self._registry_dirty = True
        return instance_id

    def heartbeat(self, service: str, instance_id: str, ttl: float | None = None) -> float:
        self._registry_beats = True  # the saved expiry moves on
        return self.registry.heartbeat(service, instance_id, ttl).ttl

    def deregister(self, service: str, instance_id: str) -> None:
        inst = self.registry.get(service, instance_id)
        self.registry.deregister(service, instance_id)
        assert inst is not None
        self._publish_endpoint(service, inst.address, None)
        self._registry_dirty = True

    def expire(self) -> set[str]:
        gone = self.registry.expire_instances()
        if gone:
            self._registry_dirty = True
        for inst in sorted(gone, key=lambda i: (i.service, i.address)):
            log.info("registry: instance %s of %s at %s expired", inst.id, inst.service, inst.address)
            self._publish_endpoint(inst.service, inst.address, None)
        return {inst.service for inst in gone}

    def _publish_endpoint(
        self, service: str, address: str, endpoint: dict[str, Any] | None, instance_id: str | None = None
    ) -> None:
        """One instance's change as an `endpoint` event (None: it is gone): an event's size does not
        grow with the service's instance count, so neither does the replay buffer. The instance id
        tells clients when a new process answers at an address (its breaker closes)."""
        self.hub.publish(
            "endpoint", {"service": service, "address": address, "endpoint": endpoint, "id": instance_id}
        )

    def _load_registry(self) -> None:
        """Instances saved by the previous run, with the time they had left: a restart of the
        control service neither empties every service nor revives instances that died."""
        try:
            items = json.loads(self._registry_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("registry: ignoring %s: %s", self._registry_path, exc)
            return
        good, bad = [], 0
        for item in items if isinstance(items, list) else []:
            try:
                _service_adapter.validate_python(item["service"])
                fields = {
                    "address": item["address"],
                    "labels": item.get("labels") or {},
                    "weight": item["weight"],
                }
                RegisterBody.model_validate(fields)  # within today's bounds
                EndpointSpec.model_validate(fields)
                _check_id(item["id"])
                good.append(item)
            except (KeyError, TypeError, ValueError):
                bad += 1
        if bad:
            log.warning(
                "registry: %d saved instances in %s are invalid now; not restored", bad, self._registry_path
            )
        added = self.registry.restore(good)
        if added:
            log.info("registry: restored %d instances from the previous run", added)

    async def save_registry(self, *, final: bool = False) -> None:
        """Write the registry to the data dir if it changed (atomically, off the event loop);
        heartbeats alone at most every REGISTRY_BEATS_SAVE seconds, unless `final`."""
        now = time.monotonic()
        beats = self._registry_beats and (final or now - self._registry_saved >= REGISTRY_BEATS_SAVE)
        if not (self._registry_dirty or beats):
            return
        self._registry_dirty = self._registry_beats = False
        self._registry_saved = now
        data = json.dumps(self.registry.export(), separators=(",", ":"), ensure_ascii=False)
        try:
            await asyncio.to_thread(_write_atomic, self._registry_path, data)
        except OSError as exc:
            self._registry_dirty = True
            log.warning("registry: cannot save %s: %s", self._registry_path, exc)

    # -- watch --------------------------------------------------------------------------------

    def snapshot_event(self) -> Event:
        """The `snapshot` event for the current revision (built once per revision)."""
        cached = self._snapshot
        if cached is not None and cached[0] == self.hub.revision:
            return cached[1]
        endpoints = self.registry.all()
        payload = {
            "version": self.version,
            "documents": self._documents,
            "endpoints": endpoints,
            "instances": {s: {i.address: i.id for i in self.registry.instances(s)} for s in endpoints},
        }
        if self.ca is not None:
            payload["bundle"] = self.ca.bundle.decode("ascii")
        event = self.hub.snapshot(payload)
        self._snapshot = (self.hub.revision, event)
        return event

    # -- telemetry ----------------------------------------------------------------------------

    def report(self, client: str, report: Any, size: int) -> None:
        """Keep the last telemetry report of a client, within a memory budget: `size` is the
        memory the kept report takes (graph.kept_size), the oldest reports go first."""
        old = self._telemetry.pop(client, None)
        if old is not None:
            self._telemetry_bytes -= old[2]
        self._telemetry[client] = (time.time(), report, size)
        self._telemetry_bytes += size
        while self._telemetry and (
            self._telemetry_bytes > self.telemetry_budget or len(self._telemetry) > self.telemetry_max_clients
        ):
            _, (_, _, dropped) = self._telemetry.popitem(last=False)
            self._telemetry_bytes -= dropped
        self.hub.seen(client)

    def telemetry(self) -> dict[str, dict[str, Any]]:
        """The last report of every client: {client: {"received": unix seconds, "report": ...}}."""
        return {c: {"received": t, "report": r} for c, (t, r, _) in self._telemetry.items()}

    # -- lifecycle ----------------------------------------------------------------------------

    async def run_reaper(self, interval: float = 0.5) -> None:
        """Expire registry instances (on time, not just every `interval`) and old client records."""
        clock = time.monotonic
        while True:
            nxt = self.registry.next_expiry()
            delay = interval if nxt is None else min(interval, max(0.0, nxt - clock()) + 0.005)
            await asyncio.sleep(delay)
            try:
                self.expire()
                self.hub.forget()
                await self.save_registry()
            except Exception:
                log.exception("control: the registry reaper failed; it keeps running")

    def close(self) -> None:
        """End every watch stream and close the store."""
        self.hub.close()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": self.version,
            "revision": self.hub.revision,
            "epoch": self.hub.epoch,
        }

    def metrics(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP meshlib_control_{name} {help_text}")
            lines.append(f"# TYPE meshlib_control_{name} {kind}")
            lines.append(f"meshlib_control_{name} {value}")

        metric("version", "gauge", "Current rules version.", self.version)
        metric("revision", "gauge", "Changes published to subscribers since start.", self.hub.revision)
        metric("subscribers", "gauge", "Open watch streams.", self.hub.subscribers)
        metric(
            "subscribers_dropped_total",
            "counter",
            "Watch streams closed because the subscriber fell behind.",
            self.hub.dropped_total,
        )
        metric(
            "applies_total",
            "counter",
            "Rules versions committed (apply, delete, rollback).",
            self.applies_total,
        )
        metric("rejected_total", "counter", "Rules changes refused as invalid.", self.rejected_total)
        metric("registry_instances", "gauge", "Instances in the registry.", len(self.registry))
        metric(
            "replay_buffer_bytes",
            "gauge",
            "Bytes of the events kept for Last-Event-ID resumes.",
            self.hub.buffered_bytes(),
        )
        return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


async def _shielded(coro: Awaitable[Any]) -> Any:
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


def _describe_change(verb: str, old: RuleSet, new: RuleSet) -> str:
    before = set(old.documents)
    keys = [f"{d.kind}/{d.service}" for d in new.documents if d not in before]
    if len(keys) > 8:
        keys = [*keys[:8], f"and {len(keys) - 8} more"]
    return f"{verb} {', '.join(keys)}" if keys else verb


# --------------------------------------------------------------------------------------------
# Request parsing


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, max_body: int) -> bytes:
    """The request body, at most `max_body` bytes; 413 beyond (after draining what is sent, so
    the client reads the answer instead of a reset), 400 for a bad Content-Length."""
    drain_limit = max_body * DRAIN_FACTOR
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isascii() or not length.strip().isdigit():
            raise ApiError(400, "invalid Content-Length")
        declared = int(length)
        if declared > drain_limit:
            raise ApiError(413, f"body too large: the limit is {max_body} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > drain_limit:
                break
            if size <= max_body:
                chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away while sending the body") from None
    if size > max_body:
        raise ApiError(413, f"body too large: the limit is {max_body} bytes")
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise ApiError(400, "empty body: expected JSON")
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON: {str(exc)[:200]}") from None
    _check_data(data, "JSON")
    return data


_NO_BODY: Any = object()


async def _json_body(request: Request, plane_max: int, *, optional: bool = False) -> Any:
    """The parsed JSON body; with `optional`, `_NO_BODY` when the body is empty."""
    media = _media_type(request)
    if media and media not in _JSON_TYPES and not media.endswith("+json"):
        raise ApiError(415, f"unsupported Content-Type {media!r}: send application/json")
    body = await _read_body(request, plane_max)
    if optional and not body.strip():
        return _NO_BODY
    return _parse_json(body)


def _expect_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(422, f"expected a JSON object, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"])
        problems.append({"field": f"{prefix}{loc}" if loc else prefix.rstrip("."), "reason": err["msg"]})
    return ApiError(422, "invalid request", problems=problems)


def _load_yaml_documents(body: bytes) -> list[Any]:
    """Raw documents from multi-document YAML, with the rules loader (YAML 1.2 booleans, no
    duplicate keys); 400 for text that is not YAML or expands into something enormous."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"invalid YAML: not UTF-8 text (byte {exc.start})") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=RulesLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = getattr(exc, "problem", None) or str(exc)
        raise ApiError(400, f"invalid YAML{where}: {str(detail)[:200]}") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise ApiError(400, f"invalid YAML: {str(exc)[:200]}") from None
    _check_data(docs, "YAML", _YAML_NODE_BUDGET)
    return docs


def _check_data(value: Any, what: str, budget: int = _NODE_BUDGET) -> None:
    """Refuse parsed data that cannot be stored or echoed safely: text with lone surrogates
    (JSON and YAML escapes can make them; they cannot be encoded as UTF-8) and data whose YAML
    aliases expand it beyond the node budget (or make it cyclic)."""
    stack = [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise ApiError(400, f"invalid {what}: too large once aliases are expanded")
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(
                        400, f"invalid {what}: text with a lone surrogate (\\ud800-\\udfff)"
                    ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


async def _rules_body(request: Request, max_body: int) -> tuple[list[Any], str | None]:
    """The documents (and optional message) of a PUT /v1/config body, JSON or YAML."""
    media = _media_type(request)
    if media in _YAML_TYPES:
        items = _load_yaml_documents(await _read_body(request, max_body))
        if len(items) == 1 and (
            isinstance(items[0], list) or (isinstance(items[0], dict) and "documents" in items[0])
        ):
            return _documents_from(items[0])
        return items, None
    if media and media not in _JSON_TYPES and not media.endswith("+json"):
        raise ApiError(415, f"unsupported Content-Type {media!r}: send application/json or application/yaml")
    return _documents_from(_parse_json(await _read_body(request, max_body)))


def _documents_from(data: Any) -> tuple[list[Any], str | None]:
    if isinstance(data, list):
        return data, None
    if not isinstance(data, dict):
        raise ApiError(422, f'expected a list of documents or {{"documents": [...]}}, got {_type_name(data)}')
    unknown = sorted(str(k) for k in data if k not in ("documents", "message"))
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)[:200]}; expected documents (and message)")
    if "documents" not in data:
        raise ApiError(422, 'missing field "documents"')
    docs = data["documents"]
    if not isinstance(docs, list):
        raise ApiError(422, f'"documents" must be a list, got {_type_name(docs)}')
    message = data.get("message")
    if message is not None and (not isinstance(message, str) or len(message) > 1000):
        raise ApiError(422, '"message" must be a string of at most 1000 characters')
    return docs, message


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    text = value.strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"query parameter {name} must be 1 or 0 (true or false)")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise ApiError(400, f"query parameter {name} must be an integer from {low} to {high}")
    return int(text)


def _version_param(text: str) -> int:
    if not _VERSION_RE.match(text) or int(text) > MAX_VERSION:
        raise ApiError(400, f"version must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def _check_id(value: str) -> str:
    if not 1 <= len(value) <= 256:
        raise ValueError("must be 1 to 256 characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("must be printable characters without spaces")
    return value


Identifier = Annotated[str, AfterValidator(_check_id)]
_service_adapter: TypeAdapter[str] = TypeAdapter(ServiceName)


def _service_param(text: str, *, status: int = 400) -> str:
    try:
        return _service_adapter.validate_python(text)
    except ValidationError as exc:
        reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise ApiError(status, f"invalid service name: {reason[:300]}") from None


def _id_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return _check_id(value)
    except ValueError as exc:
        raise ApiError(400, f"query parameter {name} {exc}") from None


def _number(value: float) -> float | int:
    """10.0 as 10 (how it was most likely written), other values as they are."""
    return int(value) if value.is_integer() else value


def _peer(request: Request) -> str | None:
    client = request.client
    if client is None:
        return None
    host = f"[{client.host}]" if ":" in client.host else client.host
    return f"{host}:{client.port}"


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class RegisterBody(_Body):
    address: Annotated[str, Field(max_length=300), AfterValidator(check_address)]
    labels: Annotated[dict[str, str], AfterValidator(check_labels)] = {}
    weight: int = Field(1, ge=1, le=1_000_000)
    ttl: float = Field(10.0, ge=MIN_TTL, le=MAX_TTL)


class HeartbeatBody(_Body):
    ttl: float | None = Field(None, ge=MIN_TTL, le=MAX_TTL)


class AckBody(_Body):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    client: Identifier
    service: Identifier | None = None
    revision: int | None = Field(None, ge=0, le=MAX_VERSION)
    version: int | None = Field(None, ge=0, le=MAX_VERSION)
    ok: bool = True
    error: Annotated[str, Field(max_length=10_000)] | None = None


# --------------------------------------------------------------------------------------------
# Handlers

Handler = Callable[[Request], Awaitable[Response]]


def _handler(fn: Callable[[ControlPlane, Request], Awaitable[Response]], plane: ControlPlane) -> Handler:
    @functools.wraps(fn)
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(plane, request)
        except ApiError as exc:
            return exc.response()
        except Exception:
            log.exception("control: %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal error"}, 500)

    return endpoint


def _require_admin(plane: ControlPlane, request: Request) -> None:
    if not plane.auth.check(request.headers.get("authorization")):
        raise ApiError(
            401,
            "missing or wrong admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": 'Bearer realm="meshlib control"'},
        )


def _caller(plane: ControlPlane, request: Request, service: str | None = None) -> Any:
    """With security on, the authenticated caller, allowed to act as `service` (401, 403);
    None when security is off. Runs before the body is read."""
    if plane.ca is None:
        return None
    from meshlib.control import security_api

    return security_api.require(plane, request, service)


def _authorize(identity: Any, service: str | None) -> None:
    if identity is not None:
        from meshlib.control import security_api

        security_api.authorize(identity, service)


def _claim_client(plane: ControlPlane, identity: Any, client: str, service: str | None) -> str | None:
    """The service a request about `client` acts for; 403 if the client id is another service's
    (security on: meshlib.control.binding)."""
    try:
        return plane.clients.claim(identity, client, service)
    except ClientTaken as exc:
        raise ApiError(403, str(exc)) from None


async def get_config(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse({"version": plane.version, "documents": plane.documents})


async def put_config(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    dry_run = _flag(request, "dry_run")
    docs, message = await _rules_body(request, plane_max_body(request))
    try:
        result = await plane.apply(docs, message=message, dry_run=dry_run)
    except RulesError as exc:
        raise _rules_error(exc) from None
    return JSONResponse(result)


async def delete_config(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    kind, service = request.path_params["kind"], request.path_params["service"]
    try:
        version = await plane.delete(kind, service)
    except RulesError as exc:
        raise _rules_error(exc) from None
    return JSONResponse({"version": version})


async def get_history(plane: ControlPlane, request: Request) -> Response:
    limit = _int_param(request, "limit", 100, 1, 10_000)
    return JSONResponse(await plane.history(limit))


async def get_history_version(plane: ControlPlane, request: Request) -> Response:
    version = _version_param(request.path_params["version"])
    try:
        return JSONResponse(await plane.get_version(version))
    except KeyError:
        raise ApiError(404, f"no version {version}") from None
    except RulesError as exc:  # stored under rules this meshlib no longer accepts
        raise _rules_error(exc) from None


async def post_rollback(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    version = _version_param(request.path_params["version"])
    try:
        result = await plane.rollback(version)
    except KeyError:
        raise ApiError(404, f"no version {version}") from None
    except RulesError as exc:
        raise _rules_error(exc) from None
    return JSONResponse(result)


async def watch(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    named = _id_param(request, "client")
    client = named or f"anonymous-{secrets.token_hex(6)}"
    service = _id_param(request, "service")
    _authorize(identity, service)
    if named is not None:
        service = _claim_client(plane, identity, named, service)
    elif service is None and identity is not None:
        service = identity.service
    last_event_id = request.headers.get("last-event-id")
    body = plane.hub.stream(client, service, _peer(request), last_event_id, plane.snapshot_event)
    return WatchResponse(body, ping=plane.ping, send_timeout=plane.send_timeout)


async def post_ack(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    data = _expect_object(await _json_body(request, plane_max_body(request)))
    try:
        ack = AckBody.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _authorize(identity, ack.service)
    service = _claim_client(plane, identity, ack.client, ack.service)
    plane.hub.ack(
        ack.client,
        service=service,
        revision=ack.revision,
        version=ack.version,
        ok=ack.ok,
        error=ack.error,
        peer=_peer(request),
    )
    return Response(status_code=204)


async def get_clients(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse(plane.hub.clients())


async def post_register(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service = _service_param(request.path_params["service"])
    _authorize(identity, service)
    data = _expect_object(await _json_body(request, plane_max_body(request)))
    try:
        body = RegisterBody.model_validate(data)
        endpoint = EndpointSpec(address=body.address, labels=body.labels, weight=body.weight)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    try:
        instance_id = plane.register(service, endpoint, body.ttl)
    except RegistryFull as exc:
        raise ApiError(429, str(exc)) from None
    return JSONResponse({"id": instance_id, "ttl": _number(body.ttl)}, 201)


async def put_heartbeat(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service, instance_id = request.path_params["service"], request.path_params["id"]
    _authorize(identity, service)
    data = await _json_body(request, plane_max_body(request), optional=True)
    ttl = None
    if data is not _NO_BODY:
        try:
            ttl = HeartbeatBody.model_validate(_expect_object(data)).ttl
        except ValidationError as exc:
            raise _validation_error(exc) from None
    try:
        ttl = plane.heartbeat(service, instance_id, ttl)
    except KeyError:
        raise ApiError(
            404, f"no instance {instance_id[:100]!r} of {service[:100]!r} (expired? register again)"
        ) from None
    return JSONResponse({"id": instance_id, "ttl": _number(ttl)})


async def delete_instance(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service, instance_id = request.path_params["service"], request.path_params["id"]
    _authorize(identity, service)
    try:
        plane.deregister(service, instance_id)
    except KeyError:
        raise ApiError(404, f"no instance {instance_id[:100]!r} of {service[:100]!r}") from None
    return Response(status_code=204)


async def get_registry(plane: ControlPlane, request: Request) -> Response:
    service = request.path_params.get("service")
    if service is not None:
        service = _service_param(service)
    return JSONResponse(plane.registry.describe(service))


async def post_telemetry(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    max_body = plane_max_body(request)
    data = _expect_object(await _json_body(request, max_body))
    service = data.get("service")
    _authorize(identity, service if isinstance(service, str) else None)
    try:
        report = graph.parse_report(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    report["service"] = _claim_client(plane, identity, report["client"], report["service"])
    plane.report(report["client"], report, graph.kept_size(report))
    return Response(status_code=204)


async def healthz(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse(plane.health())


async def metrics(plane: ControlPlane, request: Request) -> Response:
    return PlainTextResponse(plane.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


def plane_max_body(request: Request) -> int:
    return request.app.state.max_body


# --------------------------------------------------------------------------------------------
# The app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("control: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, 500)


def create_app(
    data_dir: str | Path,
    *,
    ping: float = 15.0,
    stale_after: float = 5.0,
    max_body: int = 1 << 20,
    queue_size: int = 256,
    buffer_size: int = 1024,
    send_timeout: float | None = 30.0,
    max_instances: int = 100_000,
    security: bool = False,
    trust_domain: str = "mesh.local",
    ca_cert: str | Path | None = None,
    ca_key: str | Path | None = None,
) -> Starlette:
    """The control service app for a data dir (created if missing, with the admin token).

    `ping` is the heartbeat interval of watch streams, `stale_after` how long a client may take
    to ack a revision, `max_body` the largest request body accepted; `queue_size` and
    `buffer_size` bound each subscriber's queue and the replay buffer, `send_timeout` closes
    a stream whose client stopped reading.

    `security` turns on the CA and join tokens (meshlib.control.security_api): `watch`, `ack`,
    `registry` and `telemetry` then need a join token or a mesh certificate. `trust_domain`
    names the mesh in SPIFFE ids; `ca_cert`/`ca_key` plug in an operator's CA instead of one
    created in the data dir. Serve it over TLS with `server_tls.uvicorn_tls_options`.
    """
    from meshlib.control import openapi, security_api

    plane = ControlPlane(
        data_dir,
        stale_after=stale_after,
        ping=ping,
        queue_size=queue_size,
        buffer_size=buffer_size,
        send_timeout=send_timeout,
        max_instances=max_instances,
        security=security,
        trust_domain=trust_domain,
        ca_cert=ca_cert,
        ca_key=ca_key,
    )

    def route(path: str, **handlers: Callable[[ControlPlane, Request], Awaitable[Response]]) -> Route:
        by_method = {method: _handler(fn, plane) for method, fn in handlers.items()}
        if "GET" in by_method:
            by_method["HEAD"] = by_method["GET"]

        async def dispatch(request: Request) -> Response:
            return await by_method[request.method](request)

        return Route(path, dispatch, methods=list(by_method))

    routes = [
        route("/", GET=dashboard.index),
        route("/dashboard/{name}", GET=dashboard.static_file),
        route("/v1/graph", GET=graph.get_graph),
        route("/v1/diff", GET=dashboard.get_diff),
        route("/healthz", GET=healthz),
        route("/metrics", GET=metrics),
        route("/v1/config", GET=get_config, PUT=put_config),
        route("/v1/config/{kind}/{service}", DELETE=delete_config),
        route("/v1/history", GET=get_history),
        route("/v1/history/{version}", GET=get_history_version),
        route("/v1/rollback/{version}", POST=post_rollback),
        route("/v1/watch", GET=watch),
        route("/v1/ack", POST=post_ack),
        route("/v1/clients", GET=get_clients),
        route("/v1/registry", GET=get_registry),
        route("/v1/registry/{service}", GET=get_registry, POST=post_register),
        route("/v1/registry/{service}/{id}", PUT=put_heartbeat, DELETE=delete_instance),
        route("/v1/telemetry", POST=post_telemetry),
        route("/v1/ca/sign", POST=security_api.post_sign),
        route("/v1/ca/bundle", GET=security_api.get_bundle),
        route("/v1/ca/rotate", POST=security_api.post_rotate),
        route("/v1/tokens", GET=security_api.get_tokens, POST=security_api.post_token),
        route("/v1/tokens/{id}", DELETE=security_api.delete_token),
        route("/openapi.json", GET=openapi.get_openapi),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(plane.run_reaper(), name="meshlib-control-reaper")
        bundles = asyncio.create_task(security_api.run_bundle_watch(plane), name="meshlib-control-bundle")
        log.info("control: serving %s (version %d, epoch %s)", plane.data_dir, plane.version, plane.hub.epoch)
        try:
            yield
        finally:
            reaper.cancel()
            bundles.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            with contextlib.suppress(asyncio.CancelledError):
                await bundles
            await plane.save_registry(final=True)
            plane.close()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.control = plane
    app.state.max_body = max_body
    return app
