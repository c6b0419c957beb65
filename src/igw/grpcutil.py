"""Small gRPC helpers shared by the servers: binding ports, and TLS for the ext_proc port.

TLS follows the reference EPP: with ``--secure-serving`` the ext_proc port speaks TLS (ALPN h2,
grpc's default), with the ``tls.crt``/``tls.key`` of ``--cert-path`` when given (re-read when they
change, with ``--enable-cert-reload``), else with a self-signed certificate made at start-up.
Gateways then connect with TLS and skip verification, as they do with the reference EPP.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger("igw.grpc")


def bind_port(
    server: grpc.aio.Server, host: str, port: int, *, what: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind a grpc.aio server; grpc's RuntimeError becomes an OSError that names the port."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind the {what} port {host}:{port} (in use?)")
    return int(bound)


def self_signed_certificate(hosts: list[str] | None = None) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM): an ECDSA P-256 certificate valid for ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts or ["localhost", "127.0.0.1", "::1"]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "igw"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "igw endpoint picker")])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def server_credentials(cert_path: str | None, *, reload: bool = False) -> grpc.ServerCredentials:
    """TLS credentials from ``cert_path`` (a directory with ``tls.crt`` and ``tls.key``), or
    self-signed ones when ``cert_path`` is None. ``reload``: pick up new files for new connections."""
    if cert_path is None:
        key, cert = self_signed_certificate()
        log.info("ext_proc TLS: self-signed certificate (give --cert-path for your own)")
        return grpc.ssl_server_credentials([(key, cert)])
    directory = Path(cert_path)
    key, cert = _read_pair(directory)
    if not reload:
        return grpc.ssl_server_credentials([(key, cert)])
    stamp = _stamp(directory)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal stamp
        now = _stamp(directory)
        if now == stamp:
            return None
        try:
            new_key, new_cert = _read_pair(directory)
        except OSError as exc:
            log.warning("ext_proc TLS: cannot re-read the certificate in %s: %s", directory, exc)
            return None
        stamp = now
        log.info("ext_proc TLS: certificate in %s reloaded", directory)
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)])

    initial = grpc.ssl_server_certificate_configuration([(key, cert)])
    return grpc.dynamic_ssl_server_credentials(initial, fetch)  # type: ignore[arg-type]  # None = unchanged (grpc docs)


def _read_pair(directory: Path) -> tuple[bytes, bytes]:
    try:
        return (directory / "tls.key").read_bytes(), (directory / "tls.crt").read_bytes()
    except OSError as exc:
        raise OSError(f"--cert-path {directory}: cannot read tls.crt and tls.key ({exc.strerror})") from None


def _stamp(directory: Path) -> tuple[float, float]:
    try:
        return os.stat(directory / "tls.crt").st_mtime, os.stat(directory / "tls.key").st_mtime
    except OSError:
        return (0.0, 0.0)
