"""Rules from YAML text, files and raw documents, refused whole if anything is wrong."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from meshlib.rules.checks import _checked, _where
from meshlib.rules.errors import EmptyRulesFile, RuleProblem, RulesError, _shown
from meshlib.rules.ruleset import RuleSet

__all__ = ["load_bytes", "load_file", "load_yaml", "parse_documents"]


def parse_documents(raw: Iterable[Mapping[str, Any]], *, source: str = "rules") -> RuleSet:
    """Validate every document and then the references between them; raises RulesError."""
    items = [(doc, _where(i, source)) for i, doc in enumerate(raw, start=1)]
    return RuleSet._trusted(_checked(items))


def _yaml_loader() -> type[yaml.SafeLoader]:
    """A safe loader with YAML 1.2 booleans and no silently repeated keys.

    PyYAML follows YAML 1.1, where `on`, `off`, `yes` and `no` are booleans: the retry key
    `on:` would become True. Only true/false are booleans here.
    """
    base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[valid-type,misc]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key].line + 1})",
                        key_node.start_mark,
                    )
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for ch, resolvers in base.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    return Loader


RulesLoader = _yaml_loader()


def _yaml_problem(exc: yaml.YAMLError, where: str) -> RuleProblem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    detail = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and "duplicate key" not in str(detail):
        detail = f"{detail} ({context})"
    if mark is not None:
        return RuleProblem(
            where, "", f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {detail}"
        )
    return RuleProblem(where, "", f"YAML error: {detail}")


def load_yaml(text: str, *, source: str = "rules") -> RuleSet:
    """Rules from multi-document YAML (documents separated by `---`; empty ones skipped).

    A document `[]` stands for "no rules" and is skipped too (see `load_bytes`).
    """
    return RuleSet._trusted(_checked(_yaml_documents(text, source)[0]))


def _yaml_documents(text: str, source: str) -> tuple[list[tuple[object, str]], bool]:
    """The raw documents with their names, and whether the text held any document at all."""
    items: list[tuple[object, str]] = []
    index = 0
    found = False
    try:
        for index, raw in enumerate(yaml.load_all(text, Loader=RulesLoader), start=1):
            found = found or raw is not None
            if raw is not None and raw != []:
                items.append((raw, _where(index, source)))
    except yaml.YAMLError as exc:
        raise RulesError([_yaml_problem(exc, _where(index + 1, source))]) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors let these through: a 5,000-digit integer, very deep nesting.
        problem = f"YAML error: {type(exc).__name__}: {_shown(str(exc), 200)}"
        raise RulesError([RuleProblem(_where(index + 1, source), "", problem)]) from None
    return items, found


_EMPTY_FILE = (
    "the file has no documents; refused so that an emptied or half-written file does not drop "
    "every rule (write [] to have no rules on purpose)"
)


def load_bytes(data: bytes, *, source: str) -> RuleSet:
    """Rules from the content of a rules file, refused whole (RulesError) if anything is wrong.

    Unlike `load_yaml`, a file with no document (empty, only comments or `---`) is refused: an
    editor's truncate-then-write caught in between looks just like it. A file that means to
    hold no rules says so with the document `[]`.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([RuleProblem(source, "", f"not UTF-8 text (byte {exc.start})")]) from None
    items, found = _yaml_documents(text, source)
    if not found:
        raise EmptyRulesFile([RuleProblem(source, "", _EMPTY_FILE)])
    return RuleSet._trusted(_checked(items))


def load_file(path: str | Path) -> RuleSet:
    """Rules from a YAML file (as `load_bytes`); problems name the file. OSError propagates."""
    p = Path(path)
    return load_bytes(p.read_bytes(), source=p.name)
