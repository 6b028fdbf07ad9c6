"""The QUIC engine seam: everything meshd takes from a QUIC library comes through here.

Two engines share aioquic's sans-IO API shape: aioquic (pure Python, the
design's reference) and qh3 (an aioquic fork with a Rust packet core, the
optional ``meshd[fast]`` extra). An engine builds configurations from the
node's TLS identity and creates connections that also answer the three
questions the glue asks (``MeshConnection``). The UDP endpoint, the timers
and batching live in endpoint.py, udp.py and link.py, identical for both.

The default engine is chosen once, at import: qh3 when installed and usable,
else aioquic. A node that wants a specific engine says so in its settings
(``EngineSettings(engine=...)``, from ``mesh.engine`` / ``MESHD_QUIC_ENGINE``
in the daemon's configuration).
"Usable" means a complete mutual-TLS handshake with Ed25519 certificates
succeeds in memory, because qh3 support leans on its internals (qh3_tls.py).
Both engines interoperate; a node may run either.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from identity import NodeKey, TlsIdentity, create_certificate

from .engine_aioquic import AioquicEngine
from .errors import EngineUnavailable
from .packets import destination_cid
from .settings import ALPN, CONNECTION_ID_LENGTH, EngineSettings

log = logging.getLogger(__name__)


class MeshConnection(Protocol):
    """A sans-IO QUIC connection as the glue uses it (aioquic's API, plus four helpers)."""

    host_cid: bytes

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...
    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def close(self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = "") -> None: ...
    def peer_certificate(self) -> Any: ...
    def stream_backlog(self, stream_id: int) -> int: ...
    def stream_data_queued(self) -> bool: ...


class QuicEngine(Protocol):
    name: str
    events: Any  # the engine's event classes: HandshakeCompleted, StreamDataReceived, ...

    def configuration(self, tls: TlsIdentity, settings: EngineSettings, *, is_client: bool) -> Any: ...
    def connect(self, configuration: Any, addr: tuple[str, int], now: float) -> MeshConnection: ...
    def accept(self, configuration: Any, original_cid: bytes) -> MeshConnection: ...


_loaded: dict[str, QuicEngine] = {}
# Why an engine could not be loaded: the answer does not change within a process
# (an import or a self-test that failed once fails again), so it is asked once.
_unavailable: dict[str, EngineUnavailable] = {}


def load_engine(name: str) -> QuicEngine:
    """The engine called ``name``, or ``EngineUnavailable`` saying why not."""
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        raise EngineUnavailable(_unavailable[name].message)
    try:
        if name == "aioquic":
            engine: QuicEngine = AioquicEngine()
        elif name == "qh3":
            engine = _load_qh3()
        else:
            raise EngineUnavailable(f"unknown QUIC engine {name!r} (expected aioquic or qh3)")
    except EngineUnavailable as exc:
        _unavailable[name] = exc
        raise
    _loaded[name] = engine
    return engine


def _load_qh3() -> QuicEngine:
    try:
        from . import engine_qh3
    except ImportError as exc:
        raise EngineUnavailable(f"qh3 is not installed (pip install 'meshd[fast]'): {exc}") from exc
    if not engine_qh3.version_supported():
        raise EngineUnavailable(f"qh3 {engine_qh3.VERSION} is too old; meshd needs qh3>=2.1")
    engine = engine_qh3.Qh3Engine()
    reference = load_engine("aioquic")
    try:
        # qh3 with itself, and both ways with aioquic: every pairing a mesh can contain.
        for client, server in ((engine, engine), (reference, engine), (engine, reference)):
            handshake_in_memory(client, server)
    except Exception as exc:  # any failure here means "do not use this qh3"
        raise EngineUnavailable(f"qh3 {engine_qh3.VERSION} failed the mutual-TLS self-test: {exc!r}") from exc
    return engine


def select_engine(choice: str) -> QuicEngine:
    """Resolve an engine choice (auto | aioquic | qh3); auto never fails."""
    if choice != "auto":
        return load_engine(choice)
    try:
        return load_engine("qh3")
    except EngineUnavailable as exc:
        log.info("using the aioquic QUIC engine", extra={"fields": {"reason": exc.message}})
        return load_engine("aioquic")


# --- in-memory handshake: the self-test, and a cheap interop check for tests ----------------


def ephemeral_identity(now: float | None = None) -> TlsIdentity:
    """A throwaway node identity held in memory (tests, self-tests)."""
    key = NodeKey.generate()
    certificate = create_certificate(key, now=time.time() if now is None else now,
                                     validity=dt.timedelta(days=1))
    return TlsIdentity(node_id=key.node_id, certificate=certificate, private_key=key.to_cryptography(),
                       certificate_path=Path("/dev/null"), private_key_path=Path("/dev/null"))


def handshake_in_memory(client_engine: QuicEngine, server_engine: QuicEngine, *,
                        client_tls: TlsIdentity | None = None, server_tls: TlsIdentity | None = None,
                        settings: EngineSettings | None = None, rounds: int = 16) -> tuple[Any, Any]:
    """Run a mutual handshake between two engines with datagrams passed in memory.

    Returns (client's view of the server certificate, server's view of the client
    certificate). Raises ``EngineUnavailable`` if the handshake does not complete
    with ALPN meshd/1 and a certificate on both sides.
    """
    client_tls = client_tls or ephemeral_identity()
    server_tls = server_tls or ephemeral_identity()
    # configuration() reads only the transport fields of the settings; the default
    # names the reference engine because EngineSettings checks that its engine
    # loads, and this runs while qh3 is being loaded (its self-test).
    settings = settings or EngineSettings(engine="aioquic")
    now = time.monotonic()
    client_addr, server_addr = ("127.0.0.1", 1), ("127.0.0.1", 2)
    client = client_engine.connect(client_engine.configuration(client_tls, settings, is_client=True), server_addr, now)
    server = None
    done: dict[str, str | None] = {}
    for _ in range(rounds):
        moved = 0
        for data, _addr in client.datagrams_to_send(now):
            moved += 1
            if server is None:
                server = server_engine.accept(server_engine.configuration(server_tls, settings, is_client=False),
                                              destination_cid(data, CONNECTION_ID_LENGTH) or b"")
            server.receive_datagram(data, client_addr, now)
        if server is not None:
            for data, _addr in server.datagrams_to_send(now):
                moved += 1
                client.receive_datagram(data, server_addr, now)
        for name, quic in (("client", client), ("server", server)):
            while quic is not None and (event := quic.next_event()) is not None:
                kind = type(event).__name__
                if kind == "HandshakeCompleted":
                    done[name] = event.alpn_protocol
                elif kind == "ConnectionTerminated":
                    raise EngineUnavailable(f"{name} closed the handshake: {event.reason_phrase}")
        if len(done) == 2 or not moved:
            break
        now += 0.001
    if done != {"client": ALPN, "server": ALPN} or server is None:
        raise EngineUnavailable(f"in-memory handshake did not complete: {done}")
    seen_by_client, seen_by_server = client.peer_certificate(), server.peer_certificate()
    if seen_by_client is None or seen_by_server is None:
        raise EngineUnavailable("in-memory handshake completed without mutual certificates")
    return seen_by_client, seen_by_server


DEFAULT_ENGINE: QuicEngine = select_engine("auto")
ENGINE_NAME = DEFAULT_ENGINE.name
# The default engine's event classes (tests and tools that inspect raw QUIC events).
events = DEFAULT_ENGINE.events

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINE_NAME",
    "MeshConnection",
    "QuicEngine",
    "ephemeral_identity",
    "events",
    "handshake_in_memory",
    "load_engine",
    "select_engine",
]
