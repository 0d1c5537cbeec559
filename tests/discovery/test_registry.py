"""The one table of provider kinds: lazy imports, the extra to install, URLs fit for a log."""

from __future__ import annotations

import sys

import pytest

from meshlib.discovery import registry
from meshlib.discovery.registry import DiscoveryUnavailable, options_model, provider_from_url, shown_url
from tests.discovery.fake import FakeProvider, Options

pytestmark = pytest.mark.usefixtures("provider_kinds")


def test_the_table_names_each_provider_module_and_class() -> None:
    assert {"consul", "kubernetes", "dns"} <= set(registry.kinds())
    assert registry.PROVIDERS["kubernetes"].target == "meshlib.discovery.kubernetes:KubernetesProvider"
    assert registry.PROVIDERS["dns"].target == "meshlib.discovery.dns:DnsProvider"


def test_a_provider_is_made_from_its_url_by_its_scheme() -> None:
    provider = provider_from_url("FAKE://agent:8500?dc=eu1")
    assert isinstance(provider, FakeProvider) and provider.url == "FAKE://agent:8500?dc=eu1"
    assert options_model("fake") is Options


def test_options_come_without_the_client_library() -> None:
    model = options_model("consul")  # the stub's from_url needs a library that is not installed
    assert model.model_validate({"tag": "blue"}).tag == "blue"  # type: ignore[attr-defined]
    assert "meshlib_absent_consul_client" not in sys.modules
    with pytest.raises(DiscoveryUnavailable) as info:
        provider_from_url("consul://127.0.0.1:8500")
    assert str(info.value) == (
        "the consul provider needs meshlib_absent_consul_client: pip install meshlib[consul]"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("127.0.0.1:8500", "a discovery URL starts with its provider, one of: consul://, "),
        ("localhost:8500", "a discovery URL starts with its provider"),
        ("//127.0.0.1:8500", "a discovery URL starts with its provider"),
        ("etcd://127.0.0.1", "unknown discovery provider 'etcd'; one of: "),
        ("gone://", "the gone provider is not part of this meshlib"),
    ],
)
def test_bad_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(DiscoveryUnavailable, match=reason.replace("(", r"\(").replace(".", r"\.")):
        provider_from_url(url)


def test_a_shown_url_keeps_no_credentials() -> None:
    assert (
        shown_url("consul://user:pw@agent.local:8500/v1?token=s3cret&dc=eu1")
        == "consul://agent.local:8500/v1"
    )
    assert shown_url("kubernetes://") == "kubernetes://"
    assert shown_url("consul://[::1]:8500?token=x") == "consul://[::1]:8500"
