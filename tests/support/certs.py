"""Throw-away certificates for TLS tests, made with ``cryptography`` in a temporary directory (never
committed: SERVICES.md).

    ca = make_ca(tmp_path, "test-ca")
    cert, key = ca.issue(tmp_path / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
    client_cert, client_key = ca.issue(tmp_path / "client", cn="device-7", uris=("spiffe://example/d7",), client=True)
    ssl_ctx = ssl.create_default_context(cafile=ca.cert_path)

Keys are EC P-256 (fast to generate). Every certificate gets a fresh random serial, which a test can read
back (``serial_of``) to tell two certificates for the same name apart.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=2)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority whose certificate is ``cert_path`` (PEM)."""

    name: str
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def issue(
        self,
        path_prefix: Path | str,
        *,
        cn: str,
        dns: Sequence[str] = (),
        uris: Sequence[str] = (),
        ips: Sequence[str] = (),
        client: bool = False,
    ) -> tuple[Path, Path]:
        """A leaf certificate signed by this CA, written to ``<path_prefix>.crt`` and ``<path_prefix>.key``
        (PEM; overwritten if they exist). ``client``: for TLS client authentication instead of a server.
        Returns (cert_path, key_path)."""
        prefix = Path(path_prefix)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path


def make_ca(directory: Path | str, name: str = "mediator-test-ca") -> CA:
    """A new CA written to ``<directory>/<name>.crt`` and ``.key``."""
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
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
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = base / f"{name}.crt", base / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return CA(name, cert_path, key_path, cert, key)


def serial_of(cert: bytes | Path) -> int:
    """The serial number of a certificate given as DER bytes (``SSLObject.getpeercert(binary_form=True)``)
    or as a PEM file."""
    if isinstance(cert, Path):
        return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    return x509.load_der_x509_certificate(cert).serial_number


@dataclass(frozen=True, slots=True)
class CertFiles:
    """PEM files on disk: a CA certificate, and a leaf certificate with its key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """A CA with a server certificate for loopback brokers and a client certificate."""

    ca_file: Path
    server: CertFiles
    client: CertFiles


def make_pki(directory: Path, ca_name: str = "mediator test CA", client_name: str = "device-1") -> Pki:
    """A CA and two leaves it signs: ``server`` (SANs 127.0.0.1, localhost and broker.test) and ``client``
    (common name ``client_name``, clientAuth). Keys are world-readable here: a broker the test starts may
    run as its own user and must read them."""
    ca = make_ca(directory, ca_name.replace(" ", "-"))
    server = ca.issue(directory / "server", cn="broker.test", dns=("localhost", "broker.test"), ips=("127.0.0.1",))
    client = ca.issue(directory / "client", cn=client_name, client=True)
    for _, key in (server, client):
        key.chmod(0o644)
    return Pki(ca.cert_path, CertFiles(ca.cert_path, *server), CertFiles(ca.cert_path, *client))
