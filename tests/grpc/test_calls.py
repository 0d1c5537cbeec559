"""Reading a call's auth context: only a TLS connection's verified certificate names a peer."""

from __future__ import annotations

import grpc

from meshlib.grpc.calls import PUSHBACK, peer_of, refusal_status
from meshlib.inbound import forbidden, too_many

ID = b"spiffe://mesh.local/svc/checkout"


def test_a_verified_spiffe_id_on_tls_names_the_peer() -> None:
    auth = {"transport_security_type": [b"ssl"], "peer_spiffe_id": [ID], "x509_common_name": [b"x"]}
    assert peer_of(auth) == ("spiffe://mesh.local/svc/checkout", True)


def test_tls_without_a_single_spiffe_id_is_secure_but_names_nobody() -> None:
    assert peer_of({"transport_security_type": [b"ssl"]}) == (None, True)
    assert peer_of({"transport_security_type": [b"ssl"], "peer_spiffe_id": [ID, ID]}) == (None, True)


def test_plaintext_never_names_a_peer() -> None:
    assert peer_of({}) == (None, False)
    assert peer_of({"peer_spiffe_id": [ID]}) == (None, False)  # without TLS nothing was verified


def test_refusals_become_their_grpc_codes() -> None:
    assert refusal_status(forbidden("RBAC: no")) == (grpc.StatusCode.PERMISSION_DENIED, "RBAC: no", ())
    code, details, trailing = refusal_status(too_many(3))
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited")
    assert dict(trailing) == {PUSHBACK: "3000", "retry-after": "3"}
