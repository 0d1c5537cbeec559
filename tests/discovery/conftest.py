from __future__ import annotations

import pytest

from meshlib.discovery import registry
from meshlib.discovery.registry import ProviderEntry


@pytest.fixture(autouse=True)
def fake_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test providers in the one table, as a provider module of meshlib would be."""
    monkeypatch.setitem(
        registry.PROVIDERS, "fake", ProviderEntry("tests.discovery.fake:FakeProvider", "fake")
    )
    monkeypatch.setitem(
        registry.PROVIDERS, "consul", ProviderEntry("tests.discovery.stub_consul:ConsulProvider", "consul")
    )
    monkeypatch.setitem(
        registry.PROVIDERS, "gone", ProviderEntry("tests.discovery.absent:GoneProvider", "gone")
    )
