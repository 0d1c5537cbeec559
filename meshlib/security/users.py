"""The end user of the request being handled: who a verified token says it is.

Set by the inbound sequence once a `RequestAuthentication` rule has verified the request's
token, for the time the app runs; nothing here imports PyJWT, so reading it costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class User:
    """A verified end user: the token's issuer and subject, and all its claims (read-only)."""

    issuer: str
    subject: str
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False, repr=False)

    @property
    def principal(self) -> str:
        """`<issuer>/<subject>`: what `from_users` in an Authorization rule names."""
        return f"{self.issuer}/{self.subject}"


user_var: ContextVar[User | None] = ContextVar("meshlib_user", default=None)


def current_user() -> User | None:
    """The verified end user of the request this code runs for; None outside a request, for a
    request without a token, and for services without a `RequestAuthentication` document."""
    return user_var.get()
