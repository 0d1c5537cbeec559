"""This instance in Consul: registered with an HTTP (or TCP) health check on the app when it
starts serving, deregistered when it stops, so Consul-based callers find it like any other.

Registration goes through the local agent (`PUT /v1/agent/service/register`), which owns the
check and syncs the catalog; `deregister_after` lets the agent remove an instance that died
without deregistering (its check critical for that long).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from meshlib.addresses import check_address
from meshlib.discovery.consul import ConsulAgent, ConsulError

log = logging.getLogger("meshlib.discovery.consul")


def _go(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass
class ConsulRegistration:
    """One service instance to register with the agent at `agent` (a `consul://` URL, kept
    out of the repr: it may hold a token).

    `address` is host:port as callers reach it. A wildcard host (0.0.0.0, ::) registers no
    address, so callers get the node's (Consul's own rule), and the agent, which runs on this
    host, checks 127.0.0.1 (::1). The check is an HTTP GET of `check_path` on it (`check_scheme`
    https for a TLS port, which the agent does not verify: it holds no mesh certificate), a TCP
    connect (`check="tcp"`, the choice under mTLS, where the agent has no client certificate),
    or none. `service_id` defaults to `<service>-<host>-<port>`, unique per agent.
    """

    agent: str = field(repr=False)
    service: str
    address: str
    service_id: str | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    check: Literal["http", "tcp", "none"] = "http"
    check_path: str = "/"
    check_scheme: Literal["http", "https"] = "http"
    interval: float = 10.0
    timeout: float = 5.0
    deregister_after: float = 60.0  # Consul's minimum is one minute
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_address(self.address)
        host, _, port = self.address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.wildcard = self.host in ("0.0.0.0", "::")
        checked = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, host)
        self.checked_address = f"{checked}:{self.port}"
        if self.service_id is None:
            self.service_id = f"{self.service}-{self.host}-{self.port}".replace(":", "-")
        if self.check_path and not self.check_path.startswith("/"):
            raise ValueError("check_path must start with '/'")
        self._agent = ConsulAgent.from_url(self.agent)

    def definition(self) -> dict[str, Any]:
        """The check py-consul sends inside the registration."""
        if self.check == "none":
            return {}
        check: dict[str, Any] = {"interval": _go(self.interval), "timeout": _go(self.timeout)}
        if self.check == "tcp":
            check["tcp"] = self.checked_address
        else:
            check["http"] = f"{self.check_scheme}://{self.checked_address}{self.check_path}"
            check["tls_skip_verify"] = self.check_scheme == "https"
        check["DeregisterCriticalServiceAfter"] = _go(max(self.deregister_after, 60.0))
        return check

    async def register(self) -> None:
        """Register (or re-register: the same id replaces) this instance; ConsulError if refused."""
        if self._client is None:
            self._client = self._agent.connect()
        where = f"Consul agent {self._agent.address}"
        try:
            ok = await self._client.agent.service.register(
                self.service,
                service_id=self.service_id,
                address=None if self.wildcard else self.host,
                port=self.port,
                tags=list(self.tags) or None,
                meta=dict(self.meta) or None,
                weights={"Passing": self.weight, "Warning": 1},
                check=self.definition() or None,
                token=self._agent.token,
            )
        except Exception as exc:
            client, self._client = self._client, None
            await client.close()
            raise ConsulError(
                f"{where}: registering {self.service_id!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if not ok:  # py-consul's answer to a 404
            raise ConsulError(f"{where}: registering {self.service_id!r} was refused")
        log.info("registered %s (%s) in Consul at %s", self.service_id, self.address, self._agent.address)

    async def deregister(self) -> None:
        """Remove this instance; an instance already gone is fine. Closes the client."""
        client, self._client = self._client, None
        if client is None:
            client = self._agent.connect()
        try:
            await client.agent.service.deregister(self.service_id, token=self._agent.token)
            log.info("deregistered %s from Consul at %s", self.service_id, self._agent.address)
        except Exception as exc:
            where = f"Consul agent {self._agent.address}: deregistering {self.service_id!r}"
            raise ConsulError(f"{where}: {type(exc).__name__}: {exc}") from exc
        finally:
            await client.close()

    async def __aenter__(self) -> ConsulRegistration:
        await self.register()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.deregister()
