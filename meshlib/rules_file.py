"""Watching a rules file: a changed file swaps the rules live; an invalid edit changes nothing.

Polling `stat` is enough for a file a person edits (and works on every filesystem, including
bind mounts and ConfigMap symlink swaps where inotify misses changes); the content hash
decides whether anything really changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from meshlib.rules import RulesError, RuleSet, load_yaml

log = logging.getLogger("meshlib.rules")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def read_rules(path: Path) -> tuple[RuleSet, str]:
    """Parse the file; returns the rules and a short digest of the bytes they came from."""
    data = path.read_bytes()
    return load_yaml(data.decode("utf-8"), source=path.name), _digest(data)


async def watch_rules_file(
    path: Path,
    on_change: Callable[[RuleSet, str], None],
    *,
    digest: str | None,
    interval: float = 0.25,
) -> None:
    """Call `on_change(rules, digest)` each time the file's content changes to valid rules."""
    last_stat: tuple[int, int, int] | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if last_stat is not None:
                log.warning("rules file %s is gone; keeping the rules in force", path)
            last_stat = None
            continue
        stat_key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stat_key == last_stat:
            continue
        last_stat = stat_key
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read rules file %s: %s", path, exc)
            continue
        new_digest = _digest(data)
        if new_digest == digest:
            continue
        try:
            rules = load_yaml(data.decode("utf-8", errors="replace"), source=path.name)
        except RulesError as exc:
            log.error("rejected edit of %s; the rules in force stay:\n%s", path, exc)
            digest = new_digest  # do not log the same bad content again
            continue
        digest = new_digest
        log.info("rules file %s changed (%s); applying", path, new_digest)
        on_change(rules, new_digest)
