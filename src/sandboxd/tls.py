"""TLS for the domain mode: the operator's certificate, or one from a CA sandboxd makes once.

SDKs that cannot be pointed at a plain-HTTP URL (Python ``e2b`` 1.x and 2.0, JS 2.0, other
languages, browsers) reach ``https://api.<domain>`` and ``https://<port>-<id>.<domain>``. Without
a certificate from the operator, sandboxd makes a CA in ``<data dir>/tls/`` (kept: users trust it
once) and from it a certificate for ``<domain>`` and ``*.<domain>``, made again when the domain
changes or it nears its end.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_DAYS = 3650
CERT_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None  # the CA to trust, when sandboxd made it


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_ca(tls_dir: Path, common_name: str = "sandboxd local CA") -> tuple[x509.Certificate,
                                                                              ec.EllipticCurvePrivateKey]:
    """The local CA (or a cluster's: ``cluster/tls.py``): made on first use, then kept (users
    have been told to trust it)."""
    cert_path, key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    tls_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandboxd")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)}


def ensure_server_cert(tls_dir: Path, domain: str) -> TlsFiles:
    """A certificate for ``domain`` and ``*.domain`` signed by the local CA (made if missing,
    made again for another domain or near its end)."""
    ca_cert, ca_key = ensure_ca(tls_dir)
    cert_path, key_path = tls_dir / "server.pem", tls_dir / "server.key"
    wanted = {domain, f"*.{domain}"}
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if _names_of(cert) == wanted and cert.not_valid_after_utc - RENEW_BEFORE > _now():
            return TlsFiles(cert_path, key_path, tls_dir / "ca.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alt: list[x509.GeneralName] = [x509.DNSName(domain), x509.DNSName(f"*.{domain}")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(cert_path, key_path, tls_dir / "ca.pem")


def tls_files(data_dir: Path, domain: str, cert: Path | None, key: Path | None) -> TlsFiles:
    """The operator's certificate and key if given (both or neither), else the local CA's."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both, or neither for a local CA")
    if cert is not None and key is not None:
        for p in (cert, key):
            if not p.is_file():
                raise ValueError(f"{p}: no such file")
        return TlsFiles(cert, key, None)
    return ensure_server_cert(data_dir / "tls", domain)


def trust_instructions(files: TlsFiles) -> str:
    """What to tell users of a local CA: the SDKs verify certificates, so they must trust it."""
    if files.ca is None:
        return ""
    return ("  The certificate is signed by sandboxd's own CA. Trust it where the SDK runs:\n\n"
            f"    export SSL_CERT_FILE={files.ca}          # Python SDK (and curl, openssl)\n"
            f"    export NODE_EXTRA_CA_CERTS={files.ca}    # JS SDK and the e2b CLI\n\n"
            f"  or system-wide: cp {files.ca} /usr/local/share/ca-certificates/sandboxd.crt && "
            "update-ca-certificates\n")
