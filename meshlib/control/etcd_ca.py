"""One CA for every control service replica on an etcd store (docs/security.md, "Replicas").

Without `--ca-cert/--ca-key`, the CA lives in etcd: `security/ca` holds its material (root,
key, previous roots with the end of their overlap) and the trust domain. The first replica
to start on the prefix offers one by a create-if-absent transaction (the CA already in its
data dir, if it has one, so a single service moved onto etcd keeps its identities; else a new
root); every other replica takes what is stored. Nothing of it is written to a replica's data
dir but the bundle (and the replica's own TLS certificate).

A rotation on any replica is a compare-and-set on the key's mod revision: the new root is
computed from the material stored, written only if nobody rotated since (else computed again
on top of the newer one), and installed. The other replicas install it when their security
watch brings it, and push the new bundle to their subscribers (`on_change`).

With `--ca-cert/--ca-key` nothing of the CA is in etcd: every replica is given the same files.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from meshlib.control.etcd_client import EtcdIndeterminate, KeyValue, compare_mod, put_op
from meshlib.control.etcd_security import SharedSecurity
from meshlib.control.etcd_watch import WatchEvent
from meshlib.security.ca import CA_KEY_FILE, CAError, CAMaterial, CertificateAuthority

log = logging.getLogger("meshlib.security")

ROTATE_ATTEMPTS = 5


class SharedCA:
    """The CA of a store prefix: `ca` signs, `rotate` rotates it for every replica."""

    def __init__(self, shared: SharedSecurity, data_dir: str | Path, *, trust_domain: str) -> None:
        self.key = shared.key("ca")
        self.trust_domain = trust_domain
        self.on_change: Callable[[], None] | None = None
        """Called on the event loop when another replica's rotation was installed."""
        self._client = shared.client
        self._lock = threading.Lock()  # rotations run in a thread, the watch on the loop
        loaded = shared.load(self.key)
        stored = loaded[0] if loaded else None
        if stored is None:
            stored = self._offer(shared, Path(data_dir))
        self._revision = stored.mod_revision
        self.ca = CertificateAuthority(data_dir, trust_domain=trust_domain, material=self._material(stored))
        shared.attach(self)

    def _offer(self, shared: SharedSecurity, data_dir: Path) -> KeyValue:
        if (data_dir / CA_KEY_FILE).exists():  # a single service's own CA, moved onto etcd
            material = CertificateAuthority(data_dir, trust_domain=self.trust_domain).material()
            log.info("CA: offering the CA of %s to the replicas", data_dir)
        else:
            material = CAMaterial.create(self.trust_domain)
        return shared.create(self.key, self._value(material))

    def rotate(self, overlap: timedelta | float) -> None:
        """Rotate the stored CA (compare-and-set, again on top of a concurrent rotation) and
        install the result here. CAError if etcd keeps changing under it."""
        landed: CAMaterial | None = None  # an attempt whose answer was lost
        for _ in range(ROTATE_ATTEMPTS):
            kv = self._client.get(self.key)
            if kv is None:
                raise CAError("the shared CA is missing from etcd")
            current = self._material(kv)
            if landed is not None and current.cert_pem == landed.cert_pem:
                self._install(current, kv.mod_revision)
                return
            new = self.ca.rotated(current, overlap)
            try:
                result = self._client.txn(
                    [compare_mod(self.key, kv.mod_revision)], [put_op(self.key, self._value(new))]
                )
            except EtcdIndeterminate:
                landed = new
                continue
            if result.succeeded:
                self._install(new, result.revision)
                log.info("CA rotated for every replica")
                return
        raise CAError("the shared CA kept changing during the rotation; try again")

    # -- following etcd -----------------------------------------------------------------------

    def reload(self, kvs: list[KeyValue]) -> None:
        for kv in kvs:
            self._take(kv)

    def apply(self, event: WatchEvent) -> None:
        if event.kind == "put":
            self._take(event.kv)
        else:
            log.warning("security: the shared CA was deleted from etcd; signing with the one held")

    def _take(self, kv: KeyValue) -> None:
        if kv.mod_revision <= self._revision:
            return
        try:
            material = self._material(kv)
        except (CAError, ValueError) as exc:
            log.warning("security: ignoring the CA in etcd: %s", exc)
            return
        if self._install(material, kv.mod_revision) and self.on_change is not None:
            self.on_change()

    def _install(self, material: CAMaterial, revision: int) -> bool:
        with self._lock:
            if revision <= self._revision:
                return False
            self._revision = revision
            return self.ca.adopt(material)

    # -- encoding -----------------------------------------------------------------------------

    def _value(self, material: CAMaterial) -> bytes:
        return json.dumps({"trust_domain": self.trust_domain, **material.to_json()}).encode()

    def _material(self, kv: KeyValue) -> CAMaterial:
        try:
            data = json.loads(kv.value)
        except ValueError:
            raise CAError("the shared CA in etcd is not JSON") from None
        domain = data.get("trust_domain") if isinstance(data, dict) else None
        if domain != self.trust_domain:
            raise CAError(
                f"the CA in etcd is for trust domain {str(domain)[:100]!r}, not {self.trust_domain!r}: "
                "every replica must use the same --trust-domain"
            )
        return CAMaterial.from_json(data)
