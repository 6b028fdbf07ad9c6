"""[mesh] configuration -> transport settings: keys and environment, errors naming the key, the wire.

``engine_settings`` is the only road from the operator's configuration to the
QUIC transport (the transport reads no environment), so these tests go
through ``load_config`` the way the daemon does, then check what
``EngineSettings`` holds, which errors name which key, and that a configured
datagram size is what actually crosses a real loopback socket.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.config import ConfigError, MeshConfig, load_config
from meshd.mesh.service import engine_settings
from meshd.transport import ENGINE_NAME, EngineSettings, InvalidTransportSettings
from meshd.transport.loopback import connect_pair

MiB = 1024 * 1024
ENGINES = ["aioquic"] + (["qh3"] if importlib.util.find_spec("qh3") else [])


def mesh_config(*, file: str | None = None, env: dict[str, str] | None = None, tmp_path: Path | None = None,
                **flags: object) -> MeshConfig:
    path = None
    if file is not None:
        assert tmp_path is not None
        path = tmp_path / "meshd.toml"
        path.write_text(file)
    return load_config(path, env or {}, {f"mesh.{k}": v for k, v in flags.items()}).mesh


# --- what maps where ----------------------------------------------------------------------------


def test_an_empty_mesh_section_gives_the_transport_defaults() -> None:
    settings = engine_settings(mesh_config())
    assert settings == EngineSettings()
    assert settings.engine == ENGINE_NAME and settings.max_datagram_size == 1452
    assert (settings.max_data, settings.max_stream_data, settings.udp_buffer_bytes) == (32 * MiB, 16 * MiB, 8 * MiB)
    assert settings.pmtu_probe is False
    assert settings.busy_poll_us == 300


def test_config_file_keys_reach_engine_settings(tmp_path: Path) -> None:
    config = mesh_config(tmp_path=tmp_path, file="""
[mesh]
engine = "aioquic"
max_datagram_size = 8952
udp_buffer_bytes = 1048576
max_stream_data = 4194304
max_data = 8388608
pmtu_probe = true
busy_poll_us = 0
""")
    settings = engine_settings(config)
    assert settings.engine == "aioquic"
    assert settings.max_datagram_size == 8952
    assert settings.udp_buffer_bytes == 1 * MiB
    assert (settings.max_stream_data, settings.max_data) == (4 * MiB, 8 * MiB)
    assert settings.pmtu_probe is True
    assert settings.busy_poll_us == 0


def test_environment_reaches_engine_settings_and_beats_the_file(tmp_path: Path) -> None:
    config = mesh_config(tmp_path=tmp_path, file='[mesh]\nengine = "qh3"\nmax_datagram_size = 1300\n',
                         env={"MESHD_QUIC_ENGINE": "AIOQUIC", "MESHD_QUIC_MAX_DATAGRAM_SIZE": "8952",
                              "MESHD_QUIC_BUSY_POLL_US": "1000"})
    settings = engine_settings(config)
    assert (settings.engine, settings.max_datagram_size, settings.busy_poll_us) == ("aioquic", 8952, 1000)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_explicit_engine_is_used(engine: str) -> None:
    assert engine_settings(mesh_config(engine=engine)).engine == engine


def test_auto_is_the_import_time_choice() -> None:
    assert engine_settings(mesh_config(engine="auto")).engine == ENGINE_NAME


def test_one_flow_control_window_alone_keeps_the_pair_consistent() -> None:
    # a stream window above the default connection window raises the connection window with it
    settings = engine_settings(mesh_config(max_stream_data=64 * MiB))
    assert (settings.max_stream_data, settings.max_data) == (64 * MiB, 64 * MiB)
    # a small connection window lowers the default stream window to fit
    settings = engine_settings(mesh_config(max_data=1 * MiB))
    assert (settings.max_stream_data, settings.max_data) == (1 * MiB, 1 * MiB)
    # a large one leaves the stream window at its default
    settings = engine_settings(mesh_config(max_data=128 * MiB))
    assert (settings.max_stream_data, settings.max_data) == (16 * MiB, 128 * MiB)


# --- errors name the key --------------------------------------------------------------------------


@pytest.mark.parametrize("key,raw", [
    ("engine", "quiche"),
    ("max_datagram_size", "jumbo"),
    ("max_datagram_size", 1199),
    ("udp_buffer_bytes", 1024),
    ("max_stream_data", -1),
    ("max_data", "lots"),
    ("pmtu_probe", "maybe"),
    ("busy_poll_us", -1),
    ("busy_poll_us", "fast"),
])
def test_values_the_config_refuses_name_their_key(key: str, raw: object) -> None:
    with pytest.raises(ConfigError) as error:
        mesh_config(**{key: raw})
    assert error.value.key == f"mesh.{key}"


def test_the_environment_is_checked_like_the_file() -> None:
    with pytest.raises(ConfigError) as error:
        mesh_config(env={"MESHD_QUIC_ENGINE": "quiche"})
    assert error.value.key == "mesh.engine"


@pytest.mark.parametrize("changes,key", [
    ({"max_datagram_size": 65528}, "mesh.max_datagram_size"),  # above UDP's ceiling
    ({"max_stream_data": 8 * MiB, "max_data": 4 * MiB}, "mesh.max_data"),
    ({"busy_poll_us": 100_001}, "mesh.busy_poll_us"),  # more than a tenth of a second of spinning
])
def test_values_the_transport_refuses_name_their_key(changes: dict, key: str) -> None:
    config = mesh_config(**changes)  # within what the config parser checks
    with pytest.raises(InvalidTransportSettings) as error:
        engine_settings(config)
    assert error.value.setting == key
    assert str(error.value).startswith(f"{key}: ")
    assert error.value.code == "invalid_transport_settings"


def _run(code: str) -> subprocess.CompletedProcess:
    # qh3 hidden from this interpreter only; engine availability is decided once per process.
    prelude = "import sys; sys.modules['qh3'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)


def test_configuring_qh3_where_it_is_missing_is_one_clear_error() -> None:
    out = _run("from meshd.config import MeshConfig\n"
               "from meshd.mesh.service import engine_settings\n"
               "from meshd.transport import ENGINE_NAME, InvalidTransportSettings\n"
               "assert engine_settings(MeshConfig()).engine == ENGINE_NAME == 'aioquic'\n"
               "try:\n"
               "    engine_settings(MeshConfig(engine='qh3'))\n"
               "except InvalidTransportSettings as exc:\n"
               "    print(exc.setting)\n"
               "    print(exc)\n")
    assert out.returncode == 0, out.stderr
    setting, message = out.stdout.strip().splitlines()
    assert setting == "mesh.engine"
    assert message.startswith("mesh.engine: qh3 is not installed (pip install 'meshd[fast]')")


# --- the wire -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1300, 8952])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_configured_datagram_size_is_what_crosses_the_socket(engine: str, size: int) -> None:
    """Both nodes configured for a non-default datagram size: the bulk of a transfer crosses in
    datagrams of about that size, none larger (the default, 1452, would be on the wrong side of both)."""
    settings = engine_settings(mesh_config(engine=engine, max_datagram_size=size))

    async def main() -> tuple[object, list[int], list[int]]:
        pair = await connect_pair(settings, settings)
        sent: list[int] = []
        received: list[int] = []
        client_socket, server_endpoint = pair.client.endpoint.socket, pair.server.endpoint
        send, deliver = client_socket.send, server_endpoint.datagrams_received

        def record_send(datagrams: list[bytes], addr: tuple[str, int]) -> None:
            sent.extend(len(d) for d in datagrams)
            send(datagrams, addr)

        def record_receive(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
            received.extend(len(d) for d, _ in batch)
            deliver(batch)

        client_socket.send = record_send  # type: ignore[method-assign]
        server_endpoint.socket._on_datagrams = record_receive  # type: ignore[union-attr]
        try:
            transfer = await pair.bulk(2 * MiB, stall_s=15)
        finally:
            await pair.close()
        return transfer, sent, received

    transfer, sent, received = asyncio.run(main())
    assert transfer.ok, transfer  # type: ignore[attr-defined]
    assert max(sent) <= size and max(received) <= size
    # aioquic fills datagrams to the byte; qh3 2.1 leaves ~30 bytes of each unused.
    full = [n for n in sent if n > size - 64]
    assert len(full) > 0.9 * 2 * MiB / size, (len(full), sorted(set(sent))[-5:])


def test_a_daemon_with_an_impossible_transport_setting_stops_with_the_key(daemon_factory, tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[mesh]\nmax_data = 70000\nmax_stream_data = 1000000\n")
    daemon = daemon_factory("--config", str(config), "--no-default-model", ready=False)
    assert daemon.proc.wait(60) == 1
    assert "meshd: mesh.max_data: 70000: must be at least max_stream_data" in daemon.log()
