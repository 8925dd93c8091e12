"""A sandbox's own egress CA: what the egress proxy signs its certificates with when it
terminates TLS for a host the sandbox's ``network.rules`` transform, and what the sandbox trusts.

Made the first time a sandbox has rules (at create, or by ``update_network``) and kept in its
directory (``egress-ca.pem``, ``egress-ca.key`` 0600) for its whole life, so a restarted server
signs with the CA the sandbox already trusts. One CA per sandbox: its key signs nothing another
sandbox trusts. The certificate goes into the sandbox's trust store (:data:`TRUST_ENV` says where
clients find it); the key never leaves the host.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandboxd.tls import _key_pem, _write_private

CA_FILE, KEY_FILE, TRUSTED_MARK = "egress-ca.pem", "egress-ca.key", "egress-ca.trusted"
#: In the sandbox: the system bundle the CA is appended to, and the CA alone (Node adds it to its own)
GUEST_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_CA = "/etc/sandboxd/egress-ca.pem"
#: What OpenSSL, Python ``requests``, curl and Node read for their trust (set for every process)
TRUST_ENV = {"SSL_CERT_FILE": GUEST_BUNDLE, "REQUESTS_CA_BUNDLE": GUEST_BUNDLE, "CURL_CA_BUNDLE": GUEST_BUNDLE,
             "NODE_EXTRA_CA_CERTS": GUEST_CA}
CA_DAYS, LEAF_DAYS = 3650, 30


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class SandboxCA:
    """One sandbox's CA and the server-side TLS contexts made from it, one per host name."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert, self._key = cert, key
        self.pem = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, tuple[datetime.datetime, ssl.SSLContext]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, sandbox_dir: Path) -> SandboxCA | None:
        """The sandbox's CA, if it has one."""
        cert_path, key_path = sandbox_dir / CA_FILE, sandbox_dir / KEY_FILE
        if not (cert_path.exists() and key_path.exists()):
            return None
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)

    @classmethod
    def ensure(cls, sandbox_dir: Path, sandbox_id: str) -> SandboxCA:
        """The sandbox's CA, made now if it has none."""
        if (ca := cls.load(sandbox_dir)) is not None:
            return ca
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sandboxd egress CA {sandbox_id}"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandboxd")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(sandbox_dir / KEY_FILE, _key_pem(key))
        (sandbox_dir / CA_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for ``host`` signed by this CA (made on
        first use, made again near its end); HTTP/1.1 only, the one protocol the proxy parses."""
        with self._lock:
            cached = self._contexts.get(host)
            if cached is not None and cached[0] - datetime.timedelta(days=1) > _now():
                return cached[1]
            now = _now()
            end = now + datetime.timedelta(days=LEAF_DAYS)
            leaf = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                    .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(end)
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                   critical=False)
                    .sign(self._key, hashes.SHA256()))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.set_alpn_protocols(["http/1.1"])
            fd, path = tempfile.mkstemp(prefix="sandboxd-leaf-")  # load_cert_chain reads files only
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(leaf.public_bytes(serialization.Encoding.PEM) + _key_pem(self._leaf_key))
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
            self._contexts[host] = (end, ctx)
            return ctx
