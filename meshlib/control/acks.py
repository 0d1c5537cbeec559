"""Ack bodies (`POST /v1/ack`): one ack, or a batch of them, checked by hand.

Acks are the control service's most frequent request: every subscriber sends one after every
push, all within the same second. They are checked here with plain type tests rather than
pydantic: the same bounds as `parsing.AckBody` (which still documents the shape in the OpenAPI
document; a test holds the two to the same answers), at a fraction of the cost.

Two forms are accepted:

- one ack, `{"client", "service", "revision", "version", "ok", "error", "epoch"}` (only
  `client` is required; unknown fields are ignored, as they always were);
- a batch, `{"acks": [ack, ...]}` with 1 to `MAX_BATCH` acks, for a process that reports for
  several clients at once. Of several acks for one client the latest wins (the highest
  revision; of equal ones, the last in the list).

A refusal is the same 422 as for any other body: `{"error": "invalid request", "problems":
[{"field", "reason"}]}`, the field named with its position in a batch (`acks.3.revision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshlib.control.parsing import ApiError, _check_id, _type_name
from meshlib.control.store import MAX_VERSION

MAX_BATCH = 1000
MAX_ERROR = 10_000  # characters of a refusal's reason
MAX_EPOCH = 64


@dataclass(frozen=True, slots=True)
class Ack:
    """What one client applied (ok) or refused (with the reason), at which revision/version.

    `epoch`: the stream the revision is of (clients before it send none); an ack of another
    epoch than the hub's says nothing about this stream and is only taken as a sign of life."""

    client: str
    service: str | None = None
    revision: int | None = None
    version: int | None = None
    ok: bool = True
    error: str | None = None
    epoch: str | None = None


def parse_acks(data: Any) -> list[Ack]:
    """The acks of a parsed JSON body, in order; ApiError 422 naming every problem."""
    if not isinstance(data, dict):
        raise ApiError(422, f"expected a JSON object, got {_type_name(data)}")
    problems: list[dict[str, str]] = []
    if "acks" not in data:
        ack = _ack(data, "", problems)
        if problems:
            raise ApiError(422, "invalid request", problems=problems)
        assert ack is not None
        return [ack]
    items = data["acks"]
    if "client" in data:
        problems.append({"field": "client", "reason": "one ack, or a batch in 'acks', not both"})
    elif not isinstance(items, list):
        problems.append({"field": "acks", "reason": "Input should be a valid list"})
    elif not 1 <= len(items) <= MAX_BATCH:
        problems.append({"field": "acks", "reason": f"a batch holds 1 to {MAX_BATCH} acks"})
    if problems:
        raise ApiError(422, "invalid request", problems=problems)
    acks = []
    for i, item in enumerate(items):
        ack = _ack(item, f"acks.{i}.", problems)
        if ack is not None:
            acks.append(ack)
        if len(problems) >= 50:  # enough to fix the sender; the answer stays small
            break
    if problems:
        raise ApiError(422, "invalid request", problems=problems)
    return acks


def latest(acks: list[Ack]) -> list[Ack]:
    """One ack per client: the one with the highest revision (of equal ones, the last)."""
    if len(acks) == 1:
        return acks
    best: dict[str, Ack] = {}
    for ack in acks:
        old = best.get(ack.client)
        if old is None or (ack.revision or 0) >= (old.revision or 0):
            best[ack.client] = ack
    return list(best.values())


def _ack(data: Any, where: str, problems: list[dict[str, str]]) -> Ack | None:
    if not isinstance(data, dict):
        problems.append({"field": where.rstrip(".") or "body", "reason": "Input should be an object"})
        return None
    before = len(problems)

    def bad(name: str, reason: str) -> None:
        problems.append({"field": where + name, "reason": reason})

    client = data.get("client")
    if "client" not in data:
        bad("client", "Field required")
    else:
        client = _identifier(client, "client", bad)
    service = data.get("service")
    if service is not None:
        service = _identifier(service, "service", bad)
    revision, version = data.get("revision"), data.get("version")
    for name, value in (("revision", revision), ("version", version)):
        if value is None:
            continue
        if type(value) is not int:
            bad(name, "Input should be a valid integer")
        elif not 0 <= value <= MAX_VERSION:
            bad(name, f"Input should be between 0 and {MAX_VERSION}")
    ok = data.get("ok", True)
    if type(ok) is not bool:
        bad("ok", "Input should be a valid boolean")
    error = data.get("error")
    if error is not None and not (type(error) is str and len(error) <= MAX_ERROR):
        bad("error", f"Input should be a string of at most {MAX_ERROR} characters")
    epoch = data.get("epoch")
    if epoch is not None and not (type(epoch) is str and 0 < len(epoch) <= MAX_EPOCH and epoch.isascii()):
        bad("epoch", f"Input should be an ASCII string of 1 to {MAX_EPOCH} characters")
    if len(problems) > before:
        return None
    return Ack(str(client), service, revision, version, ok, error, epoch)


def _identifier(value: Any, name: str, bad: Any) -> Any:
    if type(value) is not str:
        bad(name, "Input should be a valid string")
        return None
    try:
        return _check_id(value)
    except ValueError as exc:
        bad(name, f"Value error, {exc}")
        return None
