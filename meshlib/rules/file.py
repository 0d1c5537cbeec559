"""Watching a rules file: a changed file swaps the rules live; an invalid edit changes nothing.

Polling `stat` is enough for a file a person edits (and works on every filesystem, including
bind mounts and ConfigMap symlink swaps where inotify misses changes); the content hash
decides whether anything really changed. A change is applied only once the file holds still
(the same stat and bytes on two looks `settle` apart), so an editor's truncate-then-write is
not read half-way; an empty file is refused like any invalid edit (see `rules.load_bytes`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from meshlib.rules import EmptyRulesFile, RulesError, RuleSet, load_bytes

log = logging.getLogger("meshlib.rules")

StatKey = tuple[int, int, int, int]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _stat_key(path: Path) -> StatKey:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)  # ctime: a chmod is a change too


def read_rules(path: Path) -> tuple[RuleSet, str]:
    """Parse the file; returns the rules and a short digest of the bytes they came from.

    RulesError for invalid rules, an empty file included; OSError if it cannot be read.
    """
    data = path.read_bytes()
    return load_bytes(data, source=path.name), _digest(data)


class _Watcher:
    """The state of one watched file between polls; `look` is one poll."""

    def __init__(
        self, path: Path, on_change: Callable[[RuleSet, str], None], digest: str | None, settle: float
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.digest = digest  # of the content last applied or refused: never handled twice
        self.settle = settle
        self.last_stat: StatKey | None = None
        self.gone = False
        # an emptied file is one WARNING until good rules come again, whatever empty-looking
        # contents it passes through (an editor's truncate, then comments, then whitespace)
        self.empty_warned = False

    async def look(self) -> None:
        try:
            stat_key = _stat_key(self.path)
        except FileNotFoundError:
            if not self.gone:
                log.warning("rules file %s is gone; keeping the rules in force", self.path)
            self.gone, self.last_stat = True, None
            return
        self.gone = False
        if stat_key == self.last_stat:
            return
        data = self.path.read_bytes()
        # Hold still first: a file being written now (truncated, half the bytes in) is looked
        # at again on the next poll rather than applied as it stands.
        await asyncio.sleep(self.settle)
        if _stat_key(self.path) != stat_key or self.path.read_bytes() != data:
            return
        self.last_stat = stat_key
        new_digest = _digest(data)
        if new_digest == self.digest:
            return
        self.digest = new_digest  # whatever happens next, this content is handled once
        try:
            rules = load_bytes(data, source=self.path.name)
        except EmptyRulesFile as exc:
            level = logging.DEBUG if self.empty_warned else logging.WARNING
            self.empty_warned = True
            log.log(level, "ignored edit of %s; the rules in force stay: %s", self.path, exc)
            return
        except RulesError as exc:
            log.error("rejected edit of %s; the rules in force stay:\n%s", self.path, exc)
            return
        log.info("rules file %s changed (%s); applying", self.path, new_digest)
        self.empty_warned = False
        self.on_change(rules, new_digest)


async def watch_rules_file(
    path: Path,
    on_change: Callable[[RuleSet, str], None],
    *,
    digest: str | None,
    interval: float = 0.25,
    settle: float | None = None,
) -> None:
    """Call `on_change(rules, digest)` each time the file's content changes to valid rules.

    Runs until cancelled: no edit, unreadable file or failure of `on_change` ends it (each is
    logged once and the rules in force stay), so a later good edit is always picked up. A bad
    `interval` is refused at once: 0 would spin, a string would end the loop on its first sleep.
    """
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise TypeError(f"interval must be a number of seconds, not {type(interval).__name__}")
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be a number of seconds above 0, not {interval!r}")
    watcher = _Watcher(path, on_change, digest, min(interval, 0.05) if settle is None else settle)
    last_error = ""  # logged once, until a look goes well or the error changes
    while True:
        await asyncio.sleep(interval)
        try:
            await watcher.look()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != last_error:
                if isinstance(exc, OSError):
                    log.warning("cannot read rules file %s (%s); keeping the rules in force", path, exc)
                else:
                    log.exception("unexpected error watching rules file %s; keeping the rules in force", path)
            last_error = error
        else:
            last_error = ""
