"""``verify_chain``: edited, deleted, swapped, duplicated and cut-off lines are found and named,
within a file and across a rotation boundary."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.telemetry import HEAD_FILE_NAME, Receipt, ReceiptWriter, Route, receipt_files, verify_chain

NOW = 1_770_000_000.0


def receipt(i: int) -> Receipt:
    failed = i % 5 == 4
    return Receipt(
        time=NOW + i, request_id=f"req-{i}", request_type="chat.completions", model="smollm2",
        route=Route("MESHD-ENTRY", "MESHD-ENTRY"), outcome="error" if failed else "success",
        status=500 if failed else 200, latency_ms=10.0 + i, key_id="abcdefghijkl", tenant="acme",
        prompt_tokens=10 + i, completion_tokens=i, error_code="backend_error" if failed else None,
    )


def build(directory: Path, count: int = 12, max_file_bytes: int = 2200) -> list[Path]:
    writer = ReceiptWriter(directory, max_file_bytes=max_file_bytes)
    for i in range(count):
        writer.append(receipt(i))
    writer.flush()
    return [path for _, path in receipt_files(directory)]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def edit(line: bytes, *, recompute: bool = False) -> bytes:
    record = json.loads(line)
    record["completion_tokens"] += 1000
    digest = record.pop("hash")
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    if recompute:
        digest = hashlib.sha256(body.encode()).hexdigest()
    return (body[:-1] + f',"hash":"{digest}"}}\n').encode()


@pytest.fixture
def log(tmp_path: Path) -> list[Path]:
    files = build(tmp_path)
    assert len(files) >= 3 and all(len(lines_of(p)) >= 3 for p in files[:-1])
    return files


def first(directory: Path):
    report = verify_chain(directory)
    assert not report.ok
    return report.first


def test_an_intact_log_verifies(log: list[Path]) -> None:
    report = verify_chain(log[0].parent)
    assert report.ok and report.records == 12 and report.files == len(log) and not report.warnings
    assert report.last_seq == 11
    assert json.loads((log[0].parent / HEAD_FILE_NAME).read_text())["hash"] == report.last_hash
    assert report.describe().startswith("OK: 12 receipts")


def test_an_edited_line_is_named(log: list[Path]) -> None:
    lines = lines_of(log[1])
    lines[1] = edit(lines[1])
    write_lines(log[1], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[1], 2, "modified")
    assert log[1].name + " line 2" in str(problem)


def test_an_edited_line_with_its_hash_recomputed_is_named(log: list[Path]) -> None:
    lines = lines_of(log[0])
    lines[1] = edit(lines[1], recompute=True)
    write_lines(log[0], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[0], 2, "modified")


def test_the_last_line_edited_with_its_hash_recomputed_is_caught_by_the_head(log: list[Path]) -> None:
    lines = lines_of(log[-1])
    lines[-1] = edit(lines[-1], recompute=True)
    write_lines(log[-1], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[-1], len(lines), "modified")


def test_a_deleted_line_is_named(log: list[Path]) -> None:
    lines = lines_of(log[0])
    seq = json.loads(lines[1])["seq"]
    del lines[1]
    write_lines(log[0], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[0], 2, "missing")
    assert f"seq {seq}" in problem.message


def test_swapped_lines_are_named(log: list[Path]) -> None:
    lines = lines_of(log[1])
    lines[0], lines[1] = lines[1], lines[0]
    write_lines(log[1], lines)
    report = verify_chain(log[0].parent)
    assert (report.first.path, report.first.line, report.first.kind) == (log[1], 1, "reordered")
    assert len(report.problems) == 1  # one swap, one finding


def test_a_line_moved_further_down_is_named(log: list[Path]) -> None:
    lines = lines_of(log[0])
    moved = lines.pop(0)
    lines.insert(2, moved)
    write_lines(log[0], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[0], 1, "reordered")


def test_a_deleted_last_line_of_a_rotated_file_is_named(log: list[Path]) -> None:
    lines = lines_of(log[0])
    del lines[-1]
    write_lines(log[0], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[1], 1, "missing")
    assert f"from the end of {log[0].name}" in problem.message


def test_a_deleted_first_line_of_a_rotated_file_is_named(log: list[Path]) -> None:
    lines = lines_of(log[1])
    del lines[0]
    write_lines(log[1], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[1], 1, "missing")
    assert f"from the start of {log[1].name}" in problem.message


def test_lines_swapped_across_a_rotation_boundary_are_named(log: list[Path]) -> None:
    left, right = lines_of(log[0]), lines_of(log[1])
    left[-1], right[0] = right[0], left[-1]
    write_lines(log[0], left)
    write_lines(log[1], right)
    report = verify_chain(log[0].parent)
    assert (report.first.path, report.first.line, report.first.kind) == (log[0], len(left), "reordered")
    assert log[1].name in report.first.message


def test_an_edited_first_line_of_a_rotated_file_is_named(log: list[Path]) -> None:
    lines = lines_of(log[2])
    lines[0] = edit(lines[0], recompute=True)
    write_lines(log[2], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[2], 1, "modified")


def test_lines_cut_off_the_end_are_caught_by_the_head(log: list[Path]) -> None:
    lines = lines_of(log[-1])
    write_lines(log[-1], lines[:-1])
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[-1], len(lines), "truncated")
    assert "seq 11" in problem.message


def test_a_removed_newest_file_is_caught_by_the_head(log: list[Path]) -> None:
    log[-1].unlink()
    problem = first(log[0].parent)
    assert problem.kind == "truncated" and problem.path == log[-2]


def test_a_removed_middle_file_is_named(log: list[Path]) -> None:
    log[1].unlink()
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[2], 1, "missing")


def test_removed_oldest_files_fail_unless_pruning_is_allowed(log: list[Path]) -> None:
    log[0].unlink()
    problem = first(log[0].parent)
    assert (problem.path, problem.kind) == (log[1], "missing")
    report = verify_chain(log[0].parent, allow_pruned=True)
    assert report.ok and any("earlier files were removed" in w for w in report.warnings)


def test_a_duplicated_line_is_named(log: list[Path]) -> None:
    lines = lines_of(log[0])
    lines.insert(2, lines[1])
    write_lines(log[0], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[0], 3, "duplicate")


def test_garbage_is_named(log: list[Path]) -> None:
    lines = lines_of(log[1])
    lines.insert(1, b"hello\n")
    write_lines(log[1], lines)
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[1], 2, "malformed")


def test_a_renamed_file_is_named(log: list[Path]) -> None:
    # Move file 1's first record into file 0: the names no longer say where each file starts.
    left, right = lines_of(log[0]), lines_of(log[1])
    write_lines(log[0], left + right[:1])
    write_lines(log[1], right[1:])
    renamed = log[1].with_name(f"receipts-{json.loads(right[1])['seq']:012d}.jsonl")
    log[1].rename(renamed)
    assert verify_chain(log[0].parent).ok  # moving whole lines between files keeps the chain
    shutil.move(renamed, log[1])
    problem = first(log[0].parent)
    assert (problem.path, problem.line, problem.kind) == (log[1], 1, "misnamed")


def test_a_missing_head_is_a_warning(log: list[Path]) -> None:
    (log[0].parent / HEAD_FILE_NAME).unlink()
    report = verify_chain(log[0].parent)
    assert report.ok and any("no head file" in w for w in report.warnings)


def test_an_empty_directory_verifies(tmp_path: Path) -> None:
    report = verify_chain(tmp_path)
    assert report.ok and report.records == 0


# --- every single tampering, anywhere, is found near where it happened --------------------------

_TEMPLATE: list[tuple[str, bytes]] | None = None


def _template() -> list[tuple[str, bytes]]:
    global _TEMPLATE
    if _TEMPLATE is None:
        with tempfile.TemporaryDirectory() as directory:
            build(Path(directory), count=16, max_file_bytes=1800)
            _TEMPLATE = [(p.name, p.read_bytes()) for _, p in receipt_files(directory)]
            _TEMPLATE.append((HEAD_FILE_NAME, (Path(directory) / HEAD_FILE_NAME).read_bytes()))
    return _TEMPLATE


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["edit", "edit-rehash", "delete", "swap"]), position=st.integers(0, 15))
def test_any_single_tampering_is_named(kind: str, position: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for name, data in _template():
            (root / name).write_bytes(data)
        files = [p for _, p in receipt_files(root)]
        flat = [(path, index) for path in files for index in range(len(lines_of(path)))]
        if kind == "swap" and position == len(flat) - 1:
            position -= 1
        path, index = flat[position]
        contents = {p: lines_of(p) for p in files}
        if kind == "edit":
            contents[path][index] = edit(contents[path][index])
        elif kind == "edit-rehash":
            contents[path][index] = edit(contents[path][index], recompute=True)
        elif kind == "delete":
            del contents[path][index]
        else:
            other_path, other_index = flat[position + 1]
            contents[path][index], contents[other_path][other_index] = (
                contents[other_path][other_index], contents[path][index])
        for p, lines in contents.items():
            write_lines(p, lines)
        report = verify_chain(root)
        assert not report.ok
        problem = report.first
        if kind in ("edit", "edit-rehash", "swap"):
            assert (problem.path, problem.line) == (path, index + 1)
        elif position + 1 < len(flat):  # a deleted line: named where its successor now stands
            successor_path, successor_index = flat[position + 1]
            expected_line = successor_index + 1 - (1 if successor_path == path else 0)
            assert (problem.path, problem.line, problem.kind) == (successor_path, expected_line, "missing")
        else:
            assert problem.kind == "truncated"
