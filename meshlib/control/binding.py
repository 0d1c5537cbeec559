"""Which service each client id speaks for, when security is on.

`watch`, `ack` and `telemetry` name a client id, and what they say is shown (and graphed) as
that client's. With security on, a client id is bound to the service of the first identity
that used it, and from then on only an identity of that service (or the admin) may use it: a
join token of `orders` can no longer ack or report for a process of `payments`.

Bindings are kept per service, each service at most `per_service` of them, least recently used
dropped first: a caller can only ever push out bindings of its own service, never another's.

Replicas on etcd share them (meshlib.control.etcd_bindings.SharedClientBindings), so that a
client moving to another replica keeps its id and nobody else can take it there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Caller(Protocol):
    """What the bindings need of an identity (meshlib.control.security_api.Identity)."""

    @property
    def service(self) -> str | None: ...

    @property
    def admin(self) -> bool: ...


class ClientTaken(Exception):
    """The client id belongs to another service than the caller's."""


class ClientBindings:
    """client id -> service, first come, first served (see the module docstring)."""

    def __init__(self, per_service: int = 10_000) -> None:
        self.per_service = per_service
        self._owner: dict[str, str] = {}
        self._by_service: dict[str, OrderedDict[str, None]] = {}

    def owner(self, client: str) -> str | None:
        return self._owner.get(client)

    def claim(self, caller: Caller | None, client: str, service: str | None) -> str | None:
        """The service a request about `client` acts for, binding the client to it.

        `service` is what the request names (None: not said). Security off (`caller` None):
        `service` as it is. The admin may name any service; its first naming binds an unbound
        client. Any other caller acts for its own service; ClientTaken if the client is bound to
        another (the caller has been checked against `service` already)."""
        if caller is None:
            return service
        bound = self._owner.get(client)
        if caller.admin:
            if service is None:
                return bound
            if bound is None:
                self._bind(client, service)
            return service
        own = caller.service
        assert own is not None
        if bound is not None and bound != own:
            raise ClientTaken(f"client id {client[:100]!r} belongs to service {bound!r}, not {own!r}")
        self._bind(client, own)
        return own

    def __len__(self) -> int:
        return len(self._owner)

    def _bind(self, client: str, service: str) -> list[str]:
        """Bind (or touch) `client`; the clients of `service` dropped to make room."""
        clients = self._by_service.setdefault(service, OrderedDict())
        clients[client] = None
        clients.move_to_end(client)
        self._owner[client] = service
        dropped = []
        while len(clients) > self.per_service:
            old, _ = clients.popitem(last=False)
            del self._owner[old]
            dropped.append(old)
        return dropped

    def _unbind(self, client: str) -> None:
        service = self._owner.pop(client, None)
        if service is not None:
            self._by_service[service].pop(client, None)
