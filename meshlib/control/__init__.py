"""The control service: rules store, registry, SSE fan-out and its HTTP API (`meshlib control`)."""

from meshlib.control.app import ControlPlane, create_app
from meshlib.control.registry import Registry
from meshlib.control.store import SQLiteStore, Store, VersionInfo

__all__ = ["ControlPlane", "Registry", "SQLiteStore", "Store", "VersionInfo", "create_app"]
