"""Mutual TLS for qh3: the server side asks the client for its certificate.

qh3 2.1's TLS 1.3 stack (pure Python over Rust crypto, ``qh3.tls.Context``)
presents a client certificate when a server requests one, but its server never
requests one: its handshake goes ClientHello -> (our flight) -> Finished and it
even precomputes the client's Finished. meshd needs the client's certificate
(the node id is the fingerprint of its key), so this module adds RFC 8446
client authentication to the server side, restricted to what meshd uses:

* The server's flight carries a CertificateRequest (signature algorithm
  Ed25519 only) right after EncryptedExtensions. qh3 writes that message in
  one place; ``push_encrypted_extensions`` is wrapped once, and appends the
  request only to a buffer a ``ClientAuthServerContext`` registered for it, so
  every other qh3 handshake in the process is untouched.
* The client's Finished can no longer be anticipated (its transcript covers
  the client's Certificate). qh3 already has a "transcript not known yet"
  path, used for ALPS, which defers that computation to ``Finished``; the
  context borrows it for the two calls that need it.
* Certificate and CertificateVerify are handled here: an empty certificate is
  refused, and the signature over the transcript must verify with the
  certificate's key (proof of possession). What the key *means* (the node id)
  is checked by the transport after the handshake, as with aioquic.

Everything here depends on qh3 internals; ``engine_qh3`` runs a full mutual
handshake in memory before qh3 is chosen, so a qh3 release that changes them
makes meshd fall back to aioquic instead of failing at runtime.
"""

from __future__ import annotations

import struct
from typing import Any

from qh3 import tls as qtls

CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify"
# The only signature algorithm meshd certificates use (identity/tls.py).
ED25519 = int(qtls.SignatureAlgorithm.ED25519)

_TYPE = qtls.HandshakeType


def certificate_request_message() -> bytes:
    """A CertificateRequest handshake message: empty context, signature_algorithms = [ed25519]."""
    algorithms = struct.pack("!HH", 2, ED25519)  # list<2> of one uint16
    extension = struct.pack("!HH", int(qtls.ExtensionType.SIGNATURE_ALGORITHMS), len(algorithms)) + algorithms
    body = b"\x00" + struct.pack("!H", len(extension)) + extension  # request_context<1>, extensions<2>
    return bytes([_TYPE.CERTIFICATE_REQUEST]) + len(body).to_bytes(3, "big") + body


_REQUEST = certificate_request_message()
# Buffers (by id) whose next EncryptedExtensions must be followed by our request.
# Registered and removed around one synchronous call, so ids cannot be reused meanwhile.
_pending_requests: set[int] = set()
_original_push_encrypted_extensions = qtls.push_encrypted_extensions


def _push_encrypted_extensions_then_request(buf: Any, extensions: Any) -> None:
    _original_push_encrypted_extensions(buf, extensions)
    if id(buf) in _pending_requests:
        _pending_requests.discard(id(buf))
        # Same push_message block as EncryptedExtensions: the transcript hash
        # covers EE || CertificateRequest, exactly as if pushed separately.
        buf.push_bytes(_REQUEST)


def _install() -> None:
    if getattr(qtls.push_encrypted_extensions, "__meshd_wrapper__", False):
        return
    _push_encrypted_extensions_then_request.__meshd_wrapper__ = True  # type: ignore[attr-defined]
    qtls.push_encrypted_extensions = _push_encrypted_extensions_then_request


_install()

# Where the server is in client authentication; None outside it.
_EXPECT_CERTIFICATE = "certificate"
_EXPECT_VERIFY = "certificate_verify"
_EXPECT_FINISHED = "finished"


class ClientAuthServerContext(qtls.Context):
    """A qh3 server ``tls.Context`` that requires and verifies a client certificate.

    Installed on a server connection's TLS bridge right after qh3 creates it
    (``engine_qh3``); the class swap keeps every attribute qh3 set up.
    """

    _client_auth: str | None = None

    def _server_handle_hello(self, input_buf: Any, initial_buf: Any, handshake_buf: Any, onertt_buf: Any) -> None:
        _pending_requests.add(id(handshake_buf))
        self._alps_negotiated = True  # defer the client Finished (see module docstring)
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf)
        finally:
            _pending_requests.discard(id(handshake_buf))
            self._alps_negotiated = False
        self._client_auth = _EXPECT_CERTIFICATE

    def handle_message(self, input_data: bytes, output_buf: dict, epoch: int = -1) -> None:
        if self._client_auth is None:
            super().handle_message(input_data, output_buf, epoch)
            return
        self._receive_buffer += input_data
        while self._client_auth is not None and len(self._receive_buffer) >= 4:
            length = 4 + int.from_bytes(self._receive_buffer[1:4], "big")
            if len(self._receive_buffer) < length:
                return
            message, self._receive_buffer = self._receive_buffer[:length], self._receive_buffer[length:]
            if epoch >= 0 and epoch != qtls.Epoch.HANDSHAKE:
                raise qtls.AlertUnexpectedMessage("client authentication outside the handshake epoch")
            self._client_auth_message(message, output_buf)
        if self._client_auth is None and self._receive_buffer:
            super().handle_message(b"", output_buf, epoch)

    def _client_auth_message(self, message: bytes, output_buf: dict) -> None:
        kind = message[0]
        buf = qtls.Buffer(data=message)
        if self._client_auth == _EXPECT_CERTIFICATE and kind == _TYPE.CERTIFICATE:
            certificate = qtls.pull_certificate(buf)
            if not certificate.certificates:
                raise qtls.AlertBadCertificate("the client presented no certificate")
            self._peer_certificate = qtls.X509Certificate(certificate.certificates[0][0])
            self._peer_certificate_chain = [qtls.X509Certificate(entry[0]) for entry in certificate.certificates[1:]]
            self.key_schedule.update_hash(message)
            self._client_auth = _EXPECT_VERIFY
        elif self._client_auth == _EXPECT_VERIFY and kind == _TYPE.CERTIFICATE_VERIFY:
            verify = qtls.pull_certificate_verify(buf)
            if verify.algorithm != ED25519:
                raise qtls.AlertIllegalParameter("client CertificateVerify is not Ed25519")
            try:
                qtls.verify_with_public_key(self._peer_certificate.public_key(), verify.algorithm,
                                            self.key_schedule.certificate_verify_data(CLIENT_CONTEXT),
                                            verify.signature)
            except qtls.SignatureError as exc:
                raise qtls.AlertDecryptError("client CertificateVerify does not verify") from exc
            self.key_schedule.update_hash(message)
            self._client_auth = _EXPECT_FINISHED
        elif self._client_auth == _EXPECT_FINISHED and kind == _TYPE.FINISHED:
            self._alps_negotiated = True  # verify Finished against the transcript as it is now
            try:
                self._server_handle_finished(buf, output_buf[qtls.Epoch.ONE_RTT])
            finally:
                self._alps_negotiated = False
            self._client_auth = None
        else:
            raise qtls.AlertUnexpectedMessage(f"unexpected handshake message {kind} during client authentication")
        if not buf.eof():
            raise qtls.AlertDecodeError("extra bytes at the end of a handshake message")


__all__ = ["ClientAuthServerContext", "certificate_request_message"]
