"""meshlib: an in-process service mesh for Python."""

import logging
from typing import TYPE_CHECKING, Any

from meshlib.errors import (
    BulkheadFullError,
    CircuitOpenError,
    ConcurrencyLimitedError,
    DeadlineExceeded,
    MeshError,
    NoEndpointsError,
    OriginationError,
    OutboundBlocked,
    RateLimitedError,
)

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.security.users import User, current_user

__version__ = "0.1.0"

logging.getLogger("meshlib").addHandler(logging.NullHandler())

# Imported on first use (PEP 562), so that `import meshlib` (the errors, for `except` clauses)
# loads no more than httpx: the Mesh's modules come with the first `meshlib.Mesh`.
_LAZY = {
    "Mesh": "meshlib.mesh",
    "User": "meshlib.security.users",
    "current_user": "meshlib.security.users",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "ConcurrencyLimitedError",
    "DeadlineExceeded",
    "Mesh",
    "MeshError",
    "NoEndpointsError",
    "OriginationError",
    "OutboundBlocked",
    "RateLimitedError",
    "User",
    "__version__",
    "current_user",
]
