"""`meshlib gateway`: its arguments and its one-line errors (tests/gateway/test_example.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlib.cli import main


def test_a_bad_port_mapping_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--name", "edge", "--port", "8080:0"]) == 1
    err = capsys.readouterr().err
    assert err == "meshlib gateway: error: --port takes DOC=BIND, two port numbers: '8080:0'\n"


def test_a_bad_rules_file_is_refused_before_anything_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "mesh.yaml"
    rules.write_text("kind: Gateway\nservice: edge\nlisteners: [{port: 80}, {port: 80}]\n")
    assert main(["gateway", "--name", "edge", "--config", str(rules)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshlib gateway: error: ") and "port 80 is listed more than once" in err


def test_the_name_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway"]) == 2
    assert "--name" in capsys.readouterr().err
