"""The pure text helpers of the token loop: stop sequences and UTF-8 boundaries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.backends.llama_engine import find_stop, stop_holdback, utf8_safe_end


def test_find_stop_takes_the_earliest_hit():
    assert find_stop(b"abc END xyz STOP", [b"STOP", b"END"]) == 4
    assert find_stop(b"nothing", [b"STOP"]) == -1
    assert find_stop(b"x", []) == -1


def test_holdback_keeps_a_possible_stop_prefix():
    assert stop_holdback(b"hello wor", [b"world"]) == 3
    assert stop_holdback(b"hello", [b"world"]) == 0
    assert stop_holdback(b"ab", [b"abc", b"b"]) == 2


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="abc ", max_size=24), st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3))
def test_incremental_emission_never_sends_part_of_a_stop(text, stops):
    """Simulate the token loop byte by byte: bytes that turn out to start a stop
    sequence were never emitted, and emitted text never contains a stop."""
    data, stops_b = text.encode(), [s.encode() for s in stops]
    emitted = b""
    for size in range(1, len(data) + 1):
        seen = data[:size]
        hit = find_stop(seen, stops_b)
        if hit >= 0:
            assert hit >= len(emitted), (seen, emitted)
            emitted = seen[:hit]
            break
        end = len(seen) - stop_holdback(seen, stops_b)
        emitted = seen[:max(end, len(emitted))]
        assert find_stop(emitted, stops_b) < 0
    else:
        emitted = data
    assert find_stop(emitted, stops_b) < 0


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=30), st.data())
def test_utf8_safe_end_always_decodes(text, data):
    raw = text.encode()
    end = data.draw(st.integers(min_value=0, max_value=len(raw)))
    safe = utf8_safe_end(raw, end)
    assert 0 <= safe <= end
    raw[:safe].decode("utf-8")  # never raises
    assert end - safe <= 3  # only an incomplete character is held back
