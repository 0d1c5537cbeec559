"""The Kubernetes provider against the emulated API server (tests/discovery/kube_apiserver.py),
through the real `kubernetes` client over real HTTP, and against a real cluster when
KUBECONFIG is set."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshlib
from meshlib.discovery import EndpointSet, Target
from meshlib.discovery.kubernetes import KubernetesError, KubernetesProvider, Options
from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.testing import serve
from tests.backend import Backend
from tests.discovery.kube_apiserver import KubeApiServer, endpoint, endpoint_slice, port


@pytest.fixture
def apiserver() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    yield server
    server.stop()


def kubeconfig(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
async def provider(apiserver: KubeApiServer, tmp_path: Path) -> AsyncIterator[KubernetesProvider]:
    p = KubernetesProvider.from_url(f"kubernetes://{kubeconfig(tmp_path, apiserver.kubeconfig())}")
    yield p
    await p.aclose()


class Sets:
    """Reads a watch on a task and keeps every set it yields (or the error it raised)."""

    def __init__(self, sets: AsyncIterator[EndpointSet]) -> None:
        self.seen: list[EndpointSet] = []
        self.error: BaseException | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(sets))

    async def _read(self, sets: AsyncIterator[EndpointSet]) -> None:
        try:
            async for s in sets:
                self.seen.append(s)
                self._changed.set()
        except Exception as e:
            self.error = e
        self.ended = True
        self._changed.set()

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self.seen[-1]] if self.seen else []

    async def until(self, ok: Callable[[Sets], bool], timeout: float = 5.0, what: str = "sets") -> None:
        async with asyncio.timeout(timeout):
            while not ok(self):
                if self.ended and not ok(self):
                    raise AssertionError(f"watch ended ({self.error!r}) before {what}; saw {self.seen}")
                self._changed.clear()
                await self._changed.wait()

    async def has(self, *addresses: str) -> None:
        await self.until(lambda s: s.addresses == sorted(addresses), what=f"set {sorted(addresses)}")


def watch(provider: KubernetesProvider, name: str = "web", **options: Any) -> Sets:
    return Sets(provider.watch(Target("web", name, options)))


async def test_endpoints_appear_change_and_vanish(
    apiserver: KubeApiServer, provider: KubernetesProvider
) -> None:
    apiserver.apply(endpoint_slice("other-x1", "other", [endpoint("10.0.9.9")], [port(8080)]))
    sets = watch(provider)
    await sets.until(lambda s: len(s.seen) >= 1, what="the first set")
    assert sets.seen[0] == ()  # no slice yet: an empty set, said once the list has answered

    apiserver.apply(
        endpoint_slice("web-a1", "web", [endpoint("10.0.0.1"), endpoint("10.0.0.2")], [port(8080)])
    )
    await sets.has("10.0.0.1:8080", "10.0.0.2:8080")
    apiserver.apply(
        endpoint_slice("web-a1", "web", [endpoint("10.0.0.2"), endpoint("10.0.0.3")], [port(8080)])
    )
    await sets.has("10.0.0.2:8080", "10.0.0.3:8080")
    apiserver.delete("web-a1")
    await sets.has()
    assert all("10.0.9.9:8080" not in [e.address for e in s] for s in sets.seen)  # another service's
    assert apiserver.lists == ["kubernetes.io/service-name=web"]


async def test_several_slices_merge_into_one_set(
    apiserver: KubeApiServer, provider: KubernetesProvider
) -> None:
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1"), endpoint("10.0.0.2")], [port(80)]))
    # the controller may list an endpoint in two slices while it moves it: once in the set
    apiserver.apply(endpoint_slice("web-b2", "web", [endpoint("10.0.0.2"), endpoint("10.0.0.3")], [port(80)]))
    apiserver.apply(
        endpoint_slice("web-c3", "web", [endpoint("fd00::7")], [port(80)], address_type="IPv6"),
    )
    fqdn = endpoint_slice("web-d4", "web", [endpoint("db.example.internal")], [port(80)], address_type="FQDN")
    apiserver.apply(fqdn)
    sets = watch(provider)
    await sets.has("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "[fd00::7]:80")
    apiserver.delete("web-a1")
    await sets.has("10.0.0.2:80", "10.0.0.3:80", "[fd00::7]:80")

    v6 = watch(provider, address_type="IPv6")
    await v6.has("[fd00::7]:80")


async def test_port_chosen_by_name(apiserver: KubeApiServer, provider: KubernetesProvider) -> None:
    ports = [port(8080, "http"), port(9090, "metrics"), port(8443, "grpc", app_protocol="grpc")]
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], ports))
    metrics = watch(provider, port="metrics")
    grpc = watch(provider, port="grpc")
    await metrics.has("10.0.0.1:9090")
    await grpc.has("10.0.0.1:8443")
    assert grpc.seen[-1][0].labels[PROTOCOL_LABEL] == "grpc"  # appProtocol: grpc
    assert PROTOCOL_LABEL not in metrics.seen[-1][0].labels

    unnamed = watch(provider)  # several ports and no name: say so rather than guess
    await unnamed.until(lambda s: s.ended, what="the watch to fail")
    assert isinstance(unnamed.error, KubernetesError)
    assert "'grpc', 'http', 'metrics'" in str(unnamed.error) and "`port`" in str(unnamed.error)

    misspelt = watch(provider, port="htp")
    await misspelt.until(lambda s: s.ended, what="the watch to fail")
    assert "none named 'htp'" in str(misspelt.error)

    apiserver.apply(endpoint_slice("api-a1", "api", [endpoint("10.0.1.1")], [port(7000)]))
    single = watch(provider, "api")  # one unnamed port: no name needed
    await single.has("10.0.1.1:7000")


async def test_conditions_and_topology_labels(apiserver: KubeApiServer, provider: KubernetesProvider) -> None:
    endpoints = [
        endpoint(
            "10.0.0.1", ready=None, serving=None, terminating=None, zone="eu-1a", node="n1", pod="web-1"
        ),
        endpoint("10.0.0.2", ready=False, serving=False),  # failing its readiness probe
        endpoint("10.0.0.3", ready=True, serving=False),  # publishNotReadyAddresses, not serving
        endpoint("10.0.0.4", ready=False, serving=True, terminating=True),  # draining
        endpoint("10.0.0.5", ready=True, serving=None, zone="eu-1b"),  # serving nil: as ready
        endpoint("10.0.0.6", ready=False, serving=None),
    ]
    apiserver.apply(endpoint_slice("web-a1", "web", endpoints, [port(80)]))
    sets = watch(provider)
    await sets.has("10.0.0.1:80", "10.0.0.5:80")
    first, fifth = sets.seen[-1]
    assert first.labels == {"zone": "eu-1a", "node": "n1", "pod": "web-1"}
    assert fifth.labels == {"zone": "eu-1b"}

    endpoints[0] = endpoint("10.0.0.1", ready=False, serving=True, terminating=True, zone="eu-1a")
    apiserver.apply(endpoint_slice("web-a1", "web", endpoints, [port(80)]))
    await sets.has("10.0.0.5:80")


async def test_bookmark_moves_the_resource_version(
    apiserver: KubeApiServer, provider: KubernetesProvider
) -> None:
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)]))
    sets = watch(provider)
    await sets.has("10.0.0.1:80")
    await until(lambda: bool(apiserver.streams), "the watch to open")
    listed_at = apiserver.version
    for i in range(5):  # changes our watch does not see move the server's version on
        apiserver.apply(endpoint_slice("other-x1", "other", [endpoint(f"10.0.9.{i}")], [port(80)]))
    marked = apiserver.bookmark()
    assert marked > listed_at
    apiserver.compact()  # everything before the bookmark is Gone now
    apiserver.drop_watches()
    await until(lambda: len(apiserver.watches) >= 2, "the watch to come back")
    assert apiserver.watches == [str(listed_at), str(marked)]  # resumed from the bookmark...
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.2")], [port(80)]))
    await sets.has("10.0.0.2:80")
    assert len(apiserver.lists) == 1  # ...so no 410 and no second list


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_gone_lists_again_with_nothing_lost(
    apiserver: KubeApiServer, provider: KubernetesProvider, as_http: bool
) -> None:
    apiserver.gone_as_http = as_http
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1"), endpoint("10.0.0.2")], [port(80)]))
    apiserver.apply(endpoint_slice("web-b2", "web", [endpoint("10.0.0.3")], [port(80)]))
    sets = watch(provider)
    await sets.has("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    before = len(sets.seen)
    await until(lambda: bool(apiserver.streams), "the watch to open")

    apiserver.pause()  # the watch breaks, and comes back only after the changes and a compaction
    apiserver.drop_watches()
    await until(lambda: len(apiserver.watches) >= 2, "the watch to reconnect")
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.2"), endpoint("10.0.0.4")], [port(80)]))
    apiserver.apply(endpoint_slice("web-c3", "web", [endpoint("10.0.0.5")], [port(80)]))
    apiserver.delete("web-b2")
    apiserver.compact()
    apiserver.resume()

    await sets.has("10.0.0.2:80", "10.0.0.4:80", "10.0.0.5:80")
    assert len(apiserver.lists) == 2  # the 410 made it list again
    after = sets.seen[before:]
    assert after and all("10.0.0.2:80" in [e.address for e in s] for s in after)  # never dropped
    assert all(len({e.address for e in s}) == len(s) for s in sets.seen)  # never twice
    apiserver.apply(endpoint_slice("web-c3", "web", [endpoint("10.0.0.6")], [port(80)]))
    await sets.has("10.0.0.2:80", "10.0.0.4:80", "10.0.0.6:80")  # and watches on from the new list


async def test_api_server_down_fails_the_watch(
    apiserver: KubeApiServer, provider: KubernetesProvider
) -> None:
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)]))
    sets = watch(provider)
    await sets.has("10.0.0.1:80")
    apiserver.stop()
    await sets.until(lambda s: s.ended, timeout=10, what="the watch to fail")
    assert isinstance(sets.error, KubernetesError)  # the runner keeps the last set, watches again later
    assert "EndpointSlices kubernetes.io/service-name=web in default" in str(sets.error)
    assert sets.addresses == ["10.0.0.1:80"]  # nothing empty was yielded on the way down


async def test_wrong_token_fails_the_watch(apiserver: KubeApiServer, tmp_path: Path) -> None:
    doc = apiserver.kubeconfig()
    doc["users"][0]["user"]["token"] = "not-the-token"
    p = KubernetesProvider.from_url(f"kubernetes://{kubeconfig(tmp_path, doc)}")
    try:
        sets = watch(p)
        await sets.until(lambda s: s.ended, what="the watch to fail")
        assert isinstance(sets.error, KubernetesError) and sets.error.status == 401 and sets.seen == []
        assert "\n" not in str(sets.error) and "401 Unauthorized" in str(sets.error)
    finally:
        await p.aclose()


async def test_aclose_ends_every_watch(apiserver: KubeApiServer, tmp_path: Path) -> None:
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)]))
    p = KubernetesProvider.from_url(f"kubernetes://{kubeconfig(tmp_path, apiserver.kubeconfig())}")
    sets = watch(p)
    await sets.has("10.0.0.1:80")
    await p.aclose()
    await sets.until(lambda s: s.ended, what="the watch to end")
    assert sets.error is None
    await until(lambda: not apiserver.streams, "the server to see the watch go")


async def test_url_context_namespace_and_kubeconfig_env(
    apiserver: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("10.0.0.1")], [port(80)], namespace="shop"))
    doc = apiserver.kubeconfig(context="right", namespace="shop")
    doc["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
    doc["contexts"].append({"name": "wrong", "context": {"cluster": "nowhere", "user": "tester"}})
    doc["current-context"] = "wrong"
    path = kubeconfig(tmp_path, doc)

    p = KubernetesProvider.from_url(f"kubernetes://{path}?context=right")
    assert p.namespace == "shop"  # the context's namespace
    sets = watch(p)
    await sets.has("10.0.0.1:80")
    await p.aclose()

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    p = KubernetesProvider.from_url("kubernetes://?context=right&namespace=other")
    assert p.namespace == "other"
    sets = watch(p, namespace="shop")  # the service's option wins
    await sets.has("10.0.0.1:80")
    await p.aclose()

    for bad in ("consul://", "kubernetes://host/path", "kubernetes://?cluster=x"):
        with pytest.raises(ValueError):
            KubernetesProvider.from_url(bad)

    missing = tmp_path / "nowhere.yaml"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    with pytest.raises(KubernetesError, match=f"no usable configuration from {missing}"):
        KubernetesProvider.from_url("kubernetes://")


def test_options_need_no_client_library() -> None:
    code = (
        "import sys; sys.modules['kubernetes'] = None\n"  # any import of it now fails
        "from meshlib.discovery.kubernetes import Options\n"
        "o = Options.model_validate({'namespace': 'shop', 'port': 'http'})\n"
        "assert (o.namespace, o.port, o.watch_timeout) == ('shop', 'http', 300)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=30)
    with pytest.raises(ValueError):
        Options.model_validate({"namespace": "Not_A_Namespace"})
    with pytest.raises(ValueError):
        Options.model_validate({"ports": "http"})


def test_docs_example_runs(apiserver: KubeApiServer, tmp_path: Path) -> None:
    root = Path(__file__).parents[2]
    section = (root / "docs" / "discovery.md").read_text().split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    endpoints = [endpoint("10.0.0.1", zone="zone-a", node="node-1"), endpoint("10.0.0.2", zone="zone-b")]
    apiserver.apply(endpoint_slice("web-abc12", "web", endpoints, [port(8080, "http")]))
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(tmp_path, apiserver.kubeconfig())),
        "PYTHONPATH": str(root),
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "10.0.0.1:8080 {'zone': 'zone-a', 'node': 'node-1'}",
        "10.0.0.2:8080 {'zone': 'zone-b'}",
    ]


async def test_terminating_endpoint_drains_with_zero_failed_requests(
    apiserver: KubeApiServer, provider: KubernetesProvider
) -> None:
    # two "pods" on one port, as in a cluster: 127.0.0.2 and 127.0.0.3 are loopback too
    leaving, staying = Backend("leaving"), Backend("staying")
    a = serve(leaving, host="127.0.0.2")
    b = serve(staying, host="127.0.0.3", port=a.port)
    ports = [port(a.port, "http")]
    try:
        apiserver.apply(
            endpoint_slice("web-a1", "web", [endpoint("127.0.0.2"), endpoint("127.0.0.3")], ports)
        )
        async with meshlib.Mesh("caller") as mesh, mesh.client() as client:
            feed = asyncio.create_task(_feed(mesh, provider.watch(Target("web", "web", {"port": "http"}))))
            await until(
                lambda: len(mesh.snapshot.discovered.get("web", ())) == 2, "both endpoints in the mesh"
            )
            failures: list[str] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    try:
                        r = await client.get("http://web/sleep?ms=20")
                        if r.status_code != 200:
                            failures.append(str(r.status_code))
                    except Exception as e:  # a failed request, whatever its kind
                        failures.append(repr(e))

            workers = [asyncio.create_task(traffic()) for _ in range(6)]
            await until(lambda: leaving.hits > 20 and staying.hits > 20, "traffic to both")

            terminating = endpoint("127.0.0.2", ready=False, serving=True, terminating=True)
            apiserver.apply(endpoint_slice("web-a1", "web", [terminating, endpoint("127.0.0.3")], ports))
            await until(lambda: len(mesh.snapshot.discovered["web"]) == 1, "the drain to reach the mesh")
            await until(lambda: leaving.in_flight == 0, "in-flight requests to finish")
            drained_at, staying_at = leaving.hits, staying.hits
            await until(lambda: staying.hits > staying_at + 50, "more traffic")
            assert leaving.hits == drained_at  # no new request went to the terminating endpoint

            a.stop()  # the pod exits, then its endpoint leaves the slice
            apiserver.apply(endpoint_slice("web-a1", "web", [endpoint("127.0.0.3")], ports))
            staying_at = staying.hits
            await until(lambda: staying.hits > staying_at + 50, "traffic after the pod left")
            stop.set()
            await asyncio.gather(*workers)
            feed.cancel()
        assert failures == []
    finally:
        a.stop()
        b.stop()


async def _feed(mesh: meshlib.Mesh, sets: AsyncIterator[EndpointSet]) -> None:
    """What the discovery runner does with each set (kept to the bare update here)."""
    n = 0
    async for s in sets:
        n += 1
        mesh.update(lambda snap, s=s, n=n: snap.with_discovered({"web": s}, f"k8s-{n}"))  # type: ignore[misc]


async def until(ok: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll with a deadline, without blocking the event loop the watch reads on."""
    async with asyncio.timeout(timeout):
        while not ok():
            await asyncio.sleep(0.01)
    assert ok(), what


LIVE_SERVICE = os.environ.get("MESHLIB_TEST_K8S_SERVICE", "")  # namespace/name[:port name]
LIVE_SKIP = (
    "KUBECONFIG is not set: no cluster to test against"
    if not os.environ.get("KUBECONFIG")
    else "set MESHLIB_TEST_K8S_SERVICE=namespace/name[:port] to name a Service of that cluster to list"
    if not LIVE_SERVICE
    else ""
)


@pytest.mark.skipif(bool(LIVE_SKIP), reason=LIVE_SKIP)
async def test_live_lists_a_real_service() -> None:
    ref, _, port_name = LIVE_SERVICE.partition(":")
    namespace, _, name = ref.rpartition("/")
    options = {"namespace": namespace or None, "port": port_name or None}
    p = KubernetesProvider.from_url("kubernetes://")
    try:
        sets = Sets(p.watch(Target(name, name, {k: v for k, v in options.items() if v})))
        await sets.until(lambda s: bool(s.seen), timeout=20, what="the first set")
        assert sets.error is None and sets.seen[0], f"{LIVE_SERVICE} has no ready endpoints"
    finally:
        await p.aclose()
