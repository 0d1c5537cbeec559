"""The control service: rules store, registry, SSE fan-out and its HTTP API (`meshlib control`).

The names below are loaded on first use, so the client side (`meshlib.control.subscriber` and
friends) can be imported without pulling in the server's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.control.app import create_app
    from meshlib.control.etcd_store import EtcdStore
    from meshlib.control.plane import ControlPlane, ControlSettings
    from meshlib.control.registry import Registry
    from meshlib.control.store import SQLiteStore, Store, StoreConflict, VersionInfo

__all__ = [
    "ControlPlane",
    "ControlSettings",
    "EtcdStore",
    "Registry",
    "SQLiteStore",
    "Store",
    "StoreConflict",
    "VersionInfo",
    "create_app",
]

_WHERE = {
    "ControlPlane": "meshlib.control.plane",
    "ControlSettings": "meshlib.control.plane",
    "create_app": "meshlib.control.app",
    "EtcdStore": "meshlib.control.etcd_store",
    "Registry": "meshlib.control.registry",
    "SQLiteStore": "meshlib.control.store",
    "Store": "meshlib.control.store",
    "StoreConflict": "meshlib.control.store",
    "VersionInfo": "meshlib.control.store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
