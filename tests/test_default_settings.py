"""The defaults a Mesh takes when nothing is configured are MeshSettings' own, and anything
configured (an argument, a MESH_* variable in any case) goes through the model as before."""

from __future__ import annotations

import dataclasses

import pytest

import meshlib
from meshlib.default_settings import DEFAULT_SETTINGS, ENV_PREFIX, configured
from meshlib.settings import MeshSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_the_defaults_are_the_models_field_for_field() -> None:
    assert [f.name for f in dataclasses.fields(DEFAULT_SETTINGS)] == list(MeshSettings.model_fields)
    assert dataclasses.asdict(DEFAULT_SETTINGS) == MeshSettings().model_dump()


def test_configured_by_an_argument_or_a_non_empty_mesh_variable_in_any_case() -> None:
    assert not configured({"control": None, "token": None}, {"PATH": "/bin", "MESH_CONTROL": ""})
    assert configured({"control": None, "passthrough": False}, {})  # False is a value given
    assert configured({"control": None}, {"MESH_ACCESS_LOG": "1"})
    assert configured({"control": None}, {"mesh_redis": "redis://127.0.0.1:1"})


def test_a_mesh_with_nothing_configured_shows_the_models_defaults() -> None:
    mesh = meshlib.Mesh("checkout")
    try:
        assert mesh._settings is None  # the model is made when read, not by Mesh()
        assert isinstance(mesh.settings, MeshSettings)
        assert mesh.settings == MeshSettings()
        assert mesh.settings is mesh.settings
    finally:
        mesh.close()


def test_a_mesh_variable_still_counts_and_a_bad_one_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_OUTBOUND", "REGISTRY_ONLY")
    mesh = meshlib.Mesh("checkout")
    try:
        assert mesh.outbound == "registry_only"
        assert mesh.settings.outbound == "registry_only"
    finally:
        mesh.close()
    monkeypatch.setenv("mesh_outbound", "nowhere")
    monkeypatch.delenv("MESH_OUTBOUND")
    with pytest.raises(ValueError, match=r"outbound= or \$MESH_OUTBOUND"):
        meshlib.Mesh("checkout")
