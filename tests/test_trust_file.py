"""The trust file codec: round trips, and every problem reported with its line."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from identity import NodeKey
from peers import Role, TrustEntry, TrustFileError, parse_trust_file, render_trust_file
from peers.trust_file import toml_string

PATH = Path("/state/trust.toml")
A = NodeKey.from_seed(b"\x41" * 32).node_id
B = NodeKey.from_seed(b"\x42" * 32).node_id


def _parse(text: str) -> dict:
    return parse_trust_file(text, path=PATH)


def _error(text: str) -> TrustFileError:
    with pytest.raises(TrustFileError) as info:
        _parse(text)
    return info.value


def test_documented_example_parses() -> None:
    text = f"""
version = 1

[peers.{A}]
name = "laptop"
roles = ["serve", "use"]
added_at = 2025-03-01T09:30:00Z
added_by = "meshctl (uid 1000)"
note = "Alice's laptop"

[peers."{str(B).lower().replace("-", "")}"]
roles = ["tensor"]
"""
    entries = _parse(text)
    assert entries[A].name == "laptop"
    assert entries[A].roles == {Role.SERVE, Role.USE}
    assert entries[A].added_at == dt.datetime(2025, 3, 1, 9, 30, tzinfo=dt.timezone.utc)
    assert entries[A].note == "Alice's laptop"
    assert entries[B].roles == {Role.TENSOR} and entries[B].name == "" and entries[B].added_at is None


def test_empty_file_means_no_peers() -> None:
    assert _parse("") == {}
    assert _parse("version = 1\n") == {}


def test_rendered_file_is_valid_toml_with_a_header() -> None:
    entry = TrustEntry(A, name="x", roles=frozenset({Role.USE, Role.SERVE}))
    text = render_trust_file([entry])
    assert text.startswith("# meshd trust store")
    assert f"[peers.{A}]" in text and 'roles = ["serve", "use"]' in text
    assert tomllib.loads(text)["peers"][str(A)]["name"] == "x"


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ('version = 1\n[peers.X\nname = "a"\n', 2, "not valid TOML"),
        ('version = 1\n\n[peers.{A}]\nname = "unterminated\n', 4, "not valid TOML"),
        ('version = 1\n\n[peers.{A}]\nroles = ["serve", "sever"]\n', 4, "unknown role 'sever'"),
        ('version = 1\n\n[peers.{A}]\nname = "a"\nrole = ["serve"]\n', 5, "unknown key 'role'"),
        ("version = 1\n\n[peers.{A}]\nname = 5\n", 4, "name must be a string"),
        ('version = 1\n\n[peers.{A}]\nroles = "serve"\n', 4, "roles must be a list"),
        ('version = 1\n\n[peers.{A}]\nadded_at = "yesterday"\n', 4, "added_at"),
        ('version = 1\n\n[peers.{A}]\nname = "a"\n\n[peers.MESHD-ABCD]\nname = "b"\n', 6, "characters"),
        ('version = 1\n\n[peers.{A}]\nname = "a"\n\n[peers.{a_lower}]\nname = "b"\n', 6, "listed twice"),
        ('version = 1\n\n[peer.{A}]\nname = "a"\n', 3, "unknown top-level key 'peer'"),
        ("version = 2\n", 1, "unsupported version"),
        ("version = 1\npeers = 3\n", 2, "must be a table"),
        ('version = 1\n\n[peers.{A}]\nname = "two\\nlines"\n', 3, "single line"),
    ],
)
def test_problems_are_reported_with_their_line(body: str, line: int, words: str) -> None:
    text = body.replace("{A}", str(A)).replace("{a_lower}", str(A).lower())
    error = _error(text)
    assert error.line == line, error.message
    assert words in error.message
    assert f"{PATH}, line {line}" in error.message
    assert "\n" not in error.message


def test_single_character_typo_in_an_id_is_caught_by_the_check_character() -> None:
    typo = str(A)[:-1] + ("A" if str(A)[-1] != "A" else "B")
    error = _error(f'version = 1\n\n[peers.{typo}]\nname = "a"\n')
    assert error.line == 3 and "check character" in error.message


def test_naive_time_is_read_as_utc() -> None:
    entries = _parse(f"[peers.{A}]\nadded_at = 2025-03-01T09:30:00\n")
    assert entries[A].added_at == dt.datetime(2025, 3, 1, 9, 30, tzinfo=dt.timezone.utc)


def test_offset_time_is_normalised_to_utc() -> None:
    entries = _parse(f"[peers.{A}]\nadded_at = 2025-03-01T11:30:00+02:00\n")
    assert entries[A].added_at == dt.datetime(2025, 3, 1, 9, 30, tzinfo=dt.timezone.utc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=50))
def test_toml_string_round_trips_through_tomllib(value: str) -> None:
    assert tomllib.loads(f"x = {toml_string(value)}")["x"] == value


single_line = st.text(max_size=40).filter(lambda s: "\r" not in s and "\n" not in s)
entries = st.builds(
    TrustEntry,
    node_id=st.binary(min_size=32, max_size=32).map(lambda k: NodeKey.from_seed(k).node_id),
    name=single_line,
    roles=st.frozensets(st.sampled_from(list(Role))),
    added_at=st.none() | st.datetimes(timezones=st.just(dt.timezone.utc)),
    added_by=single_line,
    note=st.text(max_size=80),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(entries, max_size=5, unique_by=lambda e: e.node_id))
def test_render_then_parse_is_the_identity(items: list[TrustEntry]) -> None:
    parsed = _parse(render_trust_file(items))
    assert list(parsed.values()) == items
