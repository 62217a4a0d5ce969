"""A throwaway PKI for the local cluster: CA, serving and client certs, service-account keys.

Written once per cluster directory and reused; nothing here is meant for production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Identity:
    """A client certificate subject: CN is the user, O the groups."""

    file: str
    common_name: str
    organization: str | None = None


#: The real node's name (the kubelet's client certificate is bound to it).
NODE_NAME = "ptm-node"

#: Client identities the control plane components use (names from Kubernetes' bootstrap RBAC).
CLIENTS = (
    Identity("admin", "ptm-admin", "system:masters"),
    Identity("controller-manager", "system:kube-controller-manager"),
    Identity("scheduler", "system:kube-scheduler"),
    Identity("kwok", "ptm-kwok", "system:masters"),
    Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
    # The real node (devcluster --real-node): the Node authorizer knows kubelets by this name.
    Identity("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
    Identity("kube-proxy", "system:kube-proxy"),
)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    *,
    server_names: tuple[str, ...] = (),
    client: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    if server_names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def ensure_pki(directory: Path, service_ip: str) -> None:
    """Create the CA and every cert under `directory` unless they already exist."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "done").exists():
        _issue_missing_clients(directory)
        return
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ptm-devcluster-ca"))
        .issuer_name(_name("ptm-devcluster-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    _write_cert(directory / "ca.crt", ca_cert)

    serving_names = (
        "127.0.0.1",
        "localhost",
        service_ip,
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    )
    cert, key = _issue(ca_cert, ca_key, _name("kube-apiserver"), server_names=serving_names, client=False)
    _write_cert(directory / "apiserver.crt", cert)
    _write_key(directory / "apiserver.key", key)
    _issue_clients(directory, ca_cert, ca_key)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(directory / "sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (directory / "done").write_text("ok\n")


def _issue_clients(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    for ident in CLIENTS:
        if (directory / f"{ident.file}.crt").exists():
            continue
        cert, key = _issue(ca_cert, ca_key, _name(ident.common_name, ident.organization))
        _write_key(directory / f"{ident.file}.key", key)
        _write_cert(directory / f"{ident.file}.crt", cert)  # last: a cert on disk has its key


def _issue_missing_clients(directory: Path) -> None:
    """A PKI made before an identity was added gets it, signed by the same CA."""
    if all((directory / f"{ident.file}.crt").exists() for ident in CLIENTS):
        return
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{directory / 'ca.key'} is not the EC key ensure_pki writes")
    _issue_clients(directory, ca_cert, ca_key)
