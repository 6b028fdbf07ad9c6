"""The node's self-signed X.509 certificate for QUIC (TLS 1.3, mutual).

There is no CA: a certificate proves a node id because the id is the
fingerprint of the certificate's own Ed25519 key, and the certificate is
signed by that key. ``node_id_from_certificate`` is the one check a transport
needs after the handshake (aioquic verifies the CertificateVerify signature,
i.e. that the peer holds the key; this module verifies what the key means).

The certificate is derived data: it is rewritten whenever it is missing,
unreadable, for another key, or close to expiry. Only the key is precious.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from .errors import (
    CertificateError,
    CertificateExpired,
    CertificateKeyUnsupported,
    CertificateMalformed,
    CertificateNodeIdMismatch,
    CertificateNotYetValid,
    CertificateSignatureInvalid,
    InvalidNodeId,
)
from .keys import NodeKey, key_path, load_or_create_node_key
from .nodeid import NodeId
from .statedir import StrPath, atomic_write, ensure_state_dir

logger = logging.getLogger(__name__)

CERT_FILE_NAME = "node_cert.pem"
CERT_VALIDITY = dt.timedelta(days=365)
CERT_RENEW_BEFORE = dt.timedelta(days=30)
# Backdating absorbs a peer whose clock is a little behind ours.
CERT_BACKDATE = dt.timedelta(hours=1)
DEFAULT_CERT_SKEW = 300.0


def create_certificate(key: NodeKey, *, now: float, validity: dt.timedelta = CERT_VALIDITY) -> x509.Certificate:
    """A self-signed certificate for ``key`` with the node id as subject CN and DNS SAN."""
    private_key = key.to_cryptography()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(key.node_id))])
    issued = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
    public_key = private_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued - CERT_BACKDATE)
        .not_valid_after(issued + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # The compact id is a valid DNS label, so a stock hostname check against
        # server_name=<compact id> also pins the peer.
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(key.node_id.compact.lower())]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(private_key, algorithm=None)


def node_id_from_certificate(
    certificate: x509.Certificate | bytes,
    *,
    now: float,
    expected: NodeId | None = None,
    max_skew: float = DEFAULT_CERT_SKEW,
) -> NodeId:
    """Return the node id a peer certificate proves, or raise a ``CertificateError``.

    Accepts a ``cryptography`` certificate or DER/PEM bytes. Checks: Ed25519
    key, self-issued and self-signed, subject CN equals the fingerprint of the
    key, validity period (with ``max_skew`` seconds of tolerance), and
    ``expected`` if given (the id the peer claims or we dialled).
    """
    cert = _load(certificate)
    public_key = cert.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise CertificateKeyUnsupported(f"peer certificate has a {type(public_key).__name__}, not an Ed25519 key")
    if cert.issuer != cert.subject:
        raise CertificateSignatureInvalid("peer certificate is not self-issued")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
        raise CertificateSignatureInvalid("peer certificate is not signed with Ed25519")
    try:
        public_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise CertificateSignatureInvalid("peer certificate's self-signature does not verify") from exc
    proven = NodeId.from_public_key(public_key.public_bytes_raw())
    claimed = _subject_node_id(cert)
    if claimed != proven:
        raise CertificateNodeIdMismatch(f"peer certificate names {claimed}, but its key is {proven}")
    moment = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
    skew = dt.timedelta(seconds=max_skew)
    if moment + skew < cert.not_valid_before_utc:
        raise CertificateNotYetValid(
            f"certificate of {proven} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"
        )
    if moment - skew > cert.not_valid_after_utc:
        raise CertificateExpired(f"certificate of {proven} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    if expected is not None and proven != expected:
        raise CertificateNodeIdMismatch(f"peer proved {proven}, expected {expected}")
    return proven


def _load(certificate: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(certificate, x509.Certificate):
        return certificate
    data = bytes(certificate)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateMalformed("peer certificate cannot be parsed") from exc


def _subject_node_id(cert: x509.Certificate) -> NodeId:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise CertificateMalformed("peer certificate subject cannot be parsed") from exc
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CertificateNodeIdMismatch("peer certificate subject must have exactly one CN (the node id)")
    try:
        return NodeId.parse(names[0].value)
    except InvalidNodeId as exc:
        raise CertificateNodeIdMismatch(f"peer certificate CN is not a node id: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """What a QUIC configuration needs: ``configuration.certificate = identity.certificate``,
    ``configuration.private_key = identity.private_key`` (or ``load_cert_chain`` on the paths)."""

    node_id: NodeId
    certificate: x509.Certificate
    private_key: Ed25519PrivateKey
    certificate_path: Path
    private_key_path: Path

    def __repr__(self) -> str:
        return f"TlsIdentity(node_id={self.node_id}, certificate_path={str(self.certificate_path)!r})"


def load_or_create_tls_identity(
    state_dir: StrPath, *, key: NodeKey | None = None, now: float | None = None
) -> TlsIdentity:
    """Load the node key (creating it on first start) and a current certificate for it.

    The certificate in ``node_cert.pem`` is reused while it is for this key and
    valid for at least ``CERT_RENEW_BEFORE`` more; otherwise a new one is
    written atomically. The key path is the node key file itself (PKCS#8 PEM).
    """
    directory = ensure_state_dir(state_dir)
    node_key = key if key is not None else load_or_create_node_key(directory)
    moment = time.time() if now is None else now
    cert_path = directory / CERT_FILE_NAME
    cert = _reusable_certificate(cert_path, node_key, moment)
    if cert is None:
        cert = create_certificate(node_key, now=moment)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        logger.info("wrote node certificate", extra={"node_id": str(node_key.node_id), "path": str(cert_path)})
    return TlsIdentity(
        node_id=node_key.node_id,
        certificate=cert,
        private_key=node_key.to_cryptography(),
        certificate_path=cert_path,
        private_key_path=key_path(directory),
    )


def _reusable_certificate(path: Path, key: NodeKey, now: float) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        proven = node_id_from_certificate(cert, now=now, expected=key.node_id, max_skew=0)
    except FileNotFoundError:
        return None
    except (CertificateError, ValueError, OSError) as exc:
        logger.warning("replacing unusable node certificate", extra={"path": str(path), "reason": str(exc)})
        return None
    renew_at = cert.not_valid_after_utc - CERT_RENEW_BEFORE
    if dt.datetime.fromtimestamp(now, tz=dt.timezone.utc) >= renew_at or proven != key.node_id:
        return None
    return cert


__all__ = [
    "CERT_FILE_NAME",
    "CERT_RENEW_BEFORE",
    "CERT_VALIDITY",
    "TlsIdentity",
    "create_certificate",
    "load_or_create_tls_identity",
    "node_id_from_certificate",
]
