"""A stand-in for meshlib.discovery.consul's `Options` (per-service options only), so the rules'
validation of `provider: consul` blocks is tested before that module is part of the branch."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: str | None = None
    passing_only: bool = True
    datacenter: str | None = Field(None, min_length=1)


class ConsulProvider:
    kind: ClassVar[str] = "consul"

    @classmethod
    def from_url(cls, url: str) -> ConsulProvider:
        import meshlib_absent_consul_client  # noqa: F401  # the missing client library

        return cls()
