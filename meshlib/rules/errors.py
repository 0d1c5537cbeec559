"""Problems with rules, and pydantic's validation errors turned into them (one per field)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, get_args, get_origin

if TYPE_CHECKING:  # pydantic and the models load with the first document, not with RulesError
    from pydantic import BaseModel, ValidationError

__all__ = ["EmptyRulesFile", "RuleProblem", "RulesError"]


@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong with one document: where (document, field path) and why."""

    document: str
    field: str
    reason: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.document}: {self.field}: {self.reason}"
        return f"{self.document}: {self.reason}"


class RulesError(ValueError):
    """Rules refused as a whole; `problems` holds every problem found, not just the first."""

    def __init__(self, problems: Iterable[RuleProblem]) -> None:
        self.problems: list[RuleProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid rules")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))

    def to_dicts(self) -> list[dict[str, str]]:
        """The problems as JSON-able dicts (for API error bodies)."""
        return [asdict(p) for p in self.problems]


class EmptyRulesFile(RulesError):
    """A rules file with no document at all: refused, as it may be an edit caught half-way."""


_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _format_loc(loc: Iterable[int | str]) -> str:
    """("routes", 0, "to", 1, "weight") -> "routes[0].to[1].weight"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that the location `loc` inside `model` points into, if any."""
    from pydantic import BaseModel

    from meshlib.rules.models import _unwrap

    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                info = next((f for f in tp.model_fields.values() if f.alias == part), None)
            if info is None:
                return None
            tp = info.annotation
        elif get_origin(tp) in (tuple, list, dict):
            tp = get_args(tp)[-1] if get_origin(tp) is dict else get_args(tp)[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _problems_from(exc: ValidationError, model: type[BaseModel], document: str) -> list[RuleProblem]:
    from meshlib.rules.models import KINDS

    errors = exc.errors(include_url=False)
    failed_locs = [tuple(e["loc"]) for e in errors]
    problems = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in failed_locs
        ):
            continue  # a list counted short only because its items failed: reported already
        if loc and loc[0] in KINDS:  # a discriminated union's tag
            loc = loc[1:]
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            msg = f"invalid key: {msg}"
        if err["type"] == "extra_forbidden" and loc:
            parent = _model_at(model, loc[:-1])
            names = [info.alias or name for name, info in parent.model_fields.items()] if parent else []
            allowed = f"; allowed: {', '.join(names)}" if parent else ""
            msg = f"unknown field{allowed}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "too_short":
            n = err.get("ctx", {}).get("min_length", 1)
            msg = f"needs at least {n} {'entry' if n == 1 else 'entries'}"
        problems.append(RuleProblem(document, _format_loc(loc), msg))
    return problems


def _shown(value: object, limit: int = 60) -> str:
    """A value for an error message, cut short: hostile input may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
