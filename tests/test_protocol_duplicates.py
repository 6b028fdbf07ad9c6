"""The duplicate-connection tie-break (meshd.protocol.duplicates)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.protocol import LocalProtocolError, connection_survives, preferred_initiator

node_ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=1, max_size=40)


@given(a=node_ids, b=node_ids)
@settings(max_examples=200, deadline=None)
def test_both_sides_keep_the_same_single_connection(a: str, b: str) -> None:
    if a == b:
        return
    # Connection 1 was dialled by a, connection 2 by b. Each node judges both from its own view.
    a_keeps_1 = connection_survives(a, b, initiated_locally=True)
    b_keeps_1 = connection_survives(b, a, initiated_locally=False)
    a_keeps_2 = connection_survives(a, b, initiated_locally=False)
    b_keeps_2 = connection_survives(b, a, initiated_locally=True)
    assert a_keeps_1 == b_keeps_1  # the two ends agree about connection 1 ...
    assert a_keeps_2 == b_keeps_2  # ... and about connection 2
    assert a_keeps_1 != a_keeps_2  # exactly one of the two survives
    assert preferred_initiator(a, b) == preferred_initiator(b, a)


def test_the_lower_id_dials_the_survivor() -> None:
    assert preferred_initiator("BBBB", "AAAA") == "AAAA"
    assert connection_survives("AAAA", "BBBB", initiated_locally=True)
    assert not connection_survives("BBBB", "AAAA", initiated_locally=True)


def test_a_node_cannot_duplicate_itself() -> None:
    with pytest.raises(LocalProtocolError):
        connection_survives("AAAA", "AAAA", initiated_locally=True)
