"""The self-signed node certificate and the check that turns a peer certificate into a node id."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from identity import (
    CERT_FILE_NAME,
    KEY_FILE_NAME,
    CertificateExpired,
    CertificateKeyUnsupported,
    CertificateMalformed,
    CertificateNodeIdMismatch,
    CertificateNotYetValid,
    CertificateSignatureInvalid,
    NodeId,
    NodeKey,
    create_certificate,
    load_or_create_tls_identity,
    node_id_from_certificate,
)
from identity.tls import CERT_RENEW_BEFORE, CERT_VALIDITY

NOW = 1_750_000_000.0
KEY = NodeKey.from_seed(b"\x31" * 32)
OTHER = NodeKey.from_seed(b"\x32" * 32)


def _when(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def _custom_cert(
    *,
    subject_key: object,
    signing_key: object,
    cn: list[str],
    issuer_cn: list[str] | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cn])
    issuer = (
        subject if issuer_cn is None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in issuer_cn])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key)  # type: ignore[arg-type]
        .serial_number(1)
        .not_valid_before(_when(NOW - 3600))
        .not_valid_after(_when(NOW + 3600))
    )
    return builder.sign(signing_key, algorithm=algorithm)  # type: ignore[arg-type]


def test_own_certificate_proves_the_node_id() -> None:
    cert = create_certificate(KEY, now=NOW)
    assert node_id_from_certificate(cert, now=NOW) == KEY.node_id
    assert node_id_from_certificate(cert.public_bytes(serialization.Encoding.DER), now=NOW) == KEY.node_id
    assert node_id_from_certificate(cert.public_bytes(serialization.Encoding.PEM), now=NOW) == KEY.node_id
    assert node_id_from_certificate(cert, now=NOW, expected=KEY.node_id) == KEY.node_id


def test_certificate_profile() -> None:
    cert = create_certificate(KEY, now=NOW)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == str(KEY.node_id)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [KEY.node_id.compact.lower()]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.not_valid_before_utc < _when(NOW) < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == _when(NOW) + CERT_VALIDITY


def test_expected_id_mismatch_is_rejected() -> None:
    cert = create_certificate(KEY, now=NOW)
    with pytest.raises(CertificateNodeIdMismatch, match="expected"):
        node_id_from_certificate(cert, now=NOW, expected=OTHER.node_id)


def test_non_ed25519_key_is_rejected() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    cert = _custom_cert(
        subject_key=private.public_key(), signing_key=private, cn=[str(KEY.node_id)], algorithm=hashes.SHA256()
    )
    with pytest.raises(CertificateKeyUnsupported):
        node_id_from_certificate(cert, now=NOW)


def test_subject_naming_another_node_is_rejected() -> None:
    private = KEY.to_cryptography()
    cert = _custom_cert(subject_key=private.public_key(), signing_key=private, cn=[str(OTHER.node_id)])
    with pytest.raises(CertificateNodeIdMismatch, match="its key is"):
        node_id_from_certificate(cert, now=NOW)


@pytest.mark.parametrize("cn", [[], ["not a node id"], ["MESHD-ABCD"]])
def test_subject_without_a_node_id_is_rejected(cn: list[str]) -> None:
    private = KEY.to_cryptography()
    cert = _custom_cert(subject_key=private.public_key(), signing_key=private, cn=cn)
    with pytest.raises(CertificateNodeIdMismatch):
        node_id_from_certificate(cert, now=NOW)


def test_two_common_names_are_rejected() -> None:
    private = KEY.to_cryptography()
    cert = _custom_cert(subject_key=private.public_key(), signing_key=private, cn=[str(KEY.node_id), str(KEY.node_id)])
    with pytest.raises(CertificateNodeIdMismatch, match="exactly one CN"):
        node_id_from_certificate(cert, now=NOW)


def test_certificate_signed_by_another_key_is_rejected() -> None:
    cert = _custom_cert(
        subject_key=KEY.to_cryptography().public_key(), signing_key=OTHER.to_cryptography(), cn=[str(KEY.node_id)]
    )
    with pytest.raises(CertificateSignatureInvalid, match="does not verify"):
        node_id_from_certificate(cert, now=NOW)


def test_certificate_not_self_issued_is_rejected() -> None:
    private = KEY.to_cryptography()
    cert = _custom_cert(
        subject_key=private.public_key(), signing_key=private, cn=[str(KEY.node_id)], issuer_cn=["Some CA"]
    )
    with pytest.raises(CertificateSignatureInvalid, match="self-issued"):
        node_id_from_certificate(cert, now=NOW)


def test_tampered_signature_is_rejected() -> None:
    der = bytearray(create_certificate(KEY, now=NOW).public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the 64-byte Ed25519 signature at the end of the DER
    with pytest.raises(CertificateSignatureInvalid):
        node_id_from_certificate(bytes(der), now=NOW)


def test_tampered_body_is_rejected() -> None:
    cert = create_certificate(KEY, now=NOW)
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big")
    index = bytes(der).index(serial)
    der[index + 3] ^= 0x01  # a serial-number byte: still parses, signature no longer matches
    with pytest.raises(CertificateSignatureInvalid):
        node_id_from_certificate(bytes(der), now=NOW)


def test_validity_period_is_enforced_with_skew() -> None:
    cert = create_certificate(KEY, now=NOW, validity=dt.timedelta(days=1))
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    node_id_from_certificate(cert, now=start - 100, max_skew=300)
    with pytest.raises(CertificateNotYetValid):
        node_id_from_certificate(cert, now=start - 301, max_skew=300)
    node_id_from_certificate(cert, now=end + 100, max_skew=300)
    with pytest.raises(CertificateExpired):
        node_id_from_certificate(cert, now=end + 301, max_skew=300)


@pytest.mark.parametrize(
    "data", [b"", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"]
)
def test_unparseable_certificate_is_rejected(data: bytes) -> None:
    with pytest.raises(CertificateMalformed):
        node_id_from_certificate(data, now=NOW)


# --- the identity on disk ---------------------------------------------------------------


def test_tls_identity_is_created_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_tls_identity(state, now=NOW)
    assert first.certificate_path == state / CERT_FILE_NAME
    assert first.private_key_path == state / KEY_FILE_NAME
    assert node_id_from_certificate(first.certificate, now=NOW) == first.node_id
    assert isinstance(first.private_key, Ed25519PrivateKey)
    assert first.private_key.public_key().public_bytes_raw() == first.certificate.public_key().public_bytes_raw()  # type: ignore[union-attr]
    second = load_or_create_tls_identity(state, now=NOW + 86400)
    assert second.certificate.serial_number == first.certificate.serial_number
    assert second.node_id == first.node_id
    assert "PRIVATE" not in repr(second)


def test_certificate_is_renewed_before_it_expires(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_tls_identity(state, now=NOW)
    near_end = first.certificate.not_valid_after_utc.timestamp() - CERT_RENEW_BEFORE.total_seconds() + 60
    renewed = load_or_create_tls_identity(state, now=near_end)
    assert renewed.certificate.serial_number != first.certificate.serial_number
    assert node_id_from_certificate(renewed.certificate, now=near_end) == first.node_id


def test_unusable_certificate_file_is_replaced_but_the_key_is_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_tls_identity(state, now=NOW)
    key_bytes = (state / KEY_FILE_NAME).read_bytes()
    (state / CERT_FILE_NAME).write_bytes(b"garbage")
    again = load_or_create_tls_identity(state, now=NOW)
    assert again.node_id == first.node_id
    assert (
        node_id_from_certificate(x509.load_pem_x509_certificate((state / CERT_FILE_NAME).read_bytes()), now=NOW)
        == first.node_id
    )
    # A certificate for some other key is replaced as well.
    (state / CERT_FILE_NAME).write_bytes(create_certificate(OTHER, now=NOW).public_bytes(serialization.Encoding.PEM))
    third = load_or_create_tls_identity(state, now=NOW)
    assert node_id_from_certificate(third.certificate, now=NOW) == first.node_id
    assert (state / KEY_FILE_NAME).read_bytes() == key_bytes


def test_explicit_key_is_used(tmp_path: Path) -> None:
    identity = load_or_create_tls_identity(tmp_path / "state", key=KEY, now=NOW)
    assert identity.node_id == KEY.node_id
    assert node_id_from_certificate(identity.certificate, now=NOW) == KEY.node_id


# --- aioquic ----------------------------------------------------------------------------


def _handshake(server_dir: Path, client_dir: Path, *, mutual: bool) -> tuple[NodeId, NodeId | None]:
    """An in-memory QUIC handshake (aioquic is sans-IO); returns the ids each side proved."""
    configuration = pytest.importorskip("aioquic.quic.configuration")
    connection = pytest.importorskip("aioquic.quic.connection")
    quic_events = pytest.importorskip("aioquic.quic.events")

    server_identity = load_or_create_tls_identity(server_dir)
    client_identity = load_or_create_tls_identity(client_dir)
    server_config = configuration.QuicConfiguration(is_client=False, alpn_protocols=["meshd/1"])
    server_config.load_cert_chain(server_identity.certificate_path, server_identity.private_key_path)
    client_config = configuration.QuicConfiguration(
        is_client=True, alpn_protocols=["meshd/1"], verify_mode=ssl.CERT_NONE
    )
    client_config.certificate = client_identity.certificate
    client_config.private_key = client_identity.private_key

    class Server(connection.QuicConnection):  # type: ignore[name-defined,misc]
        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            # aioquic 1.x only asks for a client certificate through this flag.
            self.tls._request_client_certificate = mutual

    import time

    now = time.time()
    client = connection.QuicConnection(configuration=client_config)
    client.connect(("192.0.2.1", 4433), now=now)
    server = Server(
        configuration=server_config, original_destination_connection_id=client.original_destination_connection_id
    )
    for _ in range(10):
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("192.0.2.2", 50000), now=now)
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("192.0.2.1", 4433), now=now)
    for conn in (client, server):
        seen = []
        while (event := conn.next_event()) is not None:
            seen.append(type(event))
        assert quic_events.HandshakeCompleted in seen
    server_proved = node_id_from_certificate(client.tls._peer_certificate, now=now, expected=server_identity.node_id)
    client_cert = server.tls._peer_certificate
    client_proved = None if client_cert is None else node_id_from_certificate(client_cert, now=now)
    assert client_proved in (None, client_identity.node_id)
    return server_proved, client_proved


def test_aioquic_accepts_the_identity_and_the_peer_id_is_recovered(tmp_path: Path) -> None:
    server_id, client_id = _handshake(tmp_path / "s", tmp_path / "c", mutual=False)
    assert server_id == load_or_create_tls_identity(tmp_path / "s").node_id
    assert client_id is None


def test_aioquic_mutual_tls_proves_both_ids(tmp_path: Path) -> None:
    _server_id, client_id = _handshake(tmp_path / "s", tmp_path / "c", mutual=True)
    assert client_id == load_or_create_tls_identity(tmp_path / "c").node_id
    assert os.path.exists(tmp_path / "c" / CERT_FILE_NAME)
