"""TLS contexts: TLS 1.2+, no renegotiation; a reload makes a new holder (reload.py).

docs/configuration.md "Configuration", docs/dialogue.md "The dialogue" and "Signals".
"""

import datetime
import os
import tempfile
from typing import Optional, Tuple

from gevent import ssl


TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))


class TLSError(Exception):
    """The certificate or key could not be loaded."""


def make_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation is a DoS lever and was never needed by SMTP.
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # TLS 1.2: forward secret AEAD suites only, Mozilla's "intermediate"
    # profile without DHE; CBC suites carry the padding-oracle family of
    # attacks (Lucky 13 and kin).  TLS 1.3 suites are AEAD by design and are
    # not affected by this string.
    ctx.set_ciphers(TLS12_CIPHERS)
    # TLS 1.3: one session ticket, not OpenSSL's two.  A client that comes
    # back resumes with one; the second is for a client opening two
    # connections at once, and every handshake paid for it (docs/performance.md "Performance").
    ctx.num_tickets = 1
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load certificate {cert_file} / key {key_file}: "
                       f"{_diagnose(cert_file, key_file) or e}") from None
    return ctx


def _diagnose(cert_file: str, key_file: Optional[str]) -> str:
    """OpenSSL says "PEM lib"; say which file holds what instead, if we can tell."""
    def holds(path):
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except OSError:
            return None, None
        return b"-----BEGIN CERTIFICATE-----" in text, b"PRIVATE KEY-----" in text

    cert_has_cert, cert_has_key = holds(cert_file)
    key_has_cert, key_has_key = holds(key_file or cert_file)
    if cert_has_cert is False and cert_has_key and key_has_cert:
        return "the two files are swapped: --ssl-cert holds a key, --ssl-key a certificate"
    if cert_has_cert is False:
        return "the --ssl-cert file holds no PEM certificate"
    if key_has_key is False:
        return "the --ssl-key file holds no PEM private key"
    return "the key does not belong to the certificate" if cert_has_cert and key_has_key else ""


def self_signed_pem(hostname: str):
    """A fresh key and self-signed certificate for `hostname`, as PEM bytes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class TLSHolder:
    """The certificate and context of one configuration: sessions keep the
    holder they began with, so a reload never disturbs one in progress."""

    def __init__(self, hostname: str, cert_file: Optional[str], key_file: Optional[str],
                 pem: Optional[Tuple[bytes, bytes]] = None):
        self.hostname = hostname
        self.cert_file = cert_file
        self.key_file = key_file
        if pem is not None:
            # Handed down by the master of --workers: the very certificate it
            # loaded (the files may be root's only), or its self-signed one.
            self.pem = pem
            self.context = _context_from_pem(*pem)
        elif cert_file:
            self.context = make_context(cert_file, key_file)
            self.pem = (_read(cert_file), _read(key_file))
        else:
            self.pem = self_signed_pem(hostname)
            self.context = _context_from_pem(*self.pem)

    @property
    def self_signed(self) -> bool:
        return self.cert_file is None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror}") from None


def _context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    # load_cert_chain only reads files; keep the key file private and brief.
    with tempfile.TemporaryDirectory(prefix="ssmtpd-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        return make_context(cert_path, key_path)
