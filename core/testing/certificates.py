"""Test certificates: a private CA and certificates it signs for 127.0.0.1.

``write_ca(folder, "ca")`` writes ``ca.crt``/``ca.key``; ``ca.issue(folder,
"pacs")`` writes ``pacs.crt``/``pacs.key``, a certificate for 127.0.0.1 (an
IP SAN, as Python's host name check wants) usable as both a TLS server and a
TLS client certificate. Needs the ``cryptography`` package (a test extra).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["CertificateAuthority", "TlsFiles", "write_ca"]


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    files: TlsFiles
    _certificate: Any
    _key: Any

    @property
    def cert(self) -> Path:
        return self.files.cert

    def issue(self, folder: Path, name: str, host: str = "127.0.0.1") -> TlsFiles:
        """A server-and-client certificate for ``host`` signed by this CA."""
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = _new_key()
        builder = (
            _builder(name, key, self._certificate.subject)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_key_usage(ca=False), True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        return _write(folder, name, _sign(builder, self._key), key)


def write_ca(folder: Path, name: str = "ca") -> CertificateAuthority:
    """A self-signed CA (``<name>.crt``, ``<name>.key`` in ``folder``)."""
    from cryptography import x509

    key = _new_key()
    builder = (
        _builder(name, key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(_key_usage(ca=True), True)
    )
    certificate = _sign(builder, key)
    return CertificateAuthority(_write(folder, name, certificate, key), certificate, key)


def _new_key() -> Any:
    # RSA: every DICOM TLS profile DCMTK (Orthanc) offers has RSA suites
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder(name: str, key: Any, issuer: Any) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dqr test {name}")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _key_usage(ca: bool) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not ca,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _sign(builder: Any, key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    return builder.sign(key, hashes.SHA256())


def _write(folder: Path, name: str, certificate: Any, key: Any) -> TlsFiles:
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / f"{name}.crt", folder / f"{name}.key")
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files
