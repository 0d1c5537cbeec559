"""The control API's handlers: each parses its request (`parsing`), asks the plane and shapes
the answer. A bug that still raises is logged and answered with a JSON 500, as a last resort."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from meshlib.control import dashboard, graph
from meshlib.control.acks import Ack, latest, parse_acks
from meshlib.control.binding import ClientTaken
from meshlib.control.etcd_client import EtcdError
from meshlib.control.parsing import (
    _NO_BODY,
    ApiError,
    HeartbeatBody,
    RegisterBody,
    _expect_object,
    _flag,
    _held_version,
    _id_param,
    _int_param,
    _json_body,
    _number,
    _peer,
    _rules_body,
    _rules_error,
    _service_param,
    _validated,
    _validation_error,
    _version_param,
)
from meshlib.control.plane import ControlPlane
from meshlib.control.registry import RegistryFull
from meshlib.control.store import StoreUnavailable
from meshlib.control.stream import WatchResponse
from meshlib.rules import EndpointSpec, RulesError

log = logging.getLogger("meshlib.control")

Handler = Callable[[Request], Awaitable[Response]]

_NO_CONTENT = Response(status_code=204)  # the same for every ack: built once
_RETRY = (
    "a change sent is in the history once or not at all: check it (meshlib history) before sending it again"
)


def _handler(fn: Callable[[ControlPlane, Request], Awaitable[Response]], plane: ControlPlane) -> Handler:
    @functools.wraps(fn)
    async def endpoint(request: Request) -> Response:
        try:
            return await fn(plane, request)
        except ApiError as exc:
            return exc.response()
        except RulesError as exc:  # refused rules, or stored ones this meshlib no longer accepts
            return _rules_error(exc).response()
        except EtcdError as exc:  # the store out of reach: say so, and whether a change may land
            log.warning(
                "control: %s %s: the rules store did not answer: %s", request.method, request.url.path, exc
            )
            retry = "" if request.method in ("GET", "HEAD") else f"; {_RETRY}"
            return JSONResponse({"error": f"the rules store is unavailable ({exc}){retry}"}, 503)
        except StoreUnavailable as exc:  # SQLite: another process holds rules.db's lock, a disk error
            log.warning(
                "control: %s %s answered 503: the rules store %s", request.method, request.url.path, exc
            )
            retry = "" if request.method in ("GET", "HEAD") else "; nothing was changed: try again"
            return JSONResponse(
                {"error": f"the rules store is {exc.reason}{retry}"}, 503, headers={"Retry-After": "1"}
            )
        except Exception:
            log.exception("control: %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal error"}, 500)

    return endpoint


def _require_admin(plane: ControlPlane, request: Request) -> None:
    if not plane.auth.check(request.headers.get("authorization")):
        raise ApiError(
            401,
            "missing or wrong admin token (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": 'Bearer realm="meshlib control"'},
        )


def _caller(plane: ControlPlane, request: Request, service: str | None = None) -> Any:
    """With security on, the authenticated caller, allowed to act as `service` (401, 403);
    None when security is off. Runs before the body is read."""
    if plane.ca is None:
        return None
    from meshlib.control import security_api

    return security_api.require(plane, request, service)


def _authorize(identity: Any, service: str | None) -> None:
    if identity is not None:
        from meshlib.control import security_api

        security_api.authorize(identity, service)


def _claim_client(plane: ControlPlane, identity: Any, client: str, service: str | None) -> str | None:
    """The service a request about `client` acts for; 403 if the client id is another service's
    (security on: meshlib.control.binding)."""
    try:
        return plane.clients.claim(identity, client, service)
    except ClientTaken as exc:
        raise ApiError(403, str(exc)) from None


async def get_config(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse({"version": plane.version, "documents": plane.documents})


async def put_config(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    dry_run = _flag(request, "dry_run")
    docs, message = await _rules_body(request, plane.max_body)
    return JSONResponse(await plane.apply(docs, message=message, dry_run=dry_run))


async def delete_config(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    kind, service = request.path_params["kind"], request.path_params["service"]
    # a name that is no service name is no document's: refused as not found, with the reason
    service = _service_param(service, status=404)
    return JSONResponse({"version": await plane.delete(kind, service)})


async def get_history(plane: ControlPlane, request: Request) -> Response:
    limit = _int_param(request, "limit", 100, 1, 10_000)
    return JSONResponse(await plane.history(limit))


async def get_history_version(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse(await plane.get_version(_version_param(request.path_params["version"])))


async def post_rollback(plane: ControlPlane, request: Request) -> Response:
    _require_admin(plane, request)
    return JSONResponse(await plane.rollback(_version_param(request.path_params["version"])))


async def watch(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    named = _id_param(request, "client")
    client = named or f"anonymous-{secrets.token_hex(6)}"
    service = _id_param(request, "service")
    _authorize(identity, service)
    if named is not None:
        service = _claim_client(plane, identity, named, service)
    elif service is None and identity is not None:
        service = identity.service
    last_event_id = request.headers.get("last-event-id")
    held = _held_version(request)
    return WatchResponse(
        plane.hub,
        client,
        service,
        _peer(request),
        last_event_id,
        plane.snapshot_event,
        ping=plane.ping,
        send_timeout=plane.send_timeout,
        applied=named is not None and _flag(request, "applied"),
        deltas=_flag(request, "delta"),
        rules=held,
    )


async def post_ack(plane: ControlPlane, request: Request) -> Response:
    """One ack or a batch (meshlib.control.acks); every ack is checked and authorized before
    any is taken."""
    identity = _caller(plane, request)
    take_acks(plane, identity, parse_acks(await _json_body(request, plane.max_body)), _peer(request))
    return _NO_CONTENT


def take_acks(plane: ControlPlane, identity: Any, acks: list[Ack], peer: str | None) -> None:
    """Authorize every ack (403 for any the caller may not send), then record the latest of each
    client."""
    claimed = []
    for ack in acks:
        _authorize(identity, ack.service)
        claimed.append(replace(ack, service=_claim_client(plane, identity, ack.client, ack.service)))
    for ack in latest(claimed):
        plane.hub.ack(
            ack.client,
            service=ack.service,
            revision=ack.revision,
            version=ack.version,
            ok=ack.ok,
            error=ack.error,
            peer=peer,
            epoch=ack.epoch,
        )


async def get_clients(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse(await plane.client_rows())


async def post_register(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service = _service_param(request.path_params["service"])
    _authorize(identity, service)
    data = _expect_object(await _json_body(request, plane.max_body))
    body = _validated(RegisterBody, data)
    endpoint = _validated(EndpointSpec, body.model_dump(exclude={"ttl"}))  # the rules model checks it too
    try:
        instance_id = await plane.register(service, endpoint, body.ttl)
    except RegistryFull as exc:
        raise ApiError(429, str(exc)) from None
    return JSONResponse({"id": instance_id, "ttl": _number(body.ttl)}, 201)


async def put_heartbeat(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service, instance_id = request.path_params["service"], request.path_params["id"]
    _authorize(identity, service)
    data = await _json_body(request, plane.max_body, optional=True)
    ttl = None
    if data is not _NO_BODY:
        ttl = _validated(HeartbeatBody, _expect_object(data)).ttl
    try:
        ttl = await plane.heartbeat(service, instance_id, ttl)
    except KeyError:
        raise ApiError(
            404, f"no instance {instance_id[:100]!r} of {service[:100]!r} (expired? register again)"
        ) from None
    return JSONResponse({"id": instance_id, "ttl": _number(ttl)})


async def delete_instance(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    service, instance_id = request.path_params["service"], request.path_params["id"]
    _authorize(identity, service)
    try:
        await plane.deregister(service, instance_id)
    except KeyError:
        raise ApiError(404, f"no instance {instance_id[:100]!r} of {service[:100]!r}") from None
    return Response(status_code=204)


async def get_registry(plane: ControlPlane, request: Request) -> Response:
    service = request.path_params.get("service")
    if service is not None:
        service = _service_param(service)
    return JSONResponse(await plane.describe_registry(service))


async def post_telemetry(plane: ControlPlane, request: Request) -> Response:
    identity = _caller(plane, request)
    data = _expect_object(await _json_body(request, plane.max_body))
    service = data.get("service")
    _authorize(identity, service if isinstance(service, str) else None)
    try:
        report = graph.parse_report(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    report["service"] = _claim_client(plane, identity, report["client"], report["service"])
    plane.report(report["client"], report, graph.kept_size(report))
    return Response(status_code=204)


async def healthz(plane: ControlPlane, request: Request) -> Response:
    return JSONResponse(plane.health())


async def metrics(plane: ControlPlane, request: Request) -> Response:
    return PlainTextResponse(plane.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


def routes(plane: ControlPlane) -> list[Route]:
    """The app's routes (meshlib.control.openapi.OPERATIONS documents them; a test compares)."""
    from meshlib.control import openapi, security_api

    def route(path: str, **handlers: Callable[[ControlPlane, Request], Awaitable[Response]]) -> Route:
        by_method = {method: _handler(fn, plane) for method, fn in handlers.items()}
        if "GET" in by_method:
            by_method["HEAD"] = by_method["GET"]

        async def dispatch(request: Request) -> Response:
            return await by_method[request.method](request)

        return Route(path, dispatch, methods=list(by_method))

    return [
        route("/", GET=dashboard.index),
        route("/dashboard/{name}", GET=dashboard.static_file),
        route("/v1/graph", GET=graph.get_graph),
        route("/v1/diff", GET=dashboard.get_diff),
        route("/healthz", GET=healthz),
        route("/metrics", GET=metrics),
        route("/v1/config", GET=get_config, PUT=put_config),
        route("/v1/config/{kind}/{service}", DELETE=delete_config),
        route("/v1/history", GET=get_history),
        route("/v1/history/{version}", GET=get_history_version),
        route("/v1/rollback/{version}", POST=post_rollback),
        route("/v1/watch", GET=watch),
        route("/v1/ack", POST=post_ack),
        route("/v1/clients", GET=get_clients),
        route("/v1/registry", GET=get_registry),
        route("/v1/registry/{service}", GET=get_registry, POST=post_register),
        route("/v1/registry/{service}/{id}", PUT=put_heartbeat, DELETE=delete_instance),
        route("/v1/telemetry", POST=post_telemetry),
        route("/v1/ca/sign", POST=security_api.post_sign),
        route("/v1/ca/bundle", GET=security_api.get_bundle),
        route("/v1/ca/rotate", POST=security_api.post_rotate),
        route("/v1/tokens", GET=security_api.get_tokens, POST=security_api.post_token),
        route("/v1/tokens/{id}", DELETE=security_api.delete_token),
        route("/openapi.json", GET=openapi.get_openapi),
    ]
