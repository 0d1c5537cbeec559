"""Request parsing for the control API; every refusal is an `ApiError` (a 4xx with a JSON body).

Defensive by design: one capped body reader (Content-Length checked first, then counted while
reading: 413), strict JSON (400 for anything that is not JSON, including NaN and absurd
numbers), shapes validated by pydantic in strict mode (422 with a list of problems), path and
query parameters checked (400 for a malformed one).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from meshlib.control.registry import MAX_TTL, MIN_TTL, check_address, check_labels
from meshlib.control.store import MAX_VERSION
from meshlib.headers import RULES_VERSION
from meshlib.rules import RulesError, ServiceName
from meshlib.rules.loading import RulesLoader

DRAIN_FACTOR = 16  # read (and discard) up to this many times max_body before answering 413

_JSON_TYPES = ("application/json", "text/json")
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_NODE_BUDGET = 2_000_000  # values in a parsed JSON body (a 1 MiB body holds fewer)
_YAML_NODE_BUDGET = 200_000  # values in a YAML body once its aliases are expanded
_VERSION_RE = re.compile(r"^[0-9]{1,19}$")
_MAX_INT_DIGITS = 4300  # Python's default int_max_str_digits
_M = TypeVar("_M", bound=BaseModel)


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


class _NumberTooLarge(ValueError):
    pass


def _bounded_int(text: str) -> int:
    """An integer of at most _MAX_INT_DIGITS digits (Python's own limit, however it is set):
    beyond, "number too large" rather than Python's advice to raise its limit."""
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _NumberTooLarge(_too_large(len(text.lstrip("-"))))
    return int(text)


def _too_large(digits: int | None = None) -> str:
    count = f" ({digits} digits)" if digits is not None else ""
    return f"number too large{count}: at most {_MAX_INT_DIGITS} digits"


def _parse_json(body: bytes) -> Any:
    if not body.strip():
        raise ApiError(400, "empty body: expected JSON")
    try:
        data = json.loads(
            body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except _NumberTooLarge as exc:
        raise ApiError(400, str(exc)) from None
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


_TYPE_NAMES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
_TYPE_NAMES |= {list: "a list", dict: "an object"}  # parsed JSON and YAML hold these exact types


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _validation_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    problems = [{"field": ".".join(str(p) for p in err["loc"]), "reason": err["msg"]} for err in errors]
    return ApiError(422, "invalid request", problems=problems)


def _validated(model: type[_M], data: Any) -> _M:
    """`data` as a `model`, or a 422 naming every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


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
        if isinstance(exc, ValueError) and "int_max_str_digits" in str(exc):  # Python's advice
            raise ApiError(400, f"invalid YAML: {_too_large()}") from None
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
    if message is not None and not message.isprintable():
        # refused, not escaped: the history keeps it and every reader (the log, `meshlib history`,
        # the dashboard, any client) would have to escape it; a newline would forge a log line
        raise ApiError(
            422, '"message" must be printable text: no newline, tab, escape or other control character'
        )
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


def _held_version(request: Request) -> int | None:
    """The rules version a resuming watcher holds (`x-mesh-rules-version`): None when not sent
    (or empty); anything but a version number is a 400, not a silent fallback to whole events."""
    text = request.headers.get(RULES_VERSION, "").strip()
    if not text:
        return None
    if not _VERSION_RE.match(text) or int(text) > MAX_VERSION:
        raise ApiError(400, f"header {RULES_VERSION} must be a rules version (a non-negative integer)")
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
        if not reason.startswith("invalid service name"):  # the check's own words say it mostly
            reason = f"invalid service name: {reason}"
        raise ApiError(status, reason[:300]) from None


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
    epoch: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x00-\x7f]+$")] | None = None


class AckBatch(_Body):
    """Several acks in one request (meshlib.control.acks: the handler's own checks)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    acks: list[AckBody] = Field(min_length=1, max_length=1000)
