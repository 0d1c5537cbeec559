"""What a service name may be: one rule for rules documents, `Mesh(...)` and a caller's claim.

Lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most
253 characters: a DNS name, as Kubernetes and Consul service names are.
"""

from __future__ import annotations

import re

SERVICE_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")  # whole names: `fullmatch`
MAX_SERVICE = 253
RULE = (
    f"1 to {MAX_SERVICE} lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
)


def service_name_error(name: object) -> str | None:
    """Why `name` is not a service name; None when it is one."""
    if not isinstance(name, str):
        return f"a service name is a string, not {type(name).__name__}"
    if len(name) > MAX_SERVICE:
        return f"service name is longer than {MAX_SERVICE} characters ({len(name)})"
    if not SERVICE_RE.fullmatch(name):
        return (
            f"invalid service name {name!r}: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def is_service_name(name: str) -> bool:
    return len(name) <= MAX_SERVICE and SERVICE_RE.fullmatch(name) is not None


def check_service_name(name: object, what: str) -> str:
    """`name` if it is a service name; else a TypeError or ValueError that starts with `what`
    (the argument) and says what a valid name is."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a service name (a str), not {type(name).__name__}")
    if not is_service_name(name):
        raise ValueError(f"{what}: {name[:80]!r} is not a service name: use {RULE}")
    return name
