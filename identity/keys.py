"""The node's Ed25519 key: generation, the key file, signing.

The key file ``<state dir>/node_key.pem`` is a standard unencrypted PKCS#8
PEM (so ``openssl`` and aioquic's ``load_cert_chain`` read it directly)
preceded by two comment lines, one of which records the node id. On load the
id derived from the key must equal the recorded one: a damaged key that still
parses would otherwise silently turn the node into a different node.

The secret never appears in ``repr``, logs or exceptions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import InvalidNodeId, KeyFileError
from .nodeid import PUBLIC_KEY_LENGTH, NodeId
from .statedir import StrPath, atomic_write, ensure_state_dir, read_private_file

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "node_key.pem"
SIGNATURE_LENGTH = 64
_SEED_LENGTH = 32
_NODE_ID_LINE = "node-id:"
_HEADER = "# meshd node key (Ed25519). Secret: never copy it to another machine or share it.\n"


class NodeKey:
    """A node's Ed25519 signing key and the public identity derived from it."""

    __slots__ = ("_signing_key", "node_id", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: NodeId = NodeId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """Rebuild a key from its 32-byte seed (tests and key import)."""
        if len(seed) != _SEED_LENGTH:
            raise ValueError(f"an Ed25519 seed has {_SEED_LENGTH} bytes, not {len(seed)}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte signature over ``message``."""
        return self._signing_key.sign(message).signature

    def to_cryptography(self) -> Ed25519PrivateKey:
        """The same key as a ``cryptography`` object (for X.509 and aioquic)."""
        return Ed25519PrivateKey.from_private_bytes(bytes(self._signing_key))

    def to_key_file(self) -> bytes:
        """The key file contents: comment lines with the node id, then PKCS#8 PEM."""
        pem = self.to_cryptography().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (_HEADER + f"# {_NODE_ID_LINE} {self.node_id}\n").encode("ascii") + pem

    def __repr__(self) -> str:
        return f"NodeKey(node_id={self.node_id})"

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the secret into caches and worker processes.
        raise TypeError("NodeKey cannot be pickled")


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check a detached Ed25519 signature; False for any invalid input, never raises."""
    if len(public_key) != PUBLIC_KEY_LENGTH or len(signature) != SIGNATURE_LENGTH:
        return False
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(bytes(message), bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


def load_node_key(path: StrPath) -> NodeKey:
    """Load and check a key file.

    Raises ``InsecurePermissions`` for a file other users can access,
    ``KeyFileError`` for anything that is not exactly one intact Ed25519 key,
    and ``FileNotFoundError`` if it does not exist.
    """
    key_path = Path(path)
    data = read_private_file(key_path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"node key file {key_path} is corrupt (not PEM text)", path=key_path) from exc
    recorded = _recorded_node_id(key_path, text)
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise KeyFileError(
            f"node key file {key_path} is encrypted; meshd needs an unencrypted key", path=key_path
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"node key file {key_path} is corrupt (no readable private key)", path=key_path) from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(
            f"node key file {key_path} holds a {type(private_key).__name__}, not an Ed25519 key",
            path=key_path,
        )
    key = NodeKey.from_seed(private_key.private_bytes_raw())
    if recorded is not None and recorded != key.node_id:
        raise KeyFileError(
            f"node key file {key_path} is corrupt: its key belongs to {key.node_id}, but the file records {recorded}",
            path=key_path,
        )
    return key


def _recorded_node_id(key_path: Path, text: str) -> NodeId | None:
    # The node-id line is optional so a key made with
    # `openssl genpkey -algorithm ed25519` can be imported as is.
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        if body.startswith(_NODE_ID_LINE):
            try:
                return NodeId.parse(body[len(_NODE_ID_LINE) :])
            except InvalidNodeId as exc:
                raise KeyFileError(
                    f"node key file {key_path} is corrupt: unreadable node-id line ({exc.message})",
                    path=key_path,
                ) from exc
    return None


def key_path(state_dir: StrPath) -> Path:
    return Path(state_dir) / KEY_FILE_NAME


def load_or_create_node_key(state_dir: StrPath) -> NodeKey:
    """Load the node key from the state dir, creating dir and key on first start.

    An existing key file is never replaced: if it is unreadable, corrupt or has
    loose permissions the error propagates and the operator decides.
    """
    directory = ensure_state_dir(state_dir)
    path = key_path(directory)
    if os.path.lexists(path):
        return load_node_key(path)
    key = NodeKey.generate()
    try:
        atomic_write(path, key.to_key_file(), exclusive=True)
    except FileExistsError:
        # Another process created it between our check and our link: use theirs.
        return load_node_key(path)
    logger.info("created node key", extra={"node_id": str(key.node_id), "path": str(path)})
    return key


__all__ = [
    "KEY_FILE_NAME",
    "SIGNATURE_LENGTH",
    "NodeKey",
    "key_path",
    "load_node_key",
    "load_or_create_node_key",
    "verify_signature",
]
