"""The receipt writer: records valid against the schema, chaining, rotation, recovery, failures."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import jsonschema
import pytest

from meshd.auth import KeyStore
from meshd.telemetry import (
    GENESIS_HASH,
    Failover,
    InvalidReceipt,
    PolicyDecision,
    Receipt,
    ReceiptLogCorrupt,
    ReceiptWriter,
    Route,
    decode_line,
    read_head,
    receipt_files,
    verify_chain,
)

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "receipt.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
NOW = 1_770_000_000.0
ENTRY = "MESHD-AAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGG-HHHH-IIII-JJJJ"
PEER = "MESHD-2222-3333-4444-5555-6666-7777-2222-3333-4444-5555"


def success(i: int = 0, **changes) -> Receipt:
    fields = dict(
        time=NOW + i, request_id=f"chatcmpl-{i}", request_type="chat.completions", model="smollm2",
        route=Route(ENTRY, PEER, (Failover("MESHD-ZZZZ", "backend_error"),)), outcome="success", status=200,
        latency_ms=812.25, key_id="abcdefghijkl", tenant="acme",
        model_identity={"family": "llama", "quantization": "Q8_0", "sha256": "ab" * 32, "parameters": 135_000_000},
        data_class="internal", tier="peer",
        policy=(PolicyDecision("auth", "allowed", "key abcdefghijkl"), PolicyDecision("quota", "admitted", "1040")),
        prompt_tokens=40, completion_tokens=12, ttft_ms=120.5, stream=True,
    )
    fields.update(changes)
    return Receipt(**fields)


def failure(i: int = 0, **changes) -> Receipt:
    fields = dict(
        time=NOW + i, request_id=f"cmpl-{i}", request_type="completions", model="smollm2",
        route=Route(ENTRY, None), outcome="error", status=429, latency_ms=0.4, error_code="rate_limit_exceeded",
        key_id="abcdefghijkl", tenant="acme", policy=(PolicyDecision("quota", "refused", "requests"),),
    )
    fields.update(changes)
    return Receipt(**fields)


def records(directory: Path) -> list[dict]:
    out = []
    for _, path in receipt_files(directory):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_success_and_error_receipts_are_valid_against_the_schema(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    writer.append(success(1))
    writer.append(failure(2))
    writer.append(success(3, request_type="embeddings", stream=False, ttft_ms=None, tier="local",
                          route=Route(ENTRY, ENTRY), model_identity=None, tokens_estimated=True))
    writer.append(failure(4, outcome="cancelled", status=499, error_code="request_cancelled", key_id=None, tenant=None))
    assert writer.flush() == 4
    written = records(tmp_path)
    assert len(written) == 4
    for record in written:
        VALIDATOR.validate(record)
    ok, refused = written[0], written[1]
    assert (ok["seq"], ok["prev"], ok["success"], ok["error_code"]) == (0, GENESIS_HASH, True, None)
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["total_tokens"]) == (40, 12, 52)
    assert ok["route"] == {"entry_node": ENTRY, "serving_node": PEER,
                           "failovers": [{"node": "MESHD-ZZZZ", "error_code": "backend_error"}]}
    assert ok["node_id"] == PEER and ok["time"] == "2026-02-02T02:40:01.000Z"
    assert ok["policy"][1] == {"name": "quota", "result": "admitted", "detail": "1040"}
    assert (refused["outcome"], refused["success"], refused["status"], refused["error_code"]) == (
        "error", False, 429, "rate_limit_exceeded")
    assert refused["prev"] == ok["hash"] and refused["seq"] == 1


def test_the_schema_rejects_what_the_writer_never_writes() -> None:
    line, _ = _encoded(success())
    record = json.loads(line)
    for change in ({"key_id": "mk-abcdefghijkl-secret"}, {"outcome": "ok"}, {"success": False},
                   {"prev": "xyz"}, {"extra": 1}, {"prompt_tokens": -1}):
        broken = {**record, **change}
        assert not VALIDATOR.is_valid(broken), change
    missing = dict(record)
    del missing["hash"]
    assert not VALIDATOR.is_valid(missing)


def _encoded(receipt: Receipt) -> tuple[str, str]:
    from meshd.telemetry import encode_line

    line, digest = encode_line(receipt.body(seq=0, prev=GENESIS_HASH))
    return line.decode(), digest


@pytest.mark.parametrize("changes", [
    {"key_id": "mk-abcdefghijkl-" + "a" * 52},  # a secret can never land in a receipt
    {"outcome": "success", "error_code": "x"},
    {"outcome": "error", "error_code": None},
    {"status": 42},
    {"prompt_tokens": -1},
    {"latency_ms": float("nan")},
    {"request_type": "images"},
    {"data_class": "top"},
    {"request_id": ""},
    {"model_identity": {"x": object()}},
])
def test_invalid_receipts_are_refused(changes: dict) -> None:
    with pytest.raises(InvalidReceipt):
        success(**changes)


def test_no_secret_in_receipts(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "state")
    record, secret = store.create("ci", now=NOW, tenant="acme")
    writer = ReceiptWriter(tmp_path / "receipts")
    writer.append(success(key_id=record.key_id))
    writer.flush()
    text = "".join(p.read_text() for _, p in receipt_files(tmp_path / "receipts"))
    assert record.key_id in text
    assert secret.rsplit("-", 1)[1] not in text


def test_lines_hash_their_own_content_and_chain(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    for i in range(5):
        writer.append(success(i))
    writer.flush()
    (_, path), = receipt_files(tmp_path)
    previous = GENESIS_HASH
    for seq, line in enumerate(path.read_bytes().splitlines()):
        decoded = decode_line(line)
        assert decoded.hash_ok and decoded.seq == seq and decoded.prev == previous
        assert line.endswith(f',"hash":"{decoded.hash}"}}'.encode())
        previous = decoded.hash
    assert writer.head == (4, previous)
    head = read_head(tmp_path)
    assert (head.seq, head.hash, head.file, head.line) == (4, previous, path.name, 5)


def test_rotation_by_size_keeps_the_chain(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path, max_file_bytes=3000)
    for i in range(20):
        writer.append(success(i) if i % 3 else failure(i))
        if i % 4 == 0:
            writer.flush()
    writer.flush()
    files = receipt_files(tmp_path)
    assert len(files) >= 5
    last_hash, next_seq = GENESIS_HASH, 0
    for first_seq, path in files:
        lines = [decode_line(line) for line in path.read_bytes().splitlines()]
        assert path.stat().st_size <= 3000
        assert lines[0].seq == first_seq == next_seq
        assert lines[0].prev == last_hash  # the first record of a file chains to the previous file
        last_hash, next_seq = lines[-1].hash, lines[-1].seq + 1
    assert next_seq == 20
    assert verify_chain(tmp_path).ok


def test_a_new_writer_continues_the_chain(tmp_path: Path) -> None:
    first = ReceiptWriter(tmp_path, max_file_bytes=3000)
    for i in range(7):
        first.append(success(i))
    first.flush()
    second = ReceiptWriter(tmp_path, max_file_bytes=3000)
    assert second.head == first.head
    second.append(failure(7))
    second.flush()
    assert [r["seq"] for r in records(tmp_path)] == list(range(8))
    report = verify_chain(tmp_path)
    assert report.ok and report.records == 8 and not report.warnings


def test_an_unfinished_line_from_a_crash_is_cut_off_at_start(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    for i in range(3):
        writer.append(success(i))
    writer.flush()
    (_, path), = receipt_files(tmp_path)
    with open(path, "ab") as file:
        file.write(b'{"completion_tokens":1,"data_cl')
    assert any("unfinished" in w for w in verify_chain(tmp_path).warnings)
    again = ReceiptWriter(tmp_path)
    assert again.head[0] == 2
    again.append(success(3))
    again.flush()
    report = verify_chain(tmp_path)
    assert report.ok and report.records == 4 and not report.warnings


def test_an_unreadable_chain_end_stops_the_writer(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    writer.append(success())
    writer.flush()
    (_, path), = receipt_files(tmp_path)
    with open(path, "ab") as file:
        file.write(b"garbage\n")
    with pytest.raises(ReceiptLogCorrupt) as info:
        ReceiptWriter(tmp_path)
    assert info.value.path == path


def test_a_failed_write_is_rolled_back_and_retried(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path, max_file_bytes=1500)
    writer.append(success(0))
    writer.flush()
    # The next file's name is taken by a directory: opening it fails, as a full disk would.
    blocker = tmp_path / "receipts-000000000001.jsonl"
    blocker.mkdir()
    for i in range(1, 4):
        writer.append(success(i))
    with pytest.raises(OSError):
        writer.flush()
    assert writer.pending == 3 and writer.head[0] == 0
    blocker.rmdir()
    assert writer.flush() == 3
    assert [r["seq"] for r in records(tmp_path)] == [0, 1, 2, 3]
    assert verify_chain(tmp_path).ok


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path, max_pending=2)
    assert writer.append(success(0)) and writer.append(success(1))
    assert not writer.append(success(2))
    assert writer.dropped == 1
    assert writer.flush() == 2


def test_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "receipts"
    writer = ReceiptWriter(directory)
    writer.append(success())
    writer.flush()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for _, path in receipt_files(directory):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory / "receipts.head").st_mode) == 0o600


async def test_appends_on_the_loop_while_flushing_in_a_thread(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path, max_file_bytes=20_000)
    done = asyncio.Event()

    async def flusher() -> None:
        while not done.is_set():
            await writer.aflush()
            await asyncio.sleep(0.001)

    task = asyncio.create_task(flusher())
    for i in range(600):
        writer.append(success(i) if i % 2 else failure(i))
        if i % 25 == 0:
            await asyncio.sleep(0.002)
    done.set()
    await task
    await writer.aflush()
    written = records(tmp_path)
    assert [r["request_id"].split("-")[1] for r in written] == [str(i) for i in range(600)]
    assert [r["seq"] for r in written] == list(range(600))
    assert verify_chain(tmp_path).ok
