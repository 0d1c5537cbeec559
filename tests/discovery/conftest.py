from __future__ import annotations

import pytest

from meshlib.discovery import registry
from meshlib.discovery.registry import ProviderEntry


@pytest.fixture
def provider_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test providers in the one table, as a provider module of meshlib would be: `fake`
    (tests/discovery/fake.py), `gone` (a module that does not exist) and, for this test only,
    `consul` as a stub whose client library is missing (tests/discovery/stub_consul.py)."""
    monkeypatch.setitem(
        registry.PROVIDERS, "fake", ProviderEntry("tests.discovery.fake:FakeProvider", "fake")
    )
    monkeypatch.setitem(
        registry.PROVIDERS, "consul", ProviderEntry("tests.discovery.stub_consul:ConsulProvider", "consul")
    )
    monkeypatch.setitem(
        registry.PROVIDERS, "gone", ProviderEntry("tests.discovery.absent:GoneProvider", "gone")
    )
