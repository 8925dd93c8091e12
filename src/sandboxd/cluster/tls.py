"""Optional mutual TLS inside a cluster: API replica → node and node → node (build fetches).

The cluster secret stays the default and stays required: mTLS adds encryption and a certificate
each side must show. ``SANDBOXD_CLUSTER_TLS_DIR`` on every machine names a directory holding the
cluster's CA (``ca.pem``) and this machine's certificate and key (``cert.pem``, ``key.pem``,
signed by that CA, usable as server and as client). A node then serves HTTPS and accepts only
clients with a certificate from the CA; API replicas and nodes dial nodes over HTTPS with their
own certificate and verify the node's against the CA (its address must be among the
certificate's names). ``sandboxd cluster certs`` makes the CA once and a directory per machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandboxd.config import Settings
from sandboxd.tls import _key_pem, _now, _write_private, ensure_ca

MACHINE_DAYS = 825


class ClusterTlsError(ValueError):
    pass


@dataclass(frozen=True)
class ClusterTls:
    """One machine's side of the cluster's mTLS."""

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """For dialing a node: its certificate checked against the cluster CA, ours shown."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    @staticmethod
    def verify(tls: ClusterTls | None) -> ssl.SSLContext | bool:
        """httpx's ``verify`` for dialing a node: the mTLS context, or plain defaults."""
        return tls.client_context() if tls is not None else True

    def server_options(self) -> dict[str, Any]:
        """uvicorn's settings for a node: HTTPS, and a client certificate from the CA required."""
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key), "ssl_ca_certs": str(self.ca),
                "ssl_cert_reqs": ssl.CERT_REQUIRED}


def cluster_tls(settings: Settings) -> ClusterTls | None:
    """This machine's mTLS files (``cluster_tls_dir``), checked; None: the secret alone."""
    d = settings.cluster_tls_dir
    if d is None:
        return None
    tls = ClusterTls(d / "ca.pem", d / "cert.pem", d / "key.pem")
    for path in (tls.ca, tls.cert, tls.key):
        if not path.is_file():
            raise ClusterTlsError(f"SANDBOXD_CLUSTER_TLS_DIR {d}: {path.name} is missing "
                                  "(make it with `sandboxd cluster certs`)")
    try:
        tls.client_context()
    except (ssl.SSLError, OSError) as exc:
        raise ClusterTlsError(f"SANDBOXD_CLUSTER_TLS_DIR {d}: {exc}") from exc
    return tls


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_machine_certs(out: Path, machine: str, names: list[str]) -> Path:
    """``out/<machine>/`` with ``ca.pem``, ``cert.pem`` and ``key.pem``: a certificate for the
    addresses and host names in ``names`` (a node's: the address the API reaches it at), for
    server and client use, signed by the cluster CA in ``out`` (made on first use, then kept).
    Copy the directory to the machine and point ``SANDBOXD_CLUSTER_TLS_DIR`` at it."""
    if not names:
        raise ClusterTlsError("a machine's certificate needs at least one address or host name")
    ca_cert, ca_key = ensure_ca(out, "sandboxd cluster CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=MACHINE_DAYS))
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d = out / machine
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _write_private(d / "key.pem", _key_pem(key))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "ca.pem").write_bytes((out / "ca.pem").read_bytes())
    return d
