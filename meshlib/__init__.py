"""meshlib: an in-process service mesh for Python."""

import logging

from meshlib.errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    MeshError,
    NoEndpointsError,
    OriginationError,
    OutboundBlocked,
    RateLimitedError,
)
from meshlib.mesh import Mesh
from meshlib.security.users import User, current_user

__version__ = "0.1.0"

logging.getLogger("meshlib").addHandler(logging.NullHandler())

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
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
