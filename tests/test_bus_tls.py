"""Connecting to a NATS that runs with TLS (as it must outside a laptop): with the CA the
connection works, without it the client refuses the server."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal.kernel.bus import connect, ensure_buckets
from shoal.kernel.config import BusSettings, generate_credentials
from shoal.kernel.natsd import EmbeddedNats, TlsFiles


def _write_ca_and_server(directory: Path) -> tuple[Path, TlsFiles]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test nats ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files = TlsFiles(cert_file=directory / "server.pem", key_file=directory / "server.key")
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_path, files


async def test_tls_bus_with_and_without_the_ca(tmp_path: Path) -> None:
    ca_path, files = _write_ca_and_server(tmp_path)
    server = EmbeddedNats(state_dir=tmp_path / "state", credentials=generate_credentials(),
                          tls=files)
    url = server.start()
    try:
        assert url.startswith("tls://")
        creds = server.credentials["operator"]
        good = BusSettings(url=url, user=creds.user, password=creds.password,
                           tls_ca=str(ca_path), role="operator")
        nc = await connect(good, "test-tls", allow_reconnect=False)
        try:
            buckets = await ensure_buckets(nc.jetstream())
            assert len(buckets) == 4
        finally:
            await nc.close()
        untrusted = BusSettings(url=url, user=creds.user, password=creds.password,
                                role="operator")  # system CAs only: our CA is unknown
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await connect(untrusted, "test-tls-untrusted", allow_reconnect=False)
    finally:
        server.stop()
