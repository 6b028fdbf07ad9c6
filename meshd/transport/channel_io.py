"""Small asyncio pieces for code that drives channels on a live ``PeerLink``.

Cache transfers (``meshd/kvcache/transfer.py``) and split tunnels
(``meshd/split/tunnel.py``) both wait for a peer's answer to a channel they
opened and pace their sends by the stream's bounded send buffer; these are
those two steps, written once.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["settle", "wait_writable"]


def settle(future: asyncio.Future | None, value: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` with ``value``, or fail it with ``error``; a settled or absent future is left alone.

    A failure is marked retrieved: the waiter may have gone away, and an
    unretrieved exception would only be logged at garbage collection.
    """
    if future is None or future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
        future.exception()


async def wait_writable(session: Any, stream_id: int, writable: asyncio.Event) -> None:
    """Return once the stream's send buffer takes data; ``writable`` is set on ``StreamWritable``."""
    while not session.is_writable(stream_id):
        writable.clear()
        await writable.wait()
