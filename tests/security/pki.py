"""A throwaway certificate authority made at test time: CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# EC keys: made in microseconds, where RSA keys would take a good part of a second each.
_CURVE = ec.SECP256R1()


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA whose certificate is at `cert`; it issues server and client certificates."""

    name: str
    folder: Path
    cert: Path
    _key: ec.EllipticCurvePrivateKey
    _certificate: x509.Certificate

    @classmethod
    def create(cls, folder: Path, name: str) -> Authority:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(_CURVE)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        certificate = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        path = folder / f"{name}-ca.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(name, folder, path, key, certificate)

    def issue_server(self, label: str, names: tuple[str, ...] = ("localhost",)) -> Issued:
        """A server certificate for DNS `names` and the loopback addresses."""
        addresses = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        alternatives = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses]
        return self._issue(label, alternatives, ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_client(self, label: str) -> Issued:
        return self._issue(label, [x509.DNSName(label)], ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(self, label: str, alternatives: list, usage: x509.ObjectIdentifier) -> Issued:
        key = ec.generate_private_key(_CURVE)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        certificate = (
            _builder(subject, self._certificate.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.folder / f"{self.name}-{label}.pem"
        key_path = self.folder / f"{self.name}-{label}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return Issued(cert_path, key_path)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: object) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
