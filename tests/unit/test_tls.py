"""The domain mode's certificates: a local CA made once, a wildcard certificate from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from sandboxd.tls import tls_files, trust_instructions


def _names(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def test_the_local_ca_is_made_once_and_signs_a_wildcard_certificate(tmp_path: Path) -> None:
    files = tls_files(tmp_path, "sbx.example", None, None)
    assert files.ca is not None and _names(files.cert) == {"sbx.example", "*.sbx.example"}
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(ca)
    assert (files.key.stat().st_mode & 0o777) == 0o600 and ((tmp_path / "tls" / "ca.key").stat().st_mode & 0o777) == 0o600
    assert f"SSL_CERT_FILE={files.ca}" in trust_instructions(files)

    same = tls_files(tmp_path, "sbx.example", None, None)
    assert same.cert.read_bytes() == files.cert.read_bytes()  # kept, not made again
    other = tls_files(tmp_path, "other.example", None, None)
    assert _names(other.cert) == {"other.example", "*.other.example"}
    assert other.ca.read_bytes() == files.ca.read_bytes()  # the CA users trust stays the same


def test_an_operator_certificate_is_used_as_given_and_needs_its_key(tmp_path: Path) -> None:
    made = tls_files(tmp_path / "made", "sbx.example", None, None)
    given = tls_files(tmp_path, "sbx.example", made.cert, made.key)
    assert (given.cert, given.key, given.ca) == (made.cert, made.key, None)
    assert trust_instructions(given) == ""
    with pytest.raises(ValueError, match="go together"):
        tls_files(tmp_path, "sbx.example", made.cert, None)
    with pytest.raises(ValueError, match="no such file"):
        tls_files(tmp_path, "sbx.example", made.cert, tmp_path / "missing.key")


def test_serve_refuses_a_certificate_without_a_domain(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sandboxd.cli import main

    made = tls_files(tmp_path / "made", "sbx.example", None, None)
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "data"),
                                       "--tls-cert", str(made.cert), "--tls-key", str(made.key)])
    assert result.exit_code == 2 and "need --domain" in result.output
