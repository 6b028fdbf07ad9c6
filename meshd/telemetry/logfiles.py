"""The receipt directory layout, shared by the writer, the readers and ``verify_chain``.

::

    <dir>/receipts-000000000000.jsonl   records seq 0 ... (named by their first seq)
    <dir>/receipts-000000120411.jsonl   ... the next file, started when the previous one was full
    <dir>/receipts.head                 {"v": 1, "seq": ..., "hash": ..., "file": ..., "line": ...}

Files are never renamed: the newest file is the one being appended to, and
sorting by name is chain order. The head file anchors the end of the chain
(it is replaced atomically after every flush), so cutting records off the end
is detected too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from identity.statedir import PRIVATE_FILE_MODE, atomic_write

FILE_PATTERN = re.compile(r"receipts-(\d{12})\.jsonl")
HEAD_FILE_NAME = "receipts.head"
DIR_MODE = 0o700


def file_name(first_seq: int) -> str:
    return f"receipts-{first_seq:012d}.jsonl"


def receipt_files(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(first seq from the name, path) of every receipt file, in chain order."""
    root = Path(directory)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), root / name) for name in names if (m := FILE_PATTERN.fullmatch(name))]
    return sorted(found)


def ensure_dir(directory: str | os.PathLike[str]) -> Path:
    root = Path(directory)
    if not root.is_dir():
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(root, DIR_MODE)  # mkdir's mode is filtered by the umask
    return root


@dataclass(frozen=True, slots=True)
class Head:
    """The last record the writer made durable."""

    seq: int
    hash: str
    file: str
    line: int

    def to_json(self) -> bytes:
        return json.dumps({"v": 1, "seq": self.seq, "hash": self.hash, "file": self.file, "line": self.line},
                          sort_keys=True).encode("ascii") + b"\n"


def write_head(directory: Path, head: Head) -> None:
    atomic_write(directory / HEAD_FILE_NAME, head.to_json(), mode=PRIVATE_FILE_MODE)


class HeadUnreadable(ValueError):
    pass


def read_head(directory: str | os.PathLike[str]) -> Head | None:
    """The head, None if there is none; ``HeadUnreadable`` if it exists but makes no sense."""
    path = Path(directory) / HEAD_FILE_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HeadUnreadable(f"{path}: {exc}") from None
    try:
        head = Head(seq=data["seq"], hash=data["hash"], file=data["file"], line=data["line"])
    except (KeyError, TypeError):
        raise HeadUnreadable(f"{path}: missing fields") from None
    if type(head.seq) is not int or not isinstance(head.hash, str) or not isinstance(head.file, str):
        raise HeadUnreadable(f"{path}: fields of the wrong type")
    return head


def last_line(fd: int, size: int) -> tuple[bytes, int] | None:
    """The last complete (newline-terminated) line of an open file, without its newline,
    and the offset just past that newline (anything after it is an unfinished write).

    None if the file holds no complete line. Reads backwards in blocks.
    """
    buf = b""
    pos = size
    while True:
        newline = buf.rfind(b"\n")
        if newline >= 0:
            previous = buf.rfind(b"\n", 0, newline)
            if previous >= 0 or pos == 0:
                return buf[previous + 1 : newline], pos + newline + 1
        elif pos == 0:
            return None
        start = max(0, pos - 65536)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start


__all__ = [
    "FILE_PATTERN",
    "HEAD_FILE_NAME",
    "Head",
    "HeadUnreadable",
    "ensure_dir",
    "file_name",
    "last_line",
    "read_head",
    "receipt_files",
    "write_head",
]
