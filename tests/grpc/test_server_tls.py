"""The sync interceptor on a TLS grpc server: the caller is the SPIFFE id of the certificate
grpc verified, never the `x-mesh-source` metadata. (The mesh's own server credentials are
`meshlib.grpc.credentials`; here plain grpcio credentials from a test CA.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta

import grpc
import pytest

import meshlib
from meshlib.grpc import server_interceptors
from meshlib.rules import parse_documents
from meshlib.security import certificates
from tests.grpc import echo_pb2, echo_pb2_grpc
from tests.grpc.echo_servicers import Echo

TD = certificates.DEFAULT_TRUST_DOMAIN
ONLY_BILLING = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]
CLAIMS_BILLING = (("x-mesh-source", "billing"),)


class Pki:
    def __init__(self) -> None:
        self.ca, self.ca_key = certificates.create_ca(TD)

    def pair(self, service: str) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for `service`, valid for 127.0.0.1."""
        key = certificates.generate_key()
        cert = certificates.issue(
            self.ca,
            self.ca_key,
            certificates.make_csr(key, service),
            spiffe_id=certificates.spiffe_id(TD, service),
            ip_addresses=["127.0.0.1"],
            lifetime=timedelta(hours=1),
        )
        return certificates.key_pem(key), cert


@contextlib.contextmanager
def tls_server(require_client_auth: bool) -> Iterator[tuple[Pki, int, meshlib.Mesh]]:
    """grpc reads a client certificate only when it requires one (and then verifies it)."""
    pki = Pki()
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(ONLY_BILLING), "1")
        server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=server_interceptors(mesh))
        echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
        credentials = grpc.ssl_server_credentials(
            [pki.pair("orders")], root_certificates=pki.ca, require_client_auth=require_client_auth
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        try:
            yield pki, port, mesh
        finally:
            server.stop(None).wait()


def stub_as(pki: Pki, port: int, service: str | None) -> tuple[grpc.Channel, echo_pb2_grpc.EchoStub]:
    key, cert = pki.pair(service) if service is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(pki.ca, private_key=key, certificate_chain=cert)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
    return channel, echo_pb2_grpc.EchoStub(channel)


def test_the_certificate_names_the_caller() -> None:
    with tls_server(require_client_auth=True) as (pki, port, mesh):
        channel, stub = stub_as(pki, port, "billing")
        with channel:
            assert stub.Unary(echo_pb2.Ping(), metadata=(("x-mesh-source", "checkout"),)).caller == "billing"
        channel, stub = stub_as(pki, port, "checkout")
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.Unary(echo_pb2.Ping(), metadata=CLAIMS_BILLING)  # a claim does not beat a certificate
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "source checkout may not" in (caught.value.details() or "")
        assert mesh.stats.edge("in", "billing").by_class == {"2xx": 1}
        assert mesh.stats.edge("in", "checkout").by_class == {"4xx": 1}


def test_on_tls_without_a_client_certificate_metadata_names_nobody() -> None:
    with tls_server(require_client_auth=False) as (pki, port, mesh):
        channel, stub = stub_as(pki, port, None)
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.Unary(echo_pb2.Ping(), metadata=CLAIMS_BILLING)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "a caller without identity" in (caught.value.details() or "")
        assert mesh.stats.edge("in", "unknown").by_class == {"4xx": 1}
