"""``verify_chain``: walk every receipt file in order and name the first line that was tampered with.

What is caught, and how it is named:

- a line edited in place: its content no longer matches its own ``hash``
  (``modified``, that line);
- a line edited with its ``hash`` recomputed: the next line's ``prev`` (or
  the head, for the last line) no longer matches (``modified``, that line);
- a line removed: a gap in ``seq`` (``missing``, the line after the gap;
  "from the end of <file>" when it was the last line of a rotated file);
- lines swapped or moved: a ``seq`` that comes early, whose predecessor
  turns up a few lines later (``reordered``, the first out-of-place line);
- lines cut off the end of the log: the head file names a later record
  (``truncated``); a whole missing file shows as a gap, or as a chain that
  does not start at seq 0 (unless ``allow_pruned``: old files removed on purpose);
- a line that is not a receipt at all (``malformed``).

After a problem the walk resynchronizes on the next line and goes on, so the
report lists further independent problems too (up to ``max_problems``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .logfiles import Head, HeadUnreadable, read_head, receipt_files
from .receipts import GENESIS_HASH, DecodedLine, LineMalformed, decode_line


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """One finding: where (file and 1-based line), what kind, and why."""

    path: Path | None
    line: int | None
    kind: str
    message: str
    seq: int | None = None

    def __str__(self) -> str:
        where = self.path.name if self.path is not None else "receipts"
        if self.line is not None:
            where += f" line {self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    directory: Path
    files: int
    records: int
    problems: tuple[ChainProblem, ...] = ()
    warnings: tuple[str, ...] = ()
    last_seq: int | None = None
    last_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> ChainProblem | None:
        return self.problems[0] if self.problems else None

    def describe(self) -> str:
        """The text ``meshctl receipts verify`` prints."""
        if self.ok:
            tail = f"; last seq {self.last_seq}, hash {self.last_hash}" if self.last_seq is not None else ""
            lines = [f"OK: {self.records} receipts in {self.files} files, chain intact{tail}"]
        else:
            lines = [f"FAILED: {len(self.problems)} problem(s) in {self.files} files; first: {self.problems[0]}"]
            lines += [f"  {problem}" for problem in self.problems[1:]]
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)


@dataclass(slots=True)
class _Item:
    path: Path
    line: int
    file_seq: int  # the first seq the file's name promises
    first_in_file: bool
    decoded: DecodedLine | None = None
    error: str | None = None
    unfinished: bool = False  # no newline at the end of the newest file: a write in progress or a crash

    @property
    def seq(self) -> int | None:
        return self.decoded.seq if self.decoded is not None else None


def _items(files: list[tuple[int, Path]], unreadable: Callable[[Path, OSError], None]) -> Iterator[_Item]:
    for index, (file_seq, path) in enumerate(files):
        newest = index == len(files) - 1
        try:
            handle = open(path, "rb")  # noqa: SIM115 - the generator closes it below
        except OSError as exc:
            unreadable(path, exc)
            continue
        with handle:
            for number, raw in enumerate(handle, start=1):
                item = _Item(path, number, file_seq, number == 1)
                if not raw.endswith(b"\n"):
                    item.unfinished = newest
                    item.error = "the last line is unfinished"
                else:
                    try:
                        item.decoded = decode_line(raw[:-1])
                    except LineMalformed as exc:
                        item.error = str(exc)
                yield item


class _Lookahead:
    def __init__(self, items: Iterator[_Item]) -> None:
        self._items = items
        self._buffer: deque[_Item] = deque()

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> _Item:
        return self._buffer.popleft() if self._buffer else next(self._items)

    def find_seq(self, seq: int, limit: int) -> _Item | None:
        for index in range(limit):
            if index >= len(self._buffer):
                try:
                    self._buffer.append(next(self._items))
                except StopIteration:
                    return None
            if self._buffer[index].seq == seq:
                return self._buffer[index]
        return None


@dataclass(slots=True)
class _Walk:
    """State of the walk: what the next line should be, and what was found."""

    expected_seq: int = 0
    expected_prev: str | None = GENESIS_HASH  # None: unknown (after a resync)
    last: _Item | None = None
    records: int = 0
    problems: list[ChainProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    displaced: set[tuple[Path, int]] = field(default_factory=set)
    at_head: _Item | None = None

    def problem(self, item: _Item | None, kind: str, message: str) -> None:
        self.problems.append(ChainProblem(
            item.path if item else None, item.line if item else None, kind, message,
            item.seq if item else None,
        ))


def verify_chain(directory: str | os.PathLike[str], *, allow_pruned: bool = False, lookahead: int = 256,
                 max_problems: int = 100) -> VerifyReport:
    """Check every receipt file under ``directory`` and the head; never raises for bad content."""
    root = Path(directory)
    files = receipt_files(root)
    walk = _Walk()
    if files and files[0][0] != 0:
        if allow_pruned:
            walk.warnings.append(f"the log starts at seq {files[0][0]}; earlier files were removed")
        else:
            walk.problems.append(ChainProblem(
                files[0][1], None, "missing",
                f"the log starts at seq {files[0][0]}: the files before it are missing "
                "(use allow_pruned / --allow-pruned if they were removed on purpose)",
            ))
        walk.expected_seq, walk.expected_prev = files[0][0], None
    try:
        head = read_head(root)
    except HeadUnreadable as exc:
        walk.problems.append(ChainProblem(root, None, "head", f"the head file is unreadable: {exc}"))
        head = None

    def unreadable(path: Path, exc: OSError) -> None:
        walk.problems.append(ChainProblem(path, None, "unreadable", f"cannot read the file: {exc.strerror}"))

    stream = _Lookahead(_items(files, unreadable))
    for item in stream:
        if len(walk.problems) >= max_problems:
            walk.warnings.append(f"stopped after {max_problems} problems")
            break
        _check(item, walk, stream, lookahead)
        if head is not None and item.seq == head.seq and item.decoded is not None:
            walk.at_head = item
    _check_head(walk, head, files)
    last = walk.last.decoded if walk.last is not None and walk.last.decoded is not None else None
    return VerifyReport(
        directory=root,
        files=len(files),
        records=walk.records,
        problems=tuple(walk.problems),
        warnings=tuple(walk.warnings),
        last_seq=last.seq if last else None,
        last_hash=last.hash if last else None,
    )


def _check(item: _Item, walk: _Walk, stream: _Lookahead, lookahead: int) -> None:
    if item.decoded is None:
        if item.unfinished:
            walk.warnings.append(f"{item.path.name} line {item.line} is unfinished (a write in progress, or a "
                                 "crash: the writer cuts it off when it starts)")
            return
        walk.problem(item, "malformed", f"not a receipt line: {item.error}")
        walk.expected_seq, walk.expected_prev, walk.last = walk.expected_seq + 1, None, None
        return
    decoded = item.decoded
    if not decoded.hash_ok:
        walk.problem(item, "modified",
                     f"the line was edited: its content no longer matches its hash (seq {decoded.seq})")
    if (item.path, item.line) in walk.displaced:
        return  # already reported as reordered
    expected = walk.expected_seq
    name_ok = not item.first_in_file or decoded.seq == item.file_seq
    if decoded.seq == expected:
        if walk.expected_prev is not None and decoded.prev != walk.expected_prev:
            last = walk.last
            if last is not None and last.decoded is not None and last.decoded.hash_ok:
                walk.problem(last, "modified", (
                    f"the line was edited (with its hash recomputed): {_where(item, last)} line {item.line} "
                    f"records a different hash for seq {last.decoded.seq}"))
            elif last is None:
                walk.problem(item, "modified", "prev does not match the start of the chain")
        if not name_ok:
            walk.problem(item, "misnamed", f"{item.path.name} is named for seq {item.file_seq} but starts with "
                                           f"seq {decoded.seq}")
    elif decoded.seq > expected:
        moved = stream.find_seq(expected, lookahead)
        if moved is not None:
            walk.displaced.add((moved.path, moved.line))
            walk.problem(item, "reordered", (
                f"out of order: seq {decoded.seq} comes before seq {expected}, which is at "
                f"{_where(moved, item)}line {moved.line}"))
        else:
            gap = decoded.seq - expected
            span = f"seq {expected}" if gap == 1 else f"seq {expected}-{decoded.seq - 1}"
            where = ""
            if item.first_in_file and decoded.seq == item.file_seq and walk.last is not None:
                where = f" from the end of {walk.last.path.name}"
            elif item.first_in_file:
                where = f" from the start of {item.path.name}"
            walk.problem(item, "missing", f"{gap} record(s) missing{where} before this line ({span}): deleted")
    else:
        last = walk.last
        if last is not None and last.decoded is not None and decoded.hash == last.decoded.hash:
            walk.problem(item, "duplicate", f"a copy of the line before it (seq {decoded.seq})")
        else:
            walk.problem(item, "reordered", f"out of order: seq {decoded.seq} comes after seq {expected - 1}")
        return  # keep the chain state of the line before
    walk.expected_seq, walk.expected_prev, walk.last = decoded.seq + 1, decoded.hash, item
    walk.records += 1


def _where(item: _Item, relative_to: _Item) -> str:
    return "" if item.path == relative_to.path else f"{item.path.name} "


def _check_head(walk: _Walk, head: Head | None, files: list[tuple[int, Path]]) -> None:
    last = walk.last
    last_seq = last.seq if last is not None else None
    if head is None:
        if walk.records:
            walk.warnings.append("no head file: records cut off the end of the log would go unnoticed")
        return
    if last_seq is None or head.seq > last_seq:
        missing = head.seq + 1 if last_seq is None else head.seq - last_seq
        path = last.path if last is not None else (files[-1][1] if files else None)
        line = last.line + 1 if last is not None else None
        walk.problems.append(ChainProblem(
            path, line, "truncated",
            f"{missing} record(s) missing from the end of the log: the head says the last is seq {head.seq}",
        ))
        return
    at_head = walk.at_head
    if at_head is None or at_head.decoded is None:
        return  # the record at the head's seq was itself reported missing
    if at_head.decoded.hash != head.hash and at_head.decoded.hash_ok:
        walk.problem(at_head, "modified", "the line was edited (with its hash recomputed): it does not match the head")
    if head.seq < last_seq:
        walk.warnings.append(
            f"{last_seq - head.seq} record(s) after the head (seq {head.seq}); the writer stopped before "
            "updating it, or it is still writing"
        )


__all__ = ["ChainProblem", "VerifyReport", "verify_chain"]
