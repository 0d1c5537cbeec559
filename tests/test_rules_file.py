"""A watched rules file: bad, empty and half-written edits keep the rules in force, and the
watcher goes on applying later good edits; the same file at start-up is an error."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import meshlib
from meshlib.rules import EmptyRulesFile, RulesError, RuleSet, load_yaml
from meshlib.rules.file import _Watcher, watch_rules_file
from tests.conftest import wait_until, write_rules


def docs(*services: str) -> list[dict]:
    return [{"kind": "Endpoints", "service": s, "endpoints": [{"address": "127.0.0.1:9"}]} for s in services]


def write_text(path: Path, text: str | bytes) -> None:
    """Replace the file's content atomically (a watcher never sees half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    tmp.replace(path)


def services(mesh: meshlib.Mesh) -> set[str]:
    return set(mesh.snapshot.rules.services())


HOSTILE_EDITS: list[str | bytes] = [
    "kind: [Route]\nservice: orders\nroutes: [{}]\n",
    "kind: {Route: 1}\nservice: orders\n",
    "kind: Route\nservice: orders\nroutes: [{timeout: 1" + "0" * 400 + "s}]\n",
    "kind: Route\nservice: orders\nroutes: [{timeout: 1" + "0" * 40 + "s}]\n",
    "kind: Endpoints\nservice: !!binary b3JkZXJz\nendpoints: []\n",
    "kind: Destination\nservice: orders\nmax_concurrent_requests: " + "9" * 5000 + "\n",
    "kind: Route\nservice: orders\nroutes: [{match: {path: {regex: '" + "(" * 3000 + ")" * 3000 + "'}}}]\n",
    b"\xff\xfe not text",
]


def test_the_watcher_survives_hostile_edits_and_applies_the_next_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    with (
        caplog.at_level(logging.INFO, logger="meshlib"),
        meshlib.Mesh("checkout", config=cfg, watch_interval=0.02) as mesh,
    ):
        for i, text in enumerate(HOSTILE_EDITS):
            write_text(cfg, text)
            wait_until(
                lambda i=i: caplog.text.count("rejected edit") == i + 1,
                what=f"hostile edit {i} to be refused",
            )
            assert services(mesh) == {"a"}
        write_rules(cfg, docs("b"))
        wait_until(lambda: services(mesh) == {"b"}, what="the good edit after them to be applied")
    assert "unexpected error" not in caplog.text
    assert "document 1 of mesh.yaml): routes[0].timeout:" in caplog.text  # named where it is wrong
    assert "document 1 of mesh.yaml: kind: unknown kind ['Route']" in caplog.text


async def test_the_watcher_survives_a_failing_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    applied: list[RuleSet] = []

    def on_change(rules: RuleSet, digest: str) -> None:
        applied.append(rules)
        if len(applied) == 1:
            raise RuntimeError("listener bug")

    caplog.set_level(logging.ERROR, logger="meshlib")
    task = asyncio.ensure_future(watch_rules_file(cfg, on_change, digest=None, interval=0.02))
    try:
        await asyncio.to_thread(wait_until, lambda: len(applied) == 1, what="the first look")
        write_rules(cfg, docs("b"))
        await asyncio.to_thread(wait_until, lambda: len(applied) == 2, what="the edit after the failure")
        assert applied[1].services() == {"b"} and not task.done()
        logged = [r for r in caplog.records if r.exc_info and "listener bug" in str(r.exc_info[1])]
        assert len(logged) == 1 and "keeping the rules in force" in logged[0].getMessage()
    finally:
        task.cancel()


@pytest.mark.parametrize("content", ["", "   \n", "# all rules moved elsewhere\n", "---\n"])
def test_an_emptied_file_keeps_the_rules_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    with (
        caplog.at_level(logging.WARNING, logger="meshlib"),
        meshlib.Mesh("checkout", config=cfg, watch_interval=0.02) as mesh,
    ):
        version = mesh.snapshot.version
        cfg.write_text(content)  # `: > mesh.yaml`, or an editor's truncate caught before its write
        wait_until(lambda: "ignored edit" in caplog.text, what="the empty file to be ignored")
        cfg.write_text(content)  # the same content again: no new warning
        write_rules(cfg, docs("a", "b"))
        wait_until(lambda: services(mesh) == {"a", "b"}, what="the next good edit")
        assert mesh.snapshot.version != version
    warnings = [r for r in caplog.records if "ignored edit" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "has no documents" in warnings[0].getMessage() and "write []" in warnings[0].getMessage()


def test_an_emptied_file_warns_once_until_good_rules_come_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    with (
        caplog.at_level(logging.DEBUG, logger="meshlib"),
        meshlib.Mesh("checkout", config=cfg, watch_interval=0.02) as mesh,
    ):
        for n, content in enumerate(["", "# moved\n", "   \n"], start=1):
            write_text(cfg, content)  # one empty-looking content after another: still one outage
            wait_until(lambda n=n: ignored(caplog) == n, what=f"empty edit {n} to be seen")
        write_rules(cfg, docs("a", "b"))
        wait_until(lambda: services(mesh) == {"a", "b"}, what="the next good edit")
        write_text(cfg, "")  # empty again after good rules: a new WARNING
        wait_until(lambda: ignored(caplog) == 4, what="the new empty edit to be seen")
    levels = [r.levelno for r in caplog.records if "ignored edit" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]


def ignored(caplog: pytest.LogCaptureFixture) -> int:
    return sum("ignored edit" in r.getMessage() for r in caplog.records)


def test_an_empty_list_document_clears_the_rules_on_purpose(tmp_path: Path) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    with meshlib.Mesh("checkout", config=cfg, watch_interval=0.02) as mesh:
        write_text(cfg, "# no rules for now\n[]\n")
        wait_until(lambda: len(mesh.snapshot.rules) == 0, what="the rules to be cleared")
    write_text(cfg, "[]\n")
    with meshlib.Mesh("checkout", config=cfg) as mesh:
        assert mesh.snapshot.rules == RuleSet.EMPTY


@pytest.mark.parametrize("content", ["", "# nothing\n", "---\n---\n"])
def test_an_empty_file_at_start_up_is_an_error(tmp_path: Path, content: str) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(content)
    with pytest.raises(EmptyRulesFile, match=r"mesh\.yaml: the file has no documents"):
        meshlib.Mesh("checkout", config=cfg)


@pytest.mark.parametrize("text", HOSTILE_EDITS)
def test_a_hostile_file_at_start_up_is_a_rules_error(tmp_path: Path, text: str | bytes) -> None:
    cfg = tmp_path / "mesh.yaml"
    write_text(cfg, text)
    with pytest.raises(RulesError) as exc:
        meshlib.Mesh("checkout", config=cfg)
    (problem,) = exc.value.problems
    assert problem.document in ("mesh.yaml", "document 1 of mesh.yaml") or problem.document.endswith(
        "(document 1 of mesh.yaml)"
    )


async def test_a_file_still_being_written_is_not_applied(tmp_path: Path) -> None:
    # The first half of a write happens to be valid rules on its own: it must not be applied.
    full = docs("a", "b", "c")
    cfg = write_rules(tmp_path / "mesh.yaml", full[:1])
    applied: list[RuleSet] = []
    watcher = _Watcher(cfg, lambda rules, digest: applied.append(rules), digest=None, settle=0.05)
    look = asyncio.ensure_future(watcher.look())
    await asyncio.sleep(0)  # the look has read the file and waits for it to hold still
    assert not look.done()
    with cfg.open("a") as f:  # the rest of the write lands
        f.write("---\n" + "---\n".join(load_yaml_dump(d) for d in full[1:]))
    await look
    assert applied == []
    await watcher.look()
    assert [r.services() for r in applied] == [{"a", "b", "c"}]


def load_yaml_dump(doc: dict) -> str:
    import yaml

    text = yaml.safe_dump(doc, sort_keys=False)
    assert load_yaml(text)  # valid on its own
    return text


@pytest.mark.parametrize(
    ("interval", "error"),
    [(0, ValueError), (-1, ValueError), (float("nan"), ValueError), ("a", TypeError), (None, TypeError)],
    ids=repr,
)
async def test_the_watcher_refuses_an_interval_that_would_spin_or_end_it(
    tmp_path: Path, interval: object, error: type[Exception]
) -> None:
    """Refused on its first step, not a loop that spins (0, negative) or dies on its first sleep."""
    cfg = write_rules(tmp_path / "mesh.yaml", docs("a"))
    watching = watch_rules_file(cfg, lambda rules, digest: None, digest=None, interval=interval)  # type: ignore[arg-type]
    with pytest.raises(error, match="interval must be a number of seconds"):
        await asyncio.wait_for(watching, 2.0)
