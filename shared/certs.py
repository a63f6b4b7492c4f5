"""`clipmesh certs`: a farm's CA and its certificates, for TLS with mutual authentication.

    clipmesh certs --out certs --hosts coord.farm,10.0.0.5 --workers gpu-1,gpu-2 --clients alice

writes ca.pem (give it to every side as --tls-ca), ca-key.pem (keep it offline: it makes new
identities), and a certificate with its key per identity: coordinator.pem (its names and
addresses in the subject alternative names), worker-ID.pem, client-NAME.pem, admin-NAME.pem.
The common name carries the role and the name ("worker/gpu-1"): that is what the coordinator
reads (coordinator/access.py). EC P-256 keys.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(folder: Path, stem: str, key, cert: x509.Certificate) -> list[Path]:
    key_path, cert_path = folder / f"{stem}-key.pem", folder / f"{stem}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path]


def _certificate(subject: str, issuer: x509.Name, signing_key, public_key, days: int, ca: bool = False,
                 hosts: list[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_farm(out: Path, hosts: list[str], workers=(), clients=(), admins=(), days: int = 365) -> list[Path]:
    """The CA, the coordinator's certificate for `hosts`, and one per worker, client and admin."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clipmesh farm CA")])
    ca = _certificate("clipmesh farm CA", ca_name, ca_key, ca_key.public_key(), days, ca=True)
    written = _write(out, "ca", ca_key, ca)
    identities = [("coordinator", "coordinator/coordinator", list(hosts))]
    identities += [(f"{role}-{name}", f"{role}/{name}", []) for role, names in
                   (("worker", workers), ("client", clients), ("admin", admins)) for name in names]
    for stem, subject, names in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        written += _write(out, stem, key, _certificate(subject, ca_name, ca_key, key.public_key(), days, hosts=names))
    return written
