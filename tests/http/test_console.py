"""`serve()` says it is ready where the app has not configured logging, and leaves an app's own
logging configuration alone."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from meshlib.http.console import console_logging
from tests.conftest import interruptible, wait_until

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """\
import logging, sys, threading, time
from meshlib import Mesh

if sys.argv[1] == "configured":  # the app's choice: warnings only
    logging.basicConfig(level=logging.WARNING)

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})

mesh = Mesh("orders", labels={"version": "v1"})

def say_where() -> None:  # on stdout, whatever logging shows
    while mesh.address is None:
        time.sleep(0.01)
    print("listening", mesh.address, flush=True)

threading.Thread(target=say_where, daemon=True).start()
mesh.serve(app, port=0)
print("serve returned", flush=True)
"""
READY = re.compile(r"^INFO: +orders ready on 127\.0\.0\.1:\d+: labels version=v1; not registered \(no")


def run_serve(tmp_path: Path, mode: str) -> tuple[int, str, str]:
    """Run SCRIPT until it answers a request, then Ctrl-C it: (exit code, stdout, stderr)."""
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    with interruptible():  # Ctrl-C reaches it as a KeyboardInterrupt
        proc = subprocess.Popen(
            [sys.executable, str(script), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"PATH": "", "PYTHONPATH": str(ROOT)},
        )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lines.extend, args=(stream,), daemon=True)
        for stream, lines in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: bool(out) or proc.poll() is not None, 20, "the server to listen")
        if not out:  # it ended first: say how, with all it wrote
            proc.wait(5)
            readers[1].join(5)
            raise AssertionError(f"the server ended ({proc.returncode}) before it listened: {''.join(err)}")
        address = out[0].split()[1]
        assert httpx.get(f"http://{address}/").text == "hello"
        if mode == "plain":  # logged just after the address is known
            wait_until(lambda: any(map(READY.match, err)), 5, "the ready line")
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        wait_until(lambda: len(out) == 2, 5, "the script's end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(out[1:]), "".join(err)


def test_the_ready_line_shows_without_any_logging_configuration(tmp_path: Path) -> None:
    code, out, err = run_serve(tmp_path, "plain")
    assert code in (0, 130), err
    assert out == "serve returned\n"
    ready = [line for line in err.splitlines() if "ready on" in line]
    assert len(ready) == 1 and READY.match(ready[0]), err
    assert "Traceback" not in err


def test_an_apps_logging_configuration_is_kept(tmp_path: Path) -> None:
    """basicConfig at WARNING: the app said what it wants to see, and an INFO line is not it."""
    code, out, err = run_serve(tmp_path, "configured")
    assert code in (0, 130), err
    assert out == "serve returned\n"
    assert "ready on" not in err and "Traceback" not in err


@pytest.mark.parametrize("propagate", [True, False])
def test_console_logging_comes_and_goes_only_where_nothing_shows_the_lines(propagate: bool) -> None:
    log = logging.getLogger("meshlib")
    saved = (list(log.handlers), log.level, log.propagate)
    root = logging.getLogger()
    saved_root = list(root.handlers)
    try:
        for handler in list(root.handlers):  # pytest's own capture handlers
            root.removeHandler(handler)
        log.propagate = propagate
        assert [type(h) for h in log.handlers] == [logging.NullHandler]
        with console_logging():
            added = [h for h in log.handlers if not isinstance(h, logging.NullHandler)]
            assert len(added) == 1 and getattr(added[0], "stream", None) is sys.stderr
            assert log.getEffectiveLevel() == logging.INFO
        assert (log.handlers, log.level) == (saved[0], saved[1])

        root.addHandler(logging.NullHandler())  # nothing shows: still unconfigured
        with console_logging():
            assert len(log.handlers) == 2
        shown = logging.StreamHandler()
        root.addHandler(shown)  # configured, if records go up to it
        with console_logging():
            assert len(log.handlers) == (1 if propagate else 2)
        root.removeHandler(shown)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_root:
            root.addHandler(handler)
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]
