"""The MESH_* settings model: documented in full, read from the environment, beaten by arguments."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

import meshlib
from meshlib.control.telemetry import interval_from_env
from meshlib.settings import ENV_PREFIX, MeshSettings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _rows(section: str) -> dict[str, list[str]]:
    """First cell (inside backticks) -> the other cells, for each row of the section's table."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in m.group(2).split("|")]
    return rows


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_every_setting_is_documented_and_nothing_else() -> None:
    documented = _rows(_section("Environment variables"))
    fields = {ENV_PREFIX + name.upper() for name in MeshSettings.model_fields}
    assert set(documented) == fields
    for name, cells in documented.items():
        assert len(cells) == 3 and all(cells), f"{name}: type, default and meaning, each filled in"
    for name, field in MeshSettings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_every_header_the_code_uses_is_documented() -> None:
    from meshlib import headers

    documented = set(_rows(_section("Wire headers")))
    used = set(headers.ALL)
    assert used <= documented, used - documented
    assert "milliseconds, relative" in _rows(_section("Wire headers"))["x-mesh-timeout"][2]


def test_the_mesh_header_names_are_spelled_only_in_meshlib_headers() -> None:
    """Every module takes them from `meshlib.headers`, so a rename cannot miss one."""
    spelled = re.compile(r"""["'](x-mesh-[a-z-]+|traceparent|tracestate)["']""")
    package = Path(meshlib.__file__).parent
    found = [
        f"{path.relative_to(package)}:{n}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "headers.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if spelled.search(line)
    ]
    assert found == []


def test_the_environment_is_read_when_the_mesh_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MESH_ADDRESS", "127.0.0.1:9001")
    monkeypatch.setenv("MESH_TRUST_DOMAIN", "prod.example")
    monkeypatch.setenv("MESH_REDIS", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("MESH_METRICS_PATH", "/metrics")
    monkeypatch.setenv("MESH_ACCESS_LOG", "yes")
    monkeypatch.setenv("MESH_MTLS", "disable")
    monkeypatch.setenv("MESH_CONTROL", "")  # empty: unset
    with meshlib.Mesh("orders") as mesh:
        assert (mesh.address, mesh.trust_domain, mesh.redis) == (
            "127.0.0.1:9001",
            "prod.example",
            "redis://127.0.0.1:1/0",
        )
        assert mesh.telemetry.metrics_path == "/metrics"
        assert mesh.telemetry.access is not None
        assert mesh.mtls == "DISABLE"
        assert mesh.control is None and mesh.link is None


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_ADDRESS", "127.0.0.1:9001")
    monkeypatch.setenv("MESH_TRUST_DOMAIN", "prod.example")
    monkeypatch.setenv("MESH_METRICS_PATH", "/metrics")
    monkeypatch.setenv("MESH_ACCESS_LOG", "yes")
    monkeypatch.setenv("MESH_MTLS", "STRICT")
    monkeypatch.setenv("MESH_TOKEN", "from-env")
    with meshlib.Mesh(
        "orders",
        address="127.0.0.1:9002",
        trust_domain="staging",
        metrics_path="/m",
        access_log=False,
        mtls="DISABLE",
        token="explicit",
    ) as mesh:
        assert (mesh.address, mesh.trust_domain, mesh.mtls, mesh.token) == (
            "127.0.0.1:9002",
            "staging",
            "DISABLE",
            "explicit",
        )
        assert mesh.telemetry.metrics_path == "/m"
        assert mesh.telemetry.access is None
        assert mesh.settings.address == "127.0.0.1:9002"


def test_a_bad_value_names_the_setting_but_never_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_PASSTHROUGH", "s3cret-maybe")
    with pytest.raises(ValueError, match=r"\$MESH_PASSTHROUGH") as caught:
        meshlib.Mesh("orders")
    assert "s3cret" not in str(caught.value)
    # the CLI says so in one line instead of a traceback
    done = subprocess.run(
        [sys.executable, "-m", "meshlib", "history"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "PYTHONPATH": str(ROOT), "MESH_PASSTHROUGH": "s3cret-maybe"},
    )
    assert done.returncode != 0
    assert done.stderr.startswith("meshlib: error: invalid mesh settings: ")
    assert "$MESH_PASSTHROUGH" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr


def test_settings_never_show_secrets() -> None:
    shown = repr(MeshSettings.resolve(token="mjt_secret", redis="redis://:pw@h/0", admin_token="adm"))
    assert "mjt_secret" not in shown and ":pw@" not in shown and "adm'" not in shown


def test_telemetry_interval(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("MESH_TELEMETRY_INTERVAL", raising=False)
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        assert interval_from_env() == 5.0
    assert not caplog.records  # unset is not a bad value
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    assert MeshSettings().telemetry_interval == 0.0
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "soon")
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        assert interval_from_env(7.0) == 7.0
    assert "ignoring MESH_TELEMETRY_INTERVAL='soon'" in caplog.text
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "3600")
    assert MeshSettings().telemetry_interval == 3600.0
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "7200")  # every report would be refused (422)
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        assert interval_from_env(7.0) == 7.0
    assert "ignoring MESH_TELEMETRY_INTERVAL='7200': more than 3600 seconds" in caplog.text


def test_cache_dir_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    control = "http://127.0.0.1:9"  # nothing listens: the link keeps trying in the background
    with meshlib.Mesh("orders", control=control) as mesh:
        assert mesh.link is not None and mesh.link.cache_path.parent == tmp_path / "env"
    with meshlib.Mesh("orders", control=control, cache_dir=tmp_path / "arg") as mesh:
        assert mesh.link is not None and mesh.link.cache_path.parent == tmp_path / "arg"


def test_control_takes_one_url_or_several(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_CONTROL", " http://127.0.0.1:7070/ , http://127.0.0.1:7071")
    assert MeshSettings().control == "http://127.0.0.1:7070,http://127.0.0.1:7071"
    monkeypatch.setenv("MESH_CONTROL", "https://control.example:7070/")
    assert MeshSettings().control == "https://control.example:7070"
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    monkeypatch.delenv("MESH_CONTROL")
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:10/"]  # nothing listens: retried in the background
    with meshlib.Mesh("orders", control=urls, cache_dir=tmp_path) as mesh:
        assert mesh.control == "http://127.0.0.1:9,http://127.0.0.1:10"
        assert mesh.control_endpoints is not None
        assert mesh.control_endpoints.urls == ("http://127.0.0.1:9", "http://127.0.0.1:10")
        assert mesh.link is not None and mesh.link.endpoints is mesh.control_endpoints  # one, shared


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("http://127.0.0.1:1,not-a-url", "URL 2 is not an http:// or https:// URL with a host"),
        ("http://127.0.0.1:1,https://127.0.0.1:2", "the URLs mix http and https"),
        ("http://user:s3cret@h:1,http://user:s3cret@h:1", "a URL is listed twice"),
    ],
)
def test_a_bad_control_list_names_the_setting_but_never_shows_it(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    monkeypatch.setenv("MESH_CONTROL", value)
    with pytest.raises(ValueError, match=r"\$MESH_CONTROL: ") as caught:
        MeshSettings.resolve()
    assert reason in str(caught.value) and "s3cret" not in str(caught.value)
    monkeypatch.delenv("MESH_CONTROL")
    with pytest.raises(ValueError, match=r"control= or \$MESH_CONTROL: .*" + reason):
        meshlib.Mesh("orders", control=value.split(","))
