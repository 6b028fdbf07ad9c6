"""Transport pieces in isolation: header parsing, settings, the batched UDP socket, engine failures."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from meshd.transport import ENGINE_NAME, EngineSettings, InvalidTransportSettings, load_engine
from meshd.transport.engine import ephemeral_identity
from meshd.transport.packets import destination_cid, is_initial
from meshd.transport.udp import UdpSocket, set_buffer_sizes

ENGINES = ["aioquic"] + (["qh3"] if __import__("importlib").util.find_spec("qh3") else [])


# --- packets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_first_datagram_is_an_initial_and_names_the_servers_connection_id(engine: str) -> None:
    quic_engine = load_engine(engine)
    settings = EngineSettings(engine=engine)
    client = quic_engine.connect(quic_engine.configuration(ephemeral_identity(), settings, is_client=True),
                                 ("127.0.0.1", 4433), time.monotonic())
    (data, _), *_ = client.datagrams_to_send(time.monotonic())
    assert is_initial(data) and len(data) >= 1200
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    assert destination_cid(data, 8) == pull_quic_header(Buffer(data=data), host_cid_length=8).destination_cid


def test_short_headers_and_garbage() -> None:
    cid = bytes(range(8))
    assert destination_cid(b"\x40" + cid + b"payload", 8) == cid
    assert destination_cid(b"", 8) is None
    assert destination_cid(b"\x40\x01", 8) is None  # shorter than the id
    assert destination_cid(b"\xc0\x00\x00\x00\x01\x30" + bytes(60), 8) is None  # a 48-byte id does not exist
    assert not is_initial(b"\xe0\x00\x00\x00\x01" + bytes(20))  # Handshake, not Initial
    assert not is_initial(b"\xc0\x6b\x33\x43\xcf" + bytes(20))  # another version


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_are_constants_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon's configuration reads MESHD_QUIC_* (tests/test_mesh_settings.py); the transport does not.
    monkeypatch.setenv("MESHD_QUIC_MAX_DATAGRAM_SIZE", "8952")
    monkeypatch.setenv("MESHD_QUIC_ENGINE", "aioquic" if ENGINE_NAME == "qh3" else "qh3")
    settings = EngineSettings()
    assert settings.max_datagram_size == 1452
    assert settings.engine == ENGINE_NAME


@pytest.mark.parametrize("changes,setting", [
    ({"max_datagram_size": 1199}, "max_datagram_size"), ({"max_datagram_size": 70000}, "max_datagram_size"),
    ({"engine": "quiche"}, "engine"), ({"max_stream_data": 10, "max_data": 5}, "max_data"),
    ({"max_stream_data": 0}, "max_stream_data"), ({"udp_buffer_bytes": 0}, "udp_buffer_bytes"),
    ({"congestion_control": "bbr"}, "congestion_control")])
def test_settings_out_of_range_are_typed_errors(changes: dict, setting: str) -> None:
    with pytest.raises(InvalidTransportSettings) as error:
        EngineSettings(**{"engine": "aioquic", **changes})
    assert error.value.code == "invalid_transport_settings"
    assert error.value.setting == setting and str(error.value).startswith(f"{setting}: ")


# --- the UDP socket ------------------------------------------------------------------------------


def test_buffer_sizes_are_raised_and_reported() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        rcv, snd = set_buffer_sizes(sock, 4 * 1024 * 1024)
        assert rcv >= default and snd > 0


@pytest.mark.parametrize("batch", [False, True])
def test_udp_socket_moves_bursts_in_both_modes(batch: bool) -> None:
    async def main() -> tuple[list[bytes], bool]:
        got: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        def received(batch_: list) -> None:
            got.extend(data for data, _ in batch_)
            if len(got) >= 300 and not done.done():
                done.set_result(None)

        receiver = UdpSocket.bind("127.0.0.1", 0, received, buffer_bytes=4 << 20, batch=batch)
        sender = UdpSocket.bind("127.0.0.1", 0, lambda _: None, buffer_bytes=4 << 20, batch=batch)
        sent = [bytes([i % 251]) * (1452 if i % 50 else 700) for i in range(300)]
        sender.send(sent, receiver.sockname())
        await asyncio.wait_for(done, 10)
        batched = receiver.batched
        sender.close()
        receiver.close()
        return got, batched

    got, batched = asyncio.run(main())
    assert len(got) == 300 and {len(d) for d in got} == {1452, 700}
    if batch and __import__("importlib").util.find_spec("qh3"):
        assert batched


# --- a failing engine costs one connection -------------------------------------------------------


def test_an_engine_error_drops_the_connection_not_the_endpoint() -> None:
    from meshd.transport.loopback import connect_pair

    async def main() -> tuple[bool, str, bool]:
        settings = EngineSettings(engine="aioquic")
        pair = await connect_pair(settings, settings)
        try:
            link = pair.server.link

            def broken(now: float) -> list:
                raise RuntimeError("engine bug")

            link.quic.datagrams_to_send = broken  # type: ignore[method-assign]
            await pair.ping()  # makes the server transmit, which fails
        except (asyncio.TimeoutError, TimeoutError):
            pass
        closed = pair.server.link.closed
        reason = pair.server.link.close_reason
        alive = not pair.server.endpoint.socket.closed
        await pair.close()
        return closed, reason, alive

    closed, reason, alive = asyncio.run(main())
    assert closed and "engine bug" in reason and alive


# --- lone acknowledgements wait for an answer to ride on --------------------------------------------


class _Quic:
    """Just enough of an engine connection: records when the link asks it for datagrams."""

    def __init__(self) -> None:
        self.polls: list[str] = []
        self.queued_stream_data = False
        self.sent_stream_data: list[bytes] = []

    def receive_datagrams(self, datagrams: list[bytes], addr: object, now: float) -> None:
        pass

    def next_event(self) -> None:
        return None

    def datagrams_to_send(self, now: float) -> list:
        self.polls.append("poll")
        return [(b"datagram", ("127.0.0.1", 9))]

    def get_timer(self) -> None:
        return None

    def stream_data_queued(self) -> bool:
        return self.queued_stream_data

    def stream_backlog(self, stream_id: int) -> int:
        return 0

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.sent_stream_data.append(data)


class _Session:
    established = True

    def __init__(self) -> None:
        self.output: list = []

    def data_to_send(self, budget: object) -> list:
        output, self.output = self.output, []
        return output

    def next_event(self) -> None:
        return None

    def next_timer(self) -> None:
        return None


class _Endpoint:
    def __init__(self) -> None:
        from aioquic.quic import events

        self.engine = type("Engine", (), {"events": events})()
        self.sent: list[list] = []

    def send(self, datagrams: list) -> None:
        self.sent.append(datagrams)


def _lone_ack_link():  # type: ignore[no-untyped-def]
    from meshd.transport.link import PeerLink

    endpoint, quic, session = _Endpoint(), _Quic(), _Session()
    link = PeerLink(endpoint, quic, ("127.0.0.1", 9), is_client=True, expected=None,
                    make_session=lambda *a: session, on_event=lambda link, event: None, on_closed=lambda link: None)
    link.session = session
    return link, endpoint, quic, session


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_lone_ack_waits_for_the_loop_then_leaves() -> None:
    async def main() -> tuple[int, int, int]:
        link, endpoint, quic, _ = _lone_ack_link()
        link.datagrams_received([b"pong"], ("127.0.0.1", 9))
        right_away = len(quic.polls)
        await _turns(1)
        after_one = len(quic.polls)
        await _turns(2)
        return right_away, after_one, len(endpoint.sent)

    right_away, after_one, sends = asyncio.run(main())
    assert (right_away, after_one, sends) == (0, 0, 1)


def test_a_lone_ack_rides_on_the_answer_sent_meanwhile() -> None:
    from meshd.protocol import StreamData

    async def main() -> tuple[list, list]:
        link, endpoint, quic, session = _lone_ack_link()
        link.datagrams_received([b"pong"], ("127.0.0.1", 9))
        await _turns(1)  # a coroutine woken by the event answers
        session.output = [StreamData(0, b"ping", False)]
        link.flush()
        await _turns(3)
        return quic.polls, endpoint.sent

    polls, sent = asyncio.run(main())
    assert polls == ["poll"] and len(sent) == 1  # one datagram: the answer, with the ACK in it


def test_input_that_makes_the_session_answer_or_frees_queued_data_sends_at_once() -> None:
    from meshd.protocol import StreamData

    async def main() -> tuple[int, int]:
        link, _, quic, session = _lone_ack_link()
        session.output = [StreamData(0, b"pong", False)]
        link.datagrams_received([b"ping"], ("127.0.0.1", 9))
        answered = len(quic.polls)
        quic.queued_stream_data = True  # e.g. an ACK opened the congestion window for it
        link.datagrams_received([b"ack"], ("127.0.0.1", 9))
        return answered, len(quic.polls)

    assert asyncio.run(main()) == (1, 2)
