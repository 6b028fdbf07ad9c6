"""Reading receipts: iterate, tail, filter and follow (``meshctl receipts``).

Readers only need read access and never lock: the writer appends whole lines
and never rewrites them, so a reader sees complete lines plus, at worst, the
unfinished end of a batch being written, which it leaves for the next read.
Lines that are not receipts are skipped here; ``verify_chain`` reports them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .logfiles import last_line, receipt_files
from .receipts import LineMalformed, decode_line, parse_time

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class ReceiptLine:
    """A receipt as read: the record and where it is (file and 1-based line)."""

    path: Path
    line: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReceiptFilter:
    """Which receipts to show; every given condition must hold. Times are epoch seconds."""

    since: float | None = None
    until: float | None = None
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    outcome: str | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        for name in ("tenant", "key_id", "model", "outcome"):
            wanted = getattr(self, name)
            if wanted is not None and record.get(name) != wanted:
                return False
        if self.since is not None or self.until is not None:
            try:
                when = parse_time(record["time"])
            except (KeyError, TypeError, ValueError):
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


_EVERYTHING = ReceiptFilter()


def _lines(path: Path, data: bytes, first_line: int, selector: ReceiptFilter) -> Iterator[ReceiptLine]:
    for offset, raw in enumerate(data.split(b"\n")[:-1]):
        try:
            record = decode_line(raw).record
        except LineMalformed:
            logger.debug("skipping a line that is not a receipt",
                         extra={"fields": {"path": str(path), "line": first_line + offset}})
            continue
        if selector.matches(record):
            yield ReceiptLine(path, first_line + offset, record)


def _complete(data: bytes) -> bytes:
    """Only whole lines: drop an unfinished last line."""
    return data[: data.rfind(b"\n") + 1]


def iter_receipts(directory: StrPath, selector: ReceiptFilter = _EVERYTHING) -> Iterator[ReceiptLine]:
    """Every matching receipt, oldest first, one file in memory at a time."""
    for _, path in receipt_files(directory):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        yield from _lines(path, _complete(data), 1, selector)


def read_receipts(directory: StrPath, selector: ReceiptFilter = _EVERYTHING) -> Iterator[dict[str, Any]]:
    """Just the records (for ``summarize``)."""
    return (item.record for item in iter_receipts(directory, selector))


def tail(directory: StrPath, n: int, selector: ReceiptFilter = _EVERYTHING) -> list[ReceiptLine]:
    """The last ``n`` matching receipts, oldest first; reads files from the newest back."""
    if n <= 0:
        return []
    found: list[ReceiptLine] = []
    for _, path in reversed(receipt_files(directory)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        matches = list(_lines(path, _complete(data), 1, selector))
        found[:0] = matches[-(n - len(found)):]
        if len(found) >= n:
            break
    return found


class Follower:
    """New receipts as they are written, across rotations; ``poll()`` never blocks.

    Starts at the current end of the log (``from_start=False``) or at its
    beginning. An unfinished line is left until it is complete.
    """

    def __init__(self, directory: StrPath, selector: ReceiptFilter = _EVERYTHING, *, from_start: bool = False) -> None:
        self.directory = Path(directory)
        self.selector = selector
        self._path: Path | None = None
        self._offset = 0
        self._line = 1  # number of the next line to read
        if not from_start:
            files = receipt_files(self.directory)
            if files:
                self._path = files[-1][1]
                self._offset, self._line = _end_of(self._path)

    def poll(self) -> list[ReceiptLine]:
        out: list[ReceiptLine] = []
        while True:
            if self._path is None:
                files = receipt_files(self.directory)
                if not files:
                    return out
                self._path, self._offset, self._line = files[0][1], 0, 1
            out.extend(self._read_current())
            following = [p for _, p in receipt_files(self.directory) if p.name > self._path.name]
            if not following:
                return out
            # The writer only starts a new file once the previous one is complete: read
            # what is left of it (done above), then move on.
            out.extend(self._read_current())
            self._path, self._offset, self._line = following[0], 0, 1

    def _read_current(self) -> list[ReceiptLine]:
        if self._path is None:
            return []
        try:
            with open(self._path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < self._offset:
                    logger.warning("receipt file shrank; following from its new end",
                                   extra={"fields": {"path": str(self._path)}})
                    self._offset, self._line = _end_of(self._path)
                    return []
                file.seek(self._offset)
                data = _complete(file.read(size - self._offset))
        except FileNotFoundError:
            return []
        lines = list(_lines(self._path, data, self._line, self.selector))
        self._offset += len(data)
        self._line += data.count(b"\n")
        return lines


def follow(directory: StrPath, selector: ReceiptFilter = _EVERYTHING, *, interval: float = 0.5,
           from_start: bool = False, sleep: Callable[[float], None] = time.sleep) -> Iterator[ReceiptLine]:
    """Yield receipts forever as they are written (``meshctl receipts --follow``), polling every ``interval``."""
    follower = Follower(directory, selector, from_start=from_start)
    while True:
        yield from follower.poll()
        sleep(interval)


def _end_of(path: Path) -> tuple[int, int]:
    """(offset after the last complete line, number of the next line)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 1
    try:
        found = last_line(fd, os.fstat(fd).st_size)
        if found is None:
            return 0, 1
        end = found[1]
        count, pos = 0, 0
        while pos < end:
            chunk = os.pread(fd, min(1 << 20, end - pos), pos)
            count += chunk.count(b"\n")
            pos += len(chunk)
        return end, count + 1
    finally:
        os.close(fd)


# --- for the CLI ------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, *, now: float) -> float:
    """``--since``: ``90m``, ``24h``, ``7d`` ago, a date (00:00 UTC) or an ISO date-time (UTC if no offset)."""
    cleaned = text.strip()
    match = _RELATIVE.fullmatch(cleaned.lower())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        if len(cleaned) == 10:
            day = dt.date.fromisoformat(cleaned)
            when = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
        else:
            when = dt.datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"cannot read {text!r}: use e.g. 90m, 24h, 7d, 2026-01-31 or an ISO date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _short_node(node: Any) -> str:
    text = str(node) if node else "-"
    return text[:15] if text.startswith("MESHD-") else text


def format_receipt(record: dict[str, Any]) -> str:
    """One line per receipt for people (``meshctl receipts`` without ``--json``)."""
    route = record.get("route") or {}
    failovers = route.get("failovers") or []
    who = f"{record.get('tenant') or '-'}/{record.get('key_id') or '-'}"
    ttft = record.get("ttft_ms")
    parts = [
        str(record.get("time", "?")),
        f"#{record.get('seq', '?')}",
        who,
        str(record.get("request_type", "?")),
        str(record.get("model", "?")),
        str(record.get("outcome", "?")) + (f"({record['error_code']})" if record.get("error_code") else ""),
        str(record.get("status", "?")),
        f"{record.get('prompt_tokens', 0)}+{record.get('completion_tokens', 0)}tok"
        + ("~" if record.get("tokens_estimated") else ""),
        f"ttft={ttft:.0f}ms" if isinstance(ttft, (int, float)) else "ttft=-",
        f"{record.get('latency_ms', 0):.0f}ms",
        f"via={_short_node(route.get('serving_node'))}",
    ]
    if failovers:
        parts.append(f"failovers={len(failovers)}")
    return " ".join(parts)


__all__ = [
    "Follower",
    "ReceiptFilter",
    "ReceiptLine",
    "follow",
    "format_receipt",
    "iter_receipts",
    "parse_since",
    "read_receipts",
    "tail",
]
