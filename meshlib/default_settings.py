"""The settings of a process that configures nothing: no argument given to `Mesh()` and no
`MESH_*` variable set.

`Mesh()` takes these as they are instead of building `MeshSettings`, whose imports
(pydantic-settings, pydantic) would cost a client-only process more than the rest of the mesh;
`mesh.settings` makes the model when it is read. tests/test_default_settings.py checks that
every field and default is MeshSettings' own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "MESH_"


@dataclass(frozen=True, slots=True)
class DefaultSettings:
    """MeshSettings' fields with their defaults (the model: meshlib/settings.py)."""

    control: str | None = None
    token: str | None = None
    address: str | None = None
    mtls: str | None = None
    trust_domain: str = "mesh.local"
    ca: str | bytes | None = None
    redis: str | None = None
    cache_dir: Path | None = None
    telemetry_interval: float | None = None
    metrics_path: str | None = None
    access_log: bool | str = False
    admin_token: str | None = None
    passthrough: bool = False
    outbound: str = "allow_any"
    http_transport: str = "h1"
    load_reports: bool | None = None
    discovery: str | None = None


DEFAULT_SETTINGS = DefaultSettings()


def configured(explicit: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether anything is set: an explicit value (not None), or a non-empty variable whose name
    starts with MESH_ in any case (pydantic-settings reads them case-insensitively and ignores
    empty ones). A MESH_ variable that names no setting counts too: only time is lost."""
    if any(value is not None for value in explicit.values()):
        return True
    prefix = ENV_PREFIX.lower()
    return any(value and name.lower().startswith(prefix) for name, value in environ.items())
