"""The endpoint's UDP socket: large buffers, batched reads and writes, both loops.

Every datagram costs a system call and a loop callback with asyncio's
``DatagramProtocol``; at 1452 bytes, 100 MB/s is ~70,000 of each per second on
each side. This socket is read with ``loop.add_reader`` and drained in bursts,
handing the endpoint a list per wakeup, and written a list at a time:

* batched: qh3's binding of quinn-udp (``UdpSocketState``, Linux/macOS), which
  reads with ``recvmmsg`` + UDP GRO and writes runs of equal-sized datagrams
  with one ``sendmsg`` + UDP GSO. Used with either QUIC engine when qh3 is
  installed (``EngineSettings.batch_io``);
* plain: ``recvfrom`` / ``sendto`` loops, everywhere else.

A full kernel send buffer queues datagrams (bounded; beyond that they are
dropped, as the network would, and QUIC recovers them) until the socket is
writable again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Address = tuple[str, int]
DatagramsHandler = Callable[[list[tuple[bytes, Address]]], None]

RECV_BURST = 64  # reads per readiness callback (each may return many datagrams)
BATCH_FULL = 32  # quinn-udp reads up to 32 messages per recvmmsg; fewer means the socket is drained
MAX_DATAGRAM = 65535
SEND_QUEUE_LIMIT = 8 * 1024 * 1024  # bytes queued in user space while the kernel buffer is full
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# sendmsg errors meaning "this path cannot segment" (GSO unsupported by the device or route).
_NO_GSO = {e for e in (errno.EIO, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOPROTOOPT)}


def _batch_state(sock: socket.socket) -> Any:
    try:
        from qh3._hazmat import UdpSocketState
    except ImportError:
        return None
    try:
        return UdpSocketState(sock.fileno())
    except (NotImplementedError, OSError):
        return None


def set_buffer_sizes(sock: socket.socket, size: int) -> tuple[int, int]:
    """Ask for ``size``-byte receive and send buffers; return what the kernel granted.

    Linux caps SO_RCVBUF/SO_SNDBUF at net.core.{r,w}mem_max; a process with
    CAP_NET_ADMIN may exceed it with the *FORCE variants. Linux reports twice
    the usable size; the values returned here are halved back.
    """
    granted = []
    for option, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            if sock.getsockopt(socket.SOL_SOCKET, option) // 2 < size:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            pass  # capped below what we asked: costs throughput, never correctness
        granted.append(sock.getsockopt(socket.SOL_SOCKET, option) // 2)
    return granted[0], granted[1]


class UdpSocket:
    """A bound, non-blocking UDP socket on the running loop."""

    def __init__(self, sock: socket.socket, on_datagrams: DatagramsHandler, *, batch: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        self._fd = sock.fileno()
        self._on_datagrams = on_datagrams
        self._state = _batch_state(sock) if batch else None
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._queued_bytes = 0
        self._writer = False
        self.closed = False
        self.stats = {"recv_calls": 0, "recv_datagrams": 0, "send_calls": 0, "sent_datagrams": 0,
                      "dropped_datagrams": 0, "send_errors": 0}
        self._loop.add_reader(self._fd, self._readable)

    @property
    def batched(self) -> bool:
        return self._state is not None

    @classmethod
    def bind(cls, host: str, port: int, on_datagrams: DatagramsHandler, *, buffer_bytes: int,
             batch: bool) -> UdpSocket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            rcv, snd = set_buffer_sizes(sock, buffer_bytes)
            if min(rcv, snd) < buffer_bytes:
                log.info("udp buffers smaller than requested (raise net.core.rmem_max / wmem_max)",
                         extra={"fields": {"requested": buffer_bytes, "rcvbuf": rcv, "sndbuf": snd}})
            sock.bind((host, port))
            return cls(sock, on_datagrams, batch=batch)
        except BaseException:
            sock.close()
            raise

    def sockname(self) -> Address:
        return self.sock.getsockname()[:2]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._writer:
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._state = None
        self.sock.close()

    # --- receiving -----------------------------------------------------------------

    def _readable(self) -> None:
        state = self._state
        if state is not None:
            # A control message wakes the socket for one datagram: hand quinn-udp's
            # list on as it is (no burst list, no copy). A full batch means more
            # may be waiting: drain the burst as usual.
            try:
                received = state.recv()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp receive error", extra={"fields": {"error": str(exc)}})
                return
            stats = self.stats
            stats["recv_calls"] += 1
            if len(received) < BATCH_FULL:
                if received:
                    stats["recv_datagrams"] += len(received)
                    self._on_datagrams(received)
                return
            batch = list(received)
        else:
            batch = []
        try:
            if state is not None:
                self._read_batched(batch)
            else:
                self._read_plain(batch)
        except OSError as exc:  # e.g. ICMP port unreachable surfacing as ECONNREFUSED
            log.debug("udp receive error", extra={"fields": {"error": str(exc)}})
        if batch:
            self.stats["recv_datagrams"] += len(batch)
            self._on_datagrams(batch)

    def _read_batched(self, batch: list[tuple[bytes, Address]]) -> None:
        recv = self._state.recv
        for _ in range(RECV_BURST):
            try:
                received = recv()
            except (BlockingIOError, InterruptedError):
                return
            self.stats["recv_calls"] += 1
            batch.extend(received)
            if len(received) < BATCH_FULL:
                return  # drained (if not, the level-triggered reader runs again next iteration)

    def _read_plain(self, batch: list[tuple[bytes, Address]]) -> None:
        recvfrom = self.sock.recvfrom
        for _ in range(RECV_BURST):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            self.stats["recv_calls"] += 1
            batch.append((data, addr[:2]))

    # --- sending -------------------------------------------------------------------

    def send(self, datagrams: list[bytes], addr: Address) -> None:
        if self.closed or not datagrams:
            return
        if self._queue:
            self._enqueue(datagrams, addr)
            return
        sent = self._send_batched(datagrams, addr) if self._state is not None else self._send_plain(datagrams, addr)
        if sent < len(datagrams):
            self._enqueue(datagrams[sent:], addr)

    def _send_batched(self, datagrams: list[bytes], addr: Address) -> int:
        self.stats["send_calls"] += 1
        try:
            sent = self._state.send(datagrams, addr)
        except (BlockingIOError, InterruptedError) as exc:
            sent = getattr(exc, "datagrams_sent", 0)
        except OSError as exc:
            sent = getattr(exc, "datagrams_sent", 0)
            if exc.errno in _NO_GSO:
                self._state.disable_gso()
                log.info("udp segmentation offload unavailable on this path; sending datagrams one by one")
            else:
                self._send_error(exc)
                sent += 1  # skip the datagram the kernel refused (e.g. larger than the path allows)
            return sent + self._send_plain(datagrams[sent:], addr)
        self.stats["sent_datagrams"] += sent
        return sent

    def _send_plain(self, datagrams: list[bytes], addr: Address) -> int:
        sendto = self.sock.sendto
        for index, data in enumerate(datagrams):
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return index
            except OSError as exc:
                self._send_error(exc)
                continue
            self.stats["send_calls"] += 1
            self.stats["sent_datagrams"] += 1
        return len(datagrams)

    def _send_error(self, exc: OSError) -> None:
        self.stats["send_errors"] += 1
        log.debug("udp send error", extra={"fields": {"error": str(exc)}})

    def _enqueue(self, datagrams: list[bytes], addr: Address) -> None:
        for data in datagrams:
            if self._queued_bytes + len(data) > SEND_QUEUE_LIMIT:
                self.stats["dropped_datagrams"] += 1
                continue
            self._queue.append((data, addr))
            self._queued_bytes += len(data)
        if self._queue and not self._writer:
            self._writer = True
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._send_error(exc)
            else:
                self.stats["sent_datagrams"] += 1
            self._queue.popleft()
            self._queued_bytes -= len(data)
        self._writer = False
        self._loop.remove_writer(self._fd)


__all__ = ["UdpSocket", "set_buffer_sizes"]
