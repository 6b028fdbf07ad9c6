"""The node key file: created once, private, atomic, and never silently replaced."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from identity import (
    KEY_FILE_NAME,
    InsecurePermissions,
    KeyFileError,
    NodeId,
    NodeKey,
    StateDirError,
    load_node_key,
    load_or_create_node_key,
    verify_signature,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_first_start_creates_a_private_key_and_later_starts_reuse_it(state: Path) -> None:
    key = load_or_create_node_key(state)
    path = state / KEY_FILE_NAME
    assert _mode(state) == 0o700
    assert _mode(path) == 0o600
    again = load_or_create_node_key(state)
    assert again.node_id == key.node_id and again.public_key == key.public_key
    assert sorted(p.name for p in state.iterdir()) == [KEY_FILE_NAME]


def test_key_file_is_standard_pem_with_the_node_id_recorded(state: Path) -> None:
    key = load_or_create_node_key(state)
    data = (state / KEY_FILE_NAME).read_bytes()
    assert f"node-id: {key.node_id}".encode() in data
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key().public_bytes_raw() == key.public_key


def test_two_nodes_get_different_ids(tmp_path: Path) -> None:
    assert load_or_create_node_key(tmp_path / "a").node_id != load_or_create_node_key(tmp_path / "b").node_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_key_file_with_loose_permissions_is_refused_and_left_alone(state: Path, mode: int) -> None:
    load_or_create_node_key(state)
    path = state / KEY_FILE_NAME
    before = path.read_bytes()
    os.chmod(path, mode)
    with pytest.raises(InsecurePermissions, match=f"mode {mode:04o}") as info:
        load_or_create_node_key(state)
    assert "chmod 600" in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before and _mode(path) == mode


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    text = good.decode()
    b64 = text.split("-----BEGIN PRIVATE KEY-----\n")[1].split("\n-----END")[0]
    der = bytearray(base64.b64decode(b64))
    der[-1] ^= 0x01  # one bit of the seed: still a parseable key, but another one
    flipped = text.replace(b64, base64.b64encode(bytes(der)).decode())
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "empty": b"",
        "garbage": b"\x00\xff not a key at all",
        "truncated": good[: len(good) // 2],
        "bit flip in the seed": flipped.encode(),
        "ec key": ec_pem,
        "bad node-id line": good.replace(b"node-id: MESHD-", b"node-id: MESHD-ZZ"),
    }


@pytest.mark.parametrize(
    "variant", ["empty", "garbage", "truncated", "bit flip in the seed", "ec key", "bad node-id line"]
)
def test_corrupt_key_file_is_refused_not_replaced(state: Path, variant: str) -> None:
    load_or_create_node_key(state)
    path = state / KEY_FILE_NAME
    bad = _corrupt_variants(path.read_bytes())[variant]
    path.write_bytes(bad)
    with pytest.raises(KeyFileError) as info:
        load_or_create_node_key(state)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert info.value.code == "key_file_invalid"
    assert path.read_bytes() == bad


def test_encrypted_key_is_refused_with_a_reason(state: Path) -> None:
    state.mkdir(mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    path = state / KEY_FILE_NAME
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="encrypted"):
        load_node_key(path)


def test_plain_pkcs8_key_without_node_id_line_is_importable(state: Path) -> None:
    state.mkdir(mode=0o700)
    private = Ed25519PrivateKey.generate()
    path = state / KEY_FILE_NAME
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(path, 0o600)
    key = load_or_create_node_key(state)
    assert key.public_key == private.public_key().public_bytes_raw()


def test_symlinked_key_file_is_refused(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(NodeKey.generate().to_key_file())
    os.chmod(elsewhere, 0o600)
    state.mkdir(mode=0o700)
    (state / KEY_FILE_NAME).symlink_to(elsewhere)
    with pytest.raises(StateDirError, match="symlink"):
        load_or_create_node_key(state)


def test_a_directory_in_place_of_the_key_is_refused(state: Path) -> None:
    (state / KEY_FILE_NAME).mkdir(parents=True)
    os.chmod(state, 0o700)
    with pytest.raises(StateDirError):
        load_or_create_node_key(state)


def test_the_secret_is_never_logged_or_shown(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = load_or_create_node_key(state)
    load_or_create_node_key(state)
    seed = key.to_cryptography().private_bytes_raw()
    secret_forms = [seed.hex(), base64.b64encode(seed).decode(), repr(seed)]
    pem_body = (state / KEY_FILE_NAME).read_text().split("-----BEGIN PRIVATE KEY-----\n")[1].split("\n")[0]
    shown = " ".join([repr(key), str(key)] + [r.getMessage() + " " + repr(r.__dict__) for r in caplog.records])
    for form in [*secret_forms, pem_body]:
        assert form not in shown
    assert str(key.node_id) in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_sign_and_verify() -> None:
    key = NodeKey.from_seed(bytes(range(32)))
    signature = key.sign(b"hello")
    assert len(signature) == 64
    assert verify_signature(key.public_key, b"hello", signature)
    assert not verify_signature(key.public_key, b"hellp", signature)
    other = NodeKey.from_seed(bytes(32))
    assert not verify_signature(other.public_key, b"hello", signature)
    assert not verify_signature(key.public_key[:31], b"hello", signature)
    assert not verify_signature(key.public_key, b"hello", signature[:63])


def test_seeded_keys_are_deterministic_and_match_cryptography() -> None:
    key = NodeKey.from_seed(b"\x05" * 32)
    assert key.node_id == NodeId.from_public_key(key.public_key)
    assert key.to_cryptography().public_key().public_bytes_raw() == key.public_key
    with pytest.raises(ValueError):
        NodeKey.from_seed(b"\x05" * 31)
