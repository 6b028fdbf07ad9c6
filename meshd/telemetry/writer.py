"""The receipt writer: cheap ``append`` on the hot path, batched ``flush`` with fsync.

``append`` only queues the receipt (no I/O, no serialization). ``flush``
numbers and chains the queued receipts, writes them, fsyncs, rotates files by
size on a line boundary (the first record of a new file carries the hash of
the last record of the previous one, like any other record) and then updates
the head file. The daemon calls ``await writer.aflush()`` from a periodic
task (it runs ``flush`` in a worker thread, so an fsync never stalls the
event loop) and ``flush()`` once more at shutdown.

A failed write (disk full) is rolled back to the last complete line and the
receipts stay queued for the next flush, so the chain never skips a number.
If the queue reaches ``max_pending`` new receipts are dropped and counted in
``dropped`` (and logged): memory is bounded even if the disk never recovers.

Sequence numbers follow ``append`` order (usually completion order), while
``time`` is when the request arrived, so ``time`` is not monotonic in ``seq``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ReceiptLogCorrupt
from .logfiles import Head, ensure_dir, file_name, last_line, receipt_files, write_head
from .receipts import GENESIS_HASH, LineMalformed, Receipt, decode_line, encode_line

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PENDING = 100_000
_FILE_MODE = 0o600


@dataclass(slots=True)
class _Tip:
    """Where the chain ends: the next seq, the last hash, and the file being appended to."""

    next_seq: int = 0
    last_hash: str = GENESIS_HASH
    path: Path | None = None
    size: int = 0
    lines: int = 0


@dataclass(slots=True)
class _Segment:
    path: Path
    new: bool
    lines: list[bytes] = field(default_factory=list)
    tip: _Tip = field(default_factory=_Tip)  # the chain's end once this segment is written


class ReceiptWriter:
    """Appends receipts to ``directory`` (created 0700; files 0600)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_file_bytes < 1 or max_pending < 1:
            raise ValueError("max_file_bytes and max_pending must be positive")
        self.directory = ensure_dir(directory)
        self.max_file_bytes = max_file_bytes
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self._pending: deque[Receipt] = deque()
        self._lock = threading.Lock()  # one flush at a time; append never takes it
        self._tip = self._recover()

    # --- the hot path ---------------------------------------------------------------------

    def append(self, receipt: Receipt) -> bool:
        """Queue a receipt; False (and counted in ``dropped``) if the queue is full."""
        if not isinstance(receipt, Receipt):
            raise TypeError(f"expected a Receipt, got {type(receipt).__name__}")
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # log at 1, 2, 4, 8, ... drops
                logger.error("receipt queue full; receipts are being dropped",
                             extra={"fields": {"dropped": self.dropped, "max_pending": self.max_pending}})
            return False
        self._pending.append(receipt)
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record written; (-1, GENESIS_HASH) before the first."""
        return self._tip.next_seq - 1, self._tip.last_hash

    # --- flushing ---------------------------------------------------------------------------

    async def aflush(self) -> int:
        """``flush`` in a worker thread (for the daemon's periodic task)."""
        return await asyncio.to_thread(self.flush)

    def close(self) -> int:
        return self.flush()

    def flush(self) -> int:
        """Write, fsync and chain everything queued; return how many receipts were written.

        Raises ``OSError`` if writing failed; what was not written stays queued.
        """
        with self._lock:
            batch: list[Receipt] = []
            while True:
                try:
                    batch.append(self._pending.popleft())
                except IndexError:
                    break
            if not batch:
                return 0
            segments = self._plan(batch)
            done = 0
            try:
                for segment in segments:
                    self._write_segment(segment)
                    self._tip = segment.tip
                    done += len(segment.lines)
            except OSError:
                for receipt in reversed(batch[done:]):
                    self._pending.appendleft(receipt)
                raise
            finally:
                if done:
                    self.written += done
                    self._write_head()
            return done

    def _plan(self, batch: list[Receipt]) -> list[_Segment]:
        tip = replace(self._tip)
        segments: list[_Segment] = []
        current: _Segment | None = None
        for receipt in batch:
            line, digest = encode_line(receipt.body(seq=tip.next_seq, prev=tip.last_hash))
            if tip.path is None or (tip.size > 0 and tip.size + len(line) > self.max_file_bytes):
                tip.path, tip.size, tip.lines = self.directory / file_name(tip.next_seq), 0, 0
                current = None
            if current is None:
                current = _Segment(tip.path, new=tip.size == 0 and not tip.path.exists())
                segments.append(current)
            current.lines.append(line)
            tip.next_seq += 1
            tip.last_hash = digest
            tip.size += len(line)
            tip.lines += 1
            current.tip = _Tip(tip.next_seq, tip.last_hash, tip.path, tip.size, tip.lines)
        return segments

    def _write_segment(self, segment: _Segment) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(segment.path, flags, _FILE_MODE)
        start = os.fstat(fd).st_size
        try:
            if segment.new:
                os.fchmod(fd, _FILE_MODE)  # the umask may have filtered the creation mode
            view = memoryview(b"".join(segment.lines))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # Leave the file as it was, so the chain still ends on a complete line.
            try:
                os.ftruncate(fd, start)
                if segment.new and start == 0:
                    os.unlink(segment.path)
            except OSError as cleanup:
                logger.error("could not roll back a failed receipt write",
                             extra={"fields": {"path": str(segment.path), "error": str(cleanup)}})
            raise
        finally:
            os.close(fd)
        if segment.new:
            _fsync_dir(self.directory)

    def _write_head(self) -> None:
        tip = self._tip
        if tip.path is None:
            return
        try:
            write_head(self.directory, Head(tip.next_seq - 1, tip.last_hash, tip.path.name, tip.lines))
        except OSError as exc:
            # The records are durable; only the end-of-chain anchor lags (verify warns about that).
            logger.error("could not update the receipt head", extra={"fields": {"error": str(exc)}})

    # --- start-up -----------------------------------------------------------------------------

    def _recover(self) -> _Tip:
        """Find the end of the chain; cut off a line left half-written by a crash."""
        files = receipt_files(self.directory)
        empty_newest: tuple[int, Path] | None = None
        for first_seq, path in reversed(files):
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                found = last_line(fd, size)
                end = found[1] if found is not None else 0
                if end < size:
                    logger.warning("cutting off an unfinished receipt line (crash during a write?)",
                                   extra={"fields": {"path": str(path), "bytes": size - end}})
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                if found is None:
                    if empty_newest is None and path == files[-1][1]:
                        empty_newest = (first_seq, path)
                    continue
                try:
                    decoded = decode_line(found[0])
                except LineMalformed as exc:
                    raise ReceiptLogCorrupt(
                        f"the last receipt in {path} cannot be read ({exc}); run `meshctl receipts verify`",
                        path=path,
                    ) from None
                lines = _count_lines(fd, end)
            finally:
                os.close(fd)
            tip = _Tip(decoded.seq + 1, decoded.hash, path, end, lines)
            if empty_newest is not None:
                if empty_newest[0] != tip.next_seq:
                    raise ReceiptLogCorrupt(
                        f"{empty_newest[1]} is empty but named for seq {empty_newest[0]}; the chain ends at "
                        f"seq {decoded.seq}", path=empty_newest[1])
                tip = _Tip(tip.next_seq, tip.last_hash, empty_newest[1], 0, 0)
            return tip
        if empty_newest is not None and empty_newest[0] != 0:
            raise ReceiptLogCorrupt(f"{empty_newest[1]} is empty and no earlier receipts exist",
                                    path=empty_newest[1])
        return _Tip(0, GENESIS_HASH, empty_newest[1] if empty_newest else None, 0, 0)


def _count_lines(fd: int, size: int) -> int:
    count, pos = 0, 0
    while pos < size:
        chunk = os.pread(fd, min(1 << 20, size - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DEFAULT_MAX_FILE_BYTES", "DEFAULT_MAX_PENDING", "ReceiptWriter"]
