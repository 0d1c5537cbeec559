"""The JSON shapes of the control API's answers, and of the one body parsed by hand.

The request bodies the handlers validate have their models next to the handlers
(`app.RegisterBody`, `security_api.SignBody`, `graph.Report`, ...); these are the other half:
what the handlers answer, so that the OpenAPI document (meshlib.control.openapi) describes
every body from a model, and the API's fuzz test checks each answer against it. Answers are
strict (no unknown fields): a new field in an answer is added here, or the fuzz test fails.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from meshlib.rules import Document


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigBody(BaseModel):
    """`PUT /v1/config` as an object (the body may also be a bare list of documents)."""

    model_config = ConfigDict(extra="forbid")

    documents: list[Document]
    message: Annotated[str, Field(max_length=1000)] | None = None


class Problem(BaseModel):
    """One problem: `field` is a dotted path; rules problems also name the `document`."""

    document: str | None = None
    field: str
    reason: str


class Error(BaseModel):
    """Every refusal: a message, and for a body that failed validation the list of problems."""

    model_config = ConfigDict(extra="allow")

    error: str
    problems: list[Problem] | None = None


class ConfigOut(_Out):
    version: int
    documents: list[Document]


class ApplyResult(_Out):
    """A committed change, or (`valid`, dry run) what it would do."""

    version: int
    changed: bool
    valid: bool | None = None


class VersionOut(_Out):
    version: int


class HistoryEntry(_Out):
    version: int
    created: float
    documents: int = Field(description="how many documents the version has")
    message: str | None


class VersionDocuments(_Out):
    version: int
    created: float
    message: str | None
    documents: list[Document]


class ClientInfo(_Out):
    client: str
    service: str | None
    peer: str | None
    connected: bool
    revision: int | None
    version: int | None
    ok: bool | None
    error: str | None
    stale: bool
    connected_at: float | None
    last_seen: float | None
    replica: str | None = None
    """The control service replica the client is on (its id: random per process start)."""
    protocol: str | None = None
    """`xds` for a gRPC xDS client (its acks are per type in `xds`); absent for a watch stream."""
    xds: dict[str, dict[str, str | None]] | None = None
    left_out: list[str] | None = None
    """An xDS client's: the rules left out of the routes of the services it asked for, each with its reason
    (a path or header regex RE2 does not take)."""


class InstanceOut(_Out):
    """A registration: the instance's id and its TTL in seconds."""

    id: str
    ttl: float


class Instance(_Out):
    id: str
    address: str
    labels: dict[str, str]
    weight: int
    expires_in: float


class Health(_Out):
    status: Literal["ok"]
    version: int
    revision: int
    epoch: str


class GraphNode(_Out):
    service: str
    instances: int
    reporters: int


class Graph(_Out):
    """The live service graph; edges are described in docs/control-api.md."""

    generated: float
    max_age: float
    nodes: list[GraphNode]
    edges: list[dict[str, Any]]


class DiffOut(_Out):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: int = Field(alias="from")
    to: int
    changed: bool
    truncated: bool
    diff: str


class SignOut(_Out):
    certificate: str = Field(description="PEM: the leaf, then any intermediates")
    bundle: str = Field(description="PEM: every root to trust")
    spiffe_id: str
    expires: int = Field(description="unix seconds")


class BundleOut(_Out):
    trust_domain: str
    bundle: str


class RotateOut(_Out):
    bundle: str
    overlap: float


class TokenInfo(_Out):
    id: str
    service: str
    created: float
    expires: float | None = Field(description="unix seconds; null: until revoked")


class TokenCreated(TokenInfo):
    token: str = Field(description="the secret: shown only in this answer")
