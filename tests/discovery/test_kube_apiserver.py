"""The emulated API server is parsed by the `kubernetes` client as a real one is: its typed
models, and its own watch helper (whose 410 handling is why the provider reads watches itself)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.discovery.kube_apiserver import KubeApiServer, endpoint, endpoint_slice, port


@pytest.fixture
def apiserver() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    yield server
    server.stop()


def api(server: KubeApiServer, tmp_path: Path, token: str | None = None) -> Any:
    doc = server.kubeconfig()
    if token is not None:
        doc["users"][0]["user"]["token"] = token
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return client.DiscoveryV1Api(config.new_client_from_config(str(path), persist_config=False))


def test_list_parses_into_the_typed_models(apiserver: KubeApiServer, tmp_path: Path) -> None:
    ep = endpoint("10.0.0.1", ready=None, zone="z1", node="n1", pod="web-1")
    apiserver.apply(endpoint_slice("web-a1", "web", [ep], [port(8080, "http", app_protocol="grpc")]))
    apiserver.apply(endpoint_slice("db-x1", "db", [endpoint("10.0.1.1")], [port(5432)]))
    listed = api(apiserver, tmp_path).list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=web"
    )
    assert listed.metadata.resource_version == str(apiserver.version)
    (s,) = listed.items
    assert (s.metadata.name, s.address_type, s.metadata.labels["kubernetes.io/service-name"]) == (
        "web-a1",
        "IPv4",
        "web",
    )
    e = s.endpoints[0]
    assert (e.addresses, e.zone, e.node_name, e.target_ref.kind, e.target_ref.name) == (
        ["10.0.0.1"],
        "z1",
        "n1",
        "Pod",
        "web-1",
    )
    assert (e.conditions.ready, e.conditions.serving, e.conditions.terminating) == (None, True, False)
    assert (s.ports[0].name, s.ports[0].port, s.ports[0].protocol, s.ports[0].app_protocol) == (
        "http",
        8080,
        "TCP",
        "grpc",
    )


def test_the_clients_watch_helper_reads_events_and_bookmarks(
    apiserver: KubeApiServer, tmp_path: Path
) -> None:
    discovery = api(apiserver, tmp_path)
    since = apiserver.version
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)]))
    apiserver.delete("web-a1")
    w = watch.Watch()
    seen = []
    for event in w.stream(
        discovery.list_namespaced_endpoint_slice,
        "default",
        resource_version=str(since),
        allow_watch_bookmarks=True,
    ):
        seen.append((event["type"], event["raw_object"]["metadata"]["resourceVersion"]))
        if event["type"] == "ADDED":
            assert event["object"].endpoints[0].addresses == ["10.0.0.1"]  # a V1EndpointSlice
        if event["type"] == "DELETED":
            apiserver.bookmark()
        if event["type"] == "BOOKMARK":
            w.stop()
    v = apiserver.version
    assert seen == [("ADDED", str(v - 1)), ("DELETED", str(v)), ("BOOKMARK", str(v))]
    assert w.resource_version == str(v)


def test_a_compacted_version_is_gone_and_the_helper_gives_up(
    apiserver: KubeApiServer, tmp_path: Path
) -> None:
    discovery = api(apiserver, tmp_path)
    old = apiserver.version
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)]))
    apiserver.compact()
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice, "default", resource_version=str(old)
        ):
            pass
    # the helper retried once from the same version, then raised: it never lists again
    assert gone.value.status == 410 and "too old resource version" in str(gone.value.reason)
    assert apiserver.watches == [str(old), str(old)] and apiserver.lists == []

    apiserver.gone_as_http = True
    with pytest.raises(ApiException) as http_gone:
        discovery.list_namespaced_endpoint_slice(
            "default", watch=True, resource_version=str(old), _preload_content=False
        )
    assert http_gone.value.status == 410


def test_a_wrong_token_is_unauthorized(apiserver: KubeApiServer, tmp_path: Path) -> None:
    with pytest.raises(ApiException) as denied:
        api(apiserver, tmp_path, token="wrong").list_namespaced_endpoint_slice("default")
    assert denied.value.status == 401
