"""Reading receipts: tail, filters, follow across rotations, usage summaries."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from meshd.telemetry import (
    Follower,
    Receipt,
    ReceiptFilter,
    ReceiptWriter,
    Route,
    follow,
    format_receipt,
    format_usage,
    iter_receipts,
    parse_since,
    read_receipts,
    receipt_files,
    summarize,
    tail,
)

NOW = 1_770_000_000.0
KEYS = ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc")


def receipt(i: int, *, tenant: str | None = None, key_id: str | None = None, model: str = "smollm2",
            failed: bool = False) -> Receipt:
    return Receipt(
        time=NOW + i * 60, request_id=f"req-{i}", request_type="chat.completions", model=model,
        route=Route("MESHD-ENTRY", None if failed else "MESHD-ENTRY"), outcome="error" if failed else "success",
        status=500 if failed else 200, latency_ms=100.0, key_id=key_id or KEYS[i % 3],
        tenant=tenant or ("acme" if i % 3 else "beta"), prompt_tokens=10, completion_tokens=0 if failed else i,
        error_code="backend_error" if failed else None, ttft_ms=None if failed else 20.0,
    )


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    writer = ReceiptWriter(tmp_path, max_file_bytes=2500)
    for i in range(30):
        writer.append(receipt(i, failed=i % 7 == 6))
    writer.flush()
    assert len(receipt_files(tmp_path)) > 3
    return tmp_path


def test_iterate_everything_in_order(directory: Path) -> None:
    items = list(iter_receipts(directory))
    assert [item.record["seq"] for item in items] == list(range(30))
    first = items[0]
    assert first.path == receipt_files(directory)[0][1] and first.line == 1


def test_tail_returns_the_last_n_across_files(directory: Path) -> None:
    assert [i.record["seq"] for i in tail(directory, 5)] == [25, 26, 27, 28, 29]
    assert [i.record["seq"] for i in tail(directory, 100)] == list(range(30))
    assert tail(directory, 0) == []


def test_tail_with_a_tenant_filter(directory: Path) -> None:
    beta = tail(directory, 4, ReceiptFilter(tenant="beta"))
    assert [i.record["seq"] for i in beta] == [18, 21, 24, 27]
    assert all(i.record["tenant"] == "beta" for i in beta)


def test_filters(directory: Path) -> None:
    since = NOW + 10 * 60
    selected = [i.record["seq"] for i in iter_receipts(directory, ReceiptFilter(since=since, until=since + 300))]
    assert selected == [10, 11, 12, 13, 14]
    failed = [i.record["seq"] for i in iter_receipts(directory, ReceiptFilter(outcome="error"))]
    assert failed == [6, 13, 20, 27]
    by_key = [i.record["seq"] for i in iter_receipts(directory, ReceiptFilter(key_id=KEYS[1], tenant="acme"))]
    assert by_key == list(range(1, 30, 3))


def test_follower_sees_new_receipts_across_rotations(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path, max_file_bytes=1500)
    writer.append(receipt(0))
    writer.flush()
    follower = Follower(tmp_path)  # starts at the end
    assert follower.poll() == []
    seen: list[int] = []
    for batch in range(4):
        for i in range(1 + batch * 5, 6 + batch * 5):
            writer.append(receipt(i))
        writer.flush()
        seen += [item.record["seq"] for item in follower.poll()]
    assert seen == list(range(1, 21))
    assert len(receipt_files(tmp_path)) > 3
    items = Follower(tmp_path, from_start=True).poll()
    assert [i.record["seq"] for i in items] == list(range(21))
    lines = {(i.path, i.line): i.record["seq"] for i in iter_receipts(tmp_path)}
    assert {(i.path, i.line): i.record["seq"] for i in items} == lines


def test_follower_waits_for_an_unfinished_line(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    writer.append(receipt(0))
    writer.flush()
    follower = Follower(tmp_path, from_start=True)
    assert len(follower.poll()) == 1
    (_, path), = receipt_files(tmp_path)
    full = path.read_bytes()
    second = ReceiptWriter(tmp_path)
    second.append(receipt(1))
    second.flush()
    new_line = path.read_bytes()[len(full):]
    path.write_bytes(full + new_line[:40])  # the writer is half-way through the line
    assert follower.poll() == []
    path.write_bytes(full + new_line)
    assert [i.record["seq"] for i in follower.poll()] == [1]


def test_follow_generator_with_a_filter(tmp_path: Path) -> None:
    writer = ReceiptWriter(tmp_path)
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        writer.append(receipt(len(polls)))
        writer.flush()

    stream = follow(tmp_path, ReceiptFilter(tenant="beta"), interval=0.25, sleep=sleep, from_start=True)
    got = [next(stream).record["request_id"] for _ in range(3)]
    assert got == ["req-3", "req-6", "req-9"]
    assert set(polls) == {0.25}


def test_usage_summary(directory: Path) -> None:
    rows = summarize(read_receipts(directory))
    assert len(rows) == 3
    beta = next(r for r in rows if r.tenant == "beta")
    assert (beta.key_id, beta.model, beta.requests, beta.errors) == (KEYS[0], "smollm2", 10, 2)  # 6 and 27 failed
    assert beta.prompt_tokens == 100
    assert beta.completion_tokens == sum(i for i in range(0, 30, 3) if i % 7 != 6)
    assert beta.total_tokens == beta.prompt_tokens + beta.completion_tokens
    assert sum(r.requests for r in rows) == 30


def test_usage_filtered_and_grouped(directory: Path) -> None:
    rows = summarize(read_receipts(directory), since=NOW + 15 * 60, tenant="acme", by=("tenant",))
    assert len(rows) == 1
    (row,) = rows
    expected = [i for i in range(15, 30) if i % 3]
    assert (row.tenant, row.key_id, row.model, row.requests) == ("acme", None, None, len(expected))
    assert row.completion_tokens == sum(i for i in expected if i % 7 != 6)
    with pytest.raises(ValueError):
        summarize([], by=("region",))


def test_usage_table_text(directory: Path) -> None:
    text = format_usage(summarize(read_receipts(directory)))
    lines = text.splitlines()
    assert lines[0].split() == ["TENANT", "KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL"]
    assert lines[-1].split()[:3] == ["total", "30", "4"]


def test_parse_since() -> None:
    assert parse_since("90m", now=NOW) == NOW - 5400
    assert parse_since("7d", now=NOW) == NOW - 7 * 86400
    assert parse_since("2026-02-01", now=NOW) == dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc).timestamp()
    assert parse_since("2026-02-01T10:00:00+01:00", now=NOW) == dt.datetime(
        2026, 2, 1, 9, tzinfo=dt.timezone.utc).timestamp()
    with pytest.raises(ValueError):
        parse_since("last week", now=NOW)


def test_format_receipt(directory: Path) -> None:
    records = [item.record for item in iter_receipts(directory)]
    text = format_receipt(records[6])
    assert "#6" in text and "beta/aaaaaaaaaaaa" in text and "error(backend_error)" in text and "500" in text
    assert "via=-" in text and "ttft=-" in text
    assert "ttft=20ms" in format_receipt(records[1])
