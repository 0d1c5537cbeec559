"""The HTTP adapters: httpx transports on the client side, ASGI/WSGI middleware and `serve` on
the server side. The protocol-neutral core (pipeline, routing, snapshot, rules, balancing,
resilience) knows none of them; the Mesh imports them only when a client or a server is made,
so a second protocol plugs in beside this package."""
