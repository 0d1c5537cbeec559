"""The control service's CA: its files, operator CAs, signing, rotation, its own certificate."""

from __future__ import annotations

import datetime as dt
import stat
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshlib.security import certificates as c
from meshlib.security.ca import CAError, CertificateAuthority


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _csr(service: str = "orders") -> bytes:
    return c.make_csr(c.generate_key(), service)


def verify(chain_pem: bytes, bundle_pem: bytes) -> list[str]:
    """Verify a leaf + chain against a bundle as a TLS server would; the leaf's URIs."""
    chain = c.load_pem_chain(chain_pem)
    verifier = PolicyBuilder().store(Store(c.load_pem_chain(bundle_pem))).build_client_verifier()
    result = verifier.verify(chain[0], chain[1:])
    return [s.value for s in result.subjects if isinstance(s, x509.UniformResourceIdentifier)]


def test_first_start_creates_a_root_with_a_private_key(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "data")
    key_file, cert_file = tmp_path / "data" / "ca.key", tmp_path / "data" / "ca.crt"
    assert _mode(key_file) == 0o600
    assert _mode(tmp_path / "data") == 0o700
    (root,) = c.load_pem_chain(cert_file.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert c.load_key_pem(key_file.read_bytes()).public_key() == root.public_key()
    assert ca.bundle == cert_file.read_bytes() == (tmp_path / "data" / "ca-bundle.crt").read_bytes()
    assert not list((tmp_path / "data").glob(".*.tmp"))
    # the next start loads the same root (and leaves the key's mode alone)
    again = CertificateAuthority(tmp_path / "data")
    assert again.bundle == ca.bundle
    assert _mode(key_file) == 0o600


def test_sign_gives_a_short_lived_spiffe_leaf(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, trust_domain="prod.example")
    key = c.generate_key()
    start = dt.datetime.now(dt.UTC)
    chain = ca.sign(c.make_csr(key, "orders"), "orders")
    (leaf,) = c.load_pem_chain(chain)  # a leaf of a root: no intermediates to send
    assert leaf.public_key() == key.public_key()
    assert verify(chain, ca.bundle) == ["spiffe://prod.example/svc/orders"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc < start
    assert (
        timedelta(hours=23, minutes=59) < leaf.not_valid_after_utc - start <= timedelta(hours=24, seconds=1)
    )


def test_lifetimes_are_checked_and_capped(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)

    def life(value: object) -> timedelta:
        leaf = c.load_pem_chain(ca.sign(_csr(), "orders", value))[0]  # type: ignore[arg-type]
        return leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)

    assert life(1) <= timedelta(seconds=1)
    assert timedelta(minutes=4) < life(timedelta(minutes=5)) <= timedelta(minutes=5)
    assert timedelta(days=29) < life(365 * 86400) <= timedelta(days=30)
    assert timedelta(days=29) < life(timedelta(days=400)) <= timedelta(days=30)
    for bad in (0, 0.5, -1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError):
            ca.sign(_csr(), "orders", bad)  # type: ignore[arg-type]


def test_sign_refuses_bad_input(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    with pytest.raises(ValueError, match="not a PEM certificate signing request"):
        ca.sign(b"junk", "orders")
    with pytest.raises(ValueError, match="invalid service"):
        ca.sign(_csr(), "a/b")


def _intermediate(root_pem: bytes, root_key_pem: bytes) -> tuple[bytes, bytes]:
    root = c.load_pem_chain(root_pem)[0]
    root_key = c.load_key_pem(root_key_pem)
    key = c.generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return c.cert_pem(cert), c.key_pem(key)


def test_an_operator_root(tmp_path: Path) -> None:
    root_pem, root_key = c.create_ca("corp")
    (tmp_path / "root.crt").write_bytes(root_pem)
    (tmp_path / "root.key").write_bytes(root_key)
    ca = CertificateAuthority(tmp_path / "data", ca_cert=tmp_path / "root.crt", ca_key=tmp_path / "root.key")
    assert ca.operator and ca.bundle == root_pem
    assert verify(ca.sign(_csr(), "orders"), root_pem) == ["spiffe://mesh.local/svc/orders"]
    assert not (tmp_path / "data" / "ca.key").exists()  # the operator's key is not copied
    with pytest.raises(CAError, match="operator"):
        ca.rotate(60)


def test_an_operator_intermediate_chains_to_its_root(tmp_path: Path) -> None:
    root_pem, root_key = c.create_ca("corp")
    inter_pem, inter_key = _intermediate(root_pem, root_key)
    (tmp_path / "ca.crt").write_bytes(inter_pem + root_pem)  # the chain up to the root
    (tmp_path / "ca.key").write_bytes(inter_key)
    ca = CertificateAuthority(tmp_path / "data", ca_cert=tmp_path / "ca.crt", ca_key=tmp_path / "ca.key")
    assert ca.bundle == root_pem  # workloads trust the root ...
    chain = ca.sign(_csr(), "orders")
    leaf, inter = c.load_pem_chain(chain)  # ... and get the intermediate with their leaf
    assert c.cert_pem(inter) == inter_pem
    assert verify(chain, ca.bundle) == ["spiffe://mesh.local/svc/orders"]
    with pytest.raises(VerificationError):  # the leaf alone does not chain to the root
        verify(c.cert_pem(leaf), ca.bundle)


def test_an_operator_intermediate_alone_is_the_anchor(tmp_path: Path) -> None:
    root_pem, root_key = c.create_ca("corp")
    inter_pem, inter_key = _intermediate(root_pem, root_key)
    (tmp_path / "ca.crt").write_bytes(inter_pem)
    (tmp_path / "ca.key").write_bytes(inter_key)
    ca = CertificateAuthority(tmp_path / "data", ca_cert=tmp_path / "ca.crt", ca_key=tmp_path / "ca.key")
    assert ca.bundle == inter_pem
    leaf, inter = c.load_pem_chain(ca.sign(_csr(), "orders"))
    assert c.cert_pem(inter) == inter_pem
    leaf.verify_directly_issued_by(inter)


def test_operator_ca_mistakes_are_clear(tmp_path: Path) -> None:
    root_pem, root_key = c.create_ca("corp")
    other_pem, _ = c.create_ca("corp")
    (tmp_path / "root.crt").write_bytes(root_pem)
    (tmp_path / "other.crt").write_bytes(other_pem)
    (tmp_path / "root.key").write_bytes(root_key)
    (tmp_path / "junk").write_bytes(b"junk")
    leaf_key = c.generate_key()
    leaf = c.issue(
        root_pem, root_key, c.make_csr(leaf_key, "x"), spiffe_id="spiffe://corp/x", lifetime=timedelta(1)
    )
    (tmp_path / "leaf.crt").write_bytes(leaf)
    (tmp_path / "leaf.key").write_bytes(c.key_pem(leaf_key))
    cases = [
        ("other.crt", "root.key", "does not match"),
        ("junk", "root.key", "not PEM"),
        ("root.crt", "junk", "key"),
        ("leaf.crt", "leaf.key", "not a CA"),
        ("missing.crt", "root.key", "cannot read"),
        ("other.crt", "other.crt", "key"),
    ]
    for cert, key, message in cases:
        with pytest.raises(CAError, match=message):
            CertificateAuthority(tmp_path / "data", ca_cert=tmp_path / cert, ca_key=tmp_path / key)
    with pytest.raises(CAError, match="both"):
        CertificateAuthority(tmp_path / "data", ca_cert=tmp_path / "root.crt")
    # a chain file whose certificates do not chain
    (tmp_path / "bad-chain.crt").write_bytes(root_pem + other_pem)
    with pytest.raises(CAError, match="not a chain"):
        CertificateAuthority(
            tmp_path / "data", ca_cert=tmp_path / "bad-chain.crt", ca_key=tmp_path / "root.key"
        )


def test_rotation_keeps_the_old_root_for_the_overlap(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority(tmp_path, clock=clock)
    old_root = ca.bundle
    old_leaf = ca.sign(_csr(), "orders")
    generation = ca.generation
    ca.rotate(timedelta(minutes=10))
    assert ca.generation == generation + 1
    new_root = (tmp_path / "ca.crt").read_bytes()
    assert new_root != old_root
    assert ca.bundle == new_root + old_root
    assert (tmp_path / "ca-bundle.crt").read_bytes() == new_root + old_root
    assert _mode(tmp_path / "ca.key") == 0o600
    new_leaf = ca.sign(_csr(), "orders")
    assert verify(new_leaf, new_root)  # signed by the new key
    with pytest.raises(VerificationError):
        verify(new_leaf, old_root)
    assert verify(old_leaf, ca.bundle)  # leaves of the old root still verify during the overlap
    assert ca.next_change() == pytest.approx(clock.now + 600, abs=1)
    # a restart during the overlap keeps both roots
    again = CertificateAuthority(tmp_path, clock=clock)
    assert again.bundle == new_root + old_root
    # once the overlap ends, only the new root is trusted
    clock.now += 601
    assert ca.bundle == new_root
    assert ca.write_bundle()
    assert (tmp_path / "ca-bundle.crt").read_bytes() == new_root
    assert ca.next_change() is None
    with pytest.raises(VerificationError):
        verify(old_leaf, ca.bundle)
    assert CertificateAuthority(tmp_path, clock=clock).bundle == new_root


def test_rotation_without_overlap_and_bad_overlaps(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    old = ca.bundle
    ca.rotate(0)
    assert old not in ca.bundle
    for bad in (-1, float("nan"), True, "1h"):
        with pytest.raises(ValueError):
            ca.rotate(bad)  # type: ignore[arg-type]


def test_server_credentials(tmp_path: Path) -> None:
    clock = Clock()
    ca = CertificateAuthority(tmp_path, trust_domain="prod.example", clock=clock)
    creds = ca.server_credentials(["control.example", "10.0.0.7", "0.0.0.0"])
    assert _mode(creds.key_file) == 0o600 and _mode(creds.cert_file) == 0o600
    assert creds.cert_file.read_bytes() == creds.cert_pem
    leaf = c.load_pem_chain(creds.cert_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "control.example"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    assert c.spiffe_id_of_pem(creds.cert_pem) == "spiffe://prod.example/control"
    assert c.service_of("spiffe://prod.example/control", "prod.example") is None  # not a workload
    assert c.load_key_pem(creds.key_pem).public_key() == leaf.public_key()
    # kept while young, also across restarts
    assert ca.server_credentials(["control.example"]) is creds
    assert CertificateAuthority(tmp_path, clock=clock).server_credentials().cert_pem == creds.cert_pem
    # a host it does not cover, half-life, or a rotation: a new certificate
    wider = ca.server_credentials(["other.example"])
    assert wider.cert_pem != creds.cert_pem
    assert "control.example" in str(c.load_pem_chain(wider.cert_pem)[0].extensions)
    clock.now = wider.renew_at + 1
    renewed = ca.server_credentials()
    assert renewed.cert_pem != wider.cert_pem  # (its dates follow the real clock, not this one)
    ca.rotate(60)
    rotated = ca.server_credentials()
    assert rotated.cert_pem != renewed.cert_pem
    c.load_pem_chain(rotated.cert_pem)[0].verify_directly_issued_by(c.load_pem_chain(ca.signer_pem)[0])


def test_workload_leaves_name_their_service_as_one_uri_and_one_dns_name(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path, trust_domain="prod.example")
    for service in ("orders", "Billing.v2"):
        leaf = c.load_pem_chain(ca.sign(_csr(), service))[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ca.spiffe_id(service)]
        assert san.get_values_for_type(x509.DNSName) == [c.service_dns_name(service)]
    # the control service's own certificate is not a workload: it carries no service name
    creds = ca.server_credentials()
    names = c.load_pem_chain(creds.cert_pem)[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert not any(n.endswith(c.SERVICE_DNS_SUFFIX) for n in names.value.get_values_for_type(x509.DNSName))
