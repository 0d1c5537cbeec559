"""Every `MESH_*` environment variable meshlib reads, in one model (docs/configuration.md).

`Mesh(...)` builds it with its explicit arguments, which win over the environment; the CLI
reads its defaults from it. The environment is read when the model is made, not at import, so
a variable set before `Mesh()` counts. An empty variable counts as unset.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meshlib.default_settings import ENV_PREFIX

log = logging.getLogger("meshlib.settings")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
MAX_TELEMETRY_INTERVAL = 3600.0
"""The longest report interval the control service takes (a report names its interval)."""


class MeshSettings(BaseSettings):
    """A process's mesh configuration: `MESH_<FIELD>` in the environment, or given explicitly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        extra="ignore",
        hide_input_in_errors=True,  # a token or a Redis password never lands in an error message
    )

    control: str | None = Field(
        None,
        description="URL of the control service, or the URLs of its replicas comma-separated (each "
        "http:// or https://, all of one scheme); unset: local mode (rules from config= only)",
    )
    token: str | None = Field(
        None,
        repr=False,
        description="join token: with control and a service name, the Mesh gets its certificate from the CA",
    )
    address: str | None = Field(
        None, description="host:port this instance registers with the control service's registry"
    )
    mtls: str | None = Field(
        None,
        description="how serve() treats callers: STRICT (the default with an identity), PERMISSIVE, "
        "or DISABLE (plaintext, no identity)",
    )
    trust_domain: str = Field("mesh.local", description="SPIFFE trust domain of the mesh's identities")
    ca: str | bytes | None = Field(
        None,
        description="CA bundle (a PEM file's path, or PEM text) to verify an https control service",
    )
    redis: str | None = Field(
        None,
        repr=False,
        description="Redis URL where RateLimit documents with scope: global keep their shared bucket",
    )
    cache_dir: Path | None = Field(
        None,
        description="where the last control state is kept for a restart without the control service; "
        "unset: $XDG_CACHE_HOME/meshlib, else ~/.cache/meshlib",
    )
    telemetry_interval: float | None = Field(
        None,
        description="seconds between traffic reports to the control service (service graph), at most "
        "3600; 0: off; unset, or a bad value (ignored with a warning): 5",
    )
    metrics_path: str | None = Field(
        None, description="path on which the server middleware answers Prometheus scrapes; unset: none"
    )
    access_log: bool | str = Field(
        False,
        description="JSON access log: 1/true/yes/on for the meshlib.access logger, 0/false/no/off for "
        "none, - for stdout, anything else a file to append to",
    )
    admin_token: str | None = Field(
        None, repr=False, description="the control service's admin token, for the meshlib CLI"
    )
    passthrough: bool = Field(
        False,
        description="Send requests for single-label hosts that are not mesh services to DNS instead of "
        "raising NoEndpointsError",
    )
    outbound: str = Field(
        "allow_any",
        description="outbound policy: allow_any (any host may be called) or registry_only (only mesh "
        "services and External hosts; others fail with OutboundBlocked)",
    )
    http_transport: str = Field(
        "h1",
        description="what sends the clients' requests (async and sync) to mesh endpoints: h1 (the "
        "mesh's own HTTP/1.1 transports) or httpcore (httpx's own); http2=True or a transport= of the "
        "caller's own always keeps httpcore / that transport",
    )
    load_reports: bool | None = Field(
        None,
        description="whether the server middleware (ASGI, WSGI, gRPC) puts an ORCA endpoint-load-metrics "
        "load report on every response (1/true/yes/on) or not (0/false/no/off); unset: while the rules "
        "give this service's Destination a balancer that weighs by them (weighted_round_robin)",
    )

    discovery: str | None = Field(
        None,
        repr=False,  # a provider URL may carry a token
        description="discovery providers' URLs, comma-separated (consul://127.0.0.1:8500, kubernetes://, "
        "dns://); the first is the process default, where a service without an Endpoints document is "
        "looked up by its mesh name",
    )

    @classmethod
    def resolve(cls, **explicit: Any) -> MeshSettings:
        """The settings with `explicit` values (None: not given) winning over the environment;
        a ValueError naming each bad setting (never its value) otherwise."""
        try:
            return cls(**{name: value for name, value in explicit.items() if value is not None})
        except ValidationError as exc:
            problems = "; ".join(
                f"{name}= or ${ENV_PREFIX}{name.upper()}: {error['msg']}"
                for error in exc.errors()
                for name in [str(error["loc"][0]) if error["loc"] else "?"]
            )
            raise ValueError(f"invalid mesh settings: {problems}") from None

    @field_validator("control", mode="before")
    @classmethod
    def _control(cls, value: Any) -> Any:
        """One URL or several (comma-separated, or a list given to Mesh(control=)), kept as
        one comma-separated string with no trailing slashes; blank: unset."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, (str, list, tuple)):
            return value  # the type check says what is wrong
        from meshlib.control.endpoints import parse_control_urls

        return ",".join(parse_control_urls(value))

    @field_validator("telemetry_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if value is None:  # unset (settings validate their defaults too)
            return None
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            log.warning("ignoring %sTELEMETRY_INTERVAL=%r: not a number of seconds", ENV_PREFIX, text)
            return None
        if seconds > MAX_TELEMETRY_INTERVAL:  # the control service would refuse every report
            log.warning(
                "ignoring %sTELEMETRY_INTERVAL=%r: more than %d seconds",
                ENV_PREFIX,
                text,
                MAX_TELEMETRY_INTERVAL,
            )
            return None
        return seconds

    @field_validator("outbound", mode="before")
    @classmethod
    def _outbound(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        word = value.strip().lower()  # Istio spells them ALLOW_ANY and REGISTRY_ONLY
        if word not in ("allow_any", "registry_only"):
            raise ValueError("must be allow_any or registry_only")
        return word

    @field_validator("http_transport", mode="before")
    @classmethod
    def _http_transport(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word not in ("h1", "httpcore"):
            raise ValueError("must be h1 or httpcore")
        return word

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip()
            if word.lower() in _TRUE:
                return True
            if word.lower() in _FALSE:
                return False
            return word
        return value

    @field_validator("ca", mode="before")
    @classmethod
    def _ca(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value
