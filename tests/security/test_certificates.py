"""The pure certificate functions: SPIFFE ids, CSRs, roots and leaves."""

from __future__ import annotations

import datetime as dt
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.security import certificates as c

HOUR = timedelta(hours=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_spiffe_ids_round_trip() -> None:
    assert c.DEFAULT_TRUST_DOMAIN == "mesh.local"
    sid = c.spiffe_id("mesh.local", "orders")
    assert sid == "spiffe://mesh.local/svc/orders"
    assert c.service_of(sid, "mesh.local") == "orders"
    assert c.service_of(sid, "other.local") is None
    for bad in ("spiffe://mesh.local/orders", "spiffe://mesh.local/svc/", "spiffe://mesh.local/svc/a/b", ""):
        assert c.service_of(bad, "mesh.local") is None, bad
    assert c.service_of("spiffe://mesh.local.evil/svc/orders", "mesh.local") is None
    for service in ("", "a/b", "a b"):
        with pytest.raises(ValueError):
            c.spiffe_id("mesh.local", service)
    with pytest.raises(ValueError):
        c.spiffe_id("a/b", "orders")


def test_key_and_csr() -> None:
    key = c.generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(c.make_csr(key, "orders"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "orders"
    assert csr.public_key() == key.public_key()
    pem = c.key_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert c.load_key_pem(pem).public_key() == key.public_key()


def test_create_ca_is_a_self_signed_root() -> None:
    cert_pem, key_pem = c.create_ca("mesh.local", lifetime=timedelta(days=2))
    (root,) = c.load_pem_chain(cert_pem)
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert timedelta(days=1) < root.not_valid_after_utc - _now() <= timedelta(days=2)
    assert c.load_key_pem(key_pem).public_key() == root.public_key()
    # two roots never share a subject (rotation puts both in one bundle)
    other, _ = c.create_ca("mesh.local")
    assert c.load_pem_chain(other)[0].subject != root.subject
    # an existing key can be reused
    key = c.generate_key()
    again, again_key = c.create_ca("mesh.local", key=key)
    assert c.load_pem_chain(again)[0].public_key() == key.public_key()
    assert again_key == c.key_pem(key)


def test_issue_a_leaf() -> None:
    ca_pem, ca_key = c.create_ca("mesh.local")
    key = c.generate_key()
    sid = c.spiffe_id("mesh.local", "orders")
    before = _now()
    leaf_pem = c.issue(
        ca_pem, ca_key, c.make_csr(key, "orders"), spiffe_id=sid, dns_names=["orders.local"], lifetime=HOUR
    )
    (leaf,) = c.load_pem_chain(leaf_pem)
    leaf.verify_directly_issued_by(c.load_pem_chain(ca_pem)[0])
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid]
    assert san.get_values_for_type(x509.DNSName) == ["orders.local"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    skew = before - leaf.not_valid_before_utc
    assert timedelta(seconds=28) <= skew <= timedelta(seconds=32)
    life = leaf.not_valid_after_utc - before
    assert timedelta(minutes=59) <= life <= timedelta(minutes=60, seconds=1)
    assert c.spiffe_ids_of(leaf) == [sid]
    assert c.spiffe_id_of_pem(leaf_pem) == sid
    assert c.spiffe_id_of_pem(leaf_pem.decode()) == sid
    assert c.spiffe_id_of_der(leaf.public_bytes(serialization.Encoding.DER)) == sid
    assert c.cert_pem(leaf) == leaf_pem


def test_issue_trusts_only_the_csr_public_key() -> None:
    """The SANs a CSR asks for are ignored: the identity comes from the caller."""
    ca_pem, ca_key = c.create_ca("mesh.local")
    key = c.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://mesh.local/svc/payments")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    leaf = c.issue(ca_pem, ca_key, csr, spiffe_id=c.spiffe_id("mesh.local", "orders"), lifetime=HOUR)
    assert c.spiffe_id_of_pem(leaf) == "spiffe://mesh.local/svc/orders"


def _tampered_csr() -> bytes:
    """A CSR whose public key is not the one that signed it."""
    csr = x509.load_pem_x509_csr(c.make_csr(c.generate_key(), "orders"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # flip a bit in the signature (the last bytes of the DER)
    der[-3] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def test_issue_refuses_bad_csrs() -> None:
    ca_pem, ca_key = c.create_ca("mesh.local")
    sid = c.spiffe_id("mesh.local", "orders")
    with pytest.raises(ValueError, match="signature is invalid"):
        c.issue(ca_pem, ca_key, _tampered_csr(), spiffe_id=sid, lifetime=HOUR)
    for junk in (
        b"",
        b"hello",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ):
        with pytest.raises(ValueError, match="not a PEM certificate signing request"):
            c.issue(ca_pem, ca_key, junk, spiffe_id=sid, lifetime=HOUR)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048"):
        c.issue(ca_pem, ca_key, c.make_csr(weak, "orders"), spiffe_id=sid, lifetime=HOUR)
    odd = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ValueError, match="unsupported curve"):
        c.issue(ca_pem, ca_key, c.make_csr(odd, "orders"), spiffe_id=sid, lifetime=HOUR)
    with pytest.raises(ValueError, match="positive"):
        c.issue(ca_pem, ca_key, c.make_csr(c.generate_key(), "o"), spiffe_id=sid, lifetime=timedelta(0))


def test_a_leaf_never_outlives_its_ca() -> None:
    ca_pem, ca_key = c.create_ca("mesh.local", lifetime=HOUR)
    sid = c.spiffe_id("mesh.local", "orders")
    leaf = c.load_pem_chain(
        c.issue(ca_pem, ca_key, c.make_csr(c.generate_key(), "o"), spiffe_id=sid, lifetime=timedelta(days=5))
    )[0]
    assert leaf.not_valid_after_utc <= c.load_pem_chain(ca_pem)[0].not_valid_after_utc


def test_spiffe_id_of_needs_exactly_one() -> None:
    ca_pem, ca_key = c.create_ca("mesh.local")
    ca = c.load_pem_chain(ca_pem)[0]
    key = c.load_key_pem(ca_key)
    leaf_key = c.generate_key()

    def leaf(uris: list[str]) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(ca.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - HOUR)
            .not_valid_after(_now() + HOUR)
        )
        if uris:
            names = [x509.UniformResourceIdentifier(u) for u in uris]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return c.cert_pem(builder.sign(key, hashes.SHA256()))  # type: ignore[arg-type]

    assert c.spiffe_id_of_pem(leaf([])) is None
    assert c.spiffe_id_of_pem(leaf(["https://example.com/"])) is None
    two = leaf(["spiffe://mesh.local/svc/a", "spiffe://mesh.local/svc/b"])
    assert c.spiffe_id_of_pem(two) is None
    assert c.spiffe_ids_of(c.load_pem_chain(two)[0]) == [
        "spiffe://mesh.local/svc/a",
        "spiffe://mesh.local/svc/b",
    ]
    assert (
        c.spiffe_id_of_pem(leaf(["https://x/", "spiffe://mesh.local/svc/a"])) == "spiffe://mesh.local/svc/a"
    )
    assert c.spiffe_id_of_pem(b"junk") is None
    assert c.spiffe_id_of_der(b"junk") is None


def test_load_pem_chain_keeps_order() -> None:
    a, _ = c.create_ca("mesh.local")
    b, _ = c.create_ca("mesh.local")
    chain = c.load_pem_chain(a + b)
    assert [c.cert_pem(x) for x in chain] == [a, b]
    with pytest.raises(ValueError):
        c.load_pem_chain(b"no certificates here")


def test_service_dns_names_cannot_collide_under_a_case_insensitive_wildcard_match() -> None:
    names = {s: c.service_dns_name(s) for s in ("orders", "Orders", "*", "a.orders", "h-1", "é")}
    assert len(set(names.values())) == len(names)
    assert names["orders"] == "orders.svc.meshlib.invalid"
    for service in ("Orders", "*", "a.orders", "é"):  # hashed one level down, lowercase, no '*'
        label, rest = names[service].split(".", 1)
        assert rest == "hash.svc.meshlib.invalid" and label == label.lower() and label.isalnum()
