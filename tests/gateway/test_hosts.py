from meshlib.gateway.hosts import HostSet, host_of


def test_the_host_of_an_authority_has_no_port() -> None:
    assert host_of("Shop.Example.com:8443") == "shop.example.com"
    assert host_of("shop.example.com") == "shop.example.com"
    assert host_of("shop.example.com.") == "shop.example.com"
    assert host_of("[::1]:8080") == "::1"
    assert host_of("") == ""


def test_exact_names_and_wildcards() -> None:
    hosts = HostSet(["shop.example.com", "*.example.org"])
    assert "shop.example.com" in hosts
    assert "a.example.org" in hosts and "a.b.example.org" in hosts
    assert "example.org" not in hosts  # a wildcard names what is under the suffix, not the suffix
    assert "evilexample.org" not in hosts
    assert "other.example.com" not in hosts
    assert "anything" in HostSet([])  # no hosts listed: every host


def test_an_exact_name_is_more_specific_than_a_wildcard() -> None:
    hosts = HostSet(["*.example.org", "*.a.example.org", "x.a.example.org"])
    assert hosts.specificity("x.a.example.org") > hosts.specificity("y.a.example.org")
    assert hosts.specificity("y.a.example.org") > HostSet(["*.example.org"]).specificity("y.a.example.org")
    assert hosts.specificity("example.net") == -1
