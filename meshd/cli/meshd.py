"""``meshd``: run the daemon.

Precedence for every setting: flags > MESHD_* environment > config file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import DEFAULT_API_PORT, DEFAULT_MESH_PORT, ConfigError, load_config, parse_model_arg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd",
        description="meshd: a peer-to-peer LLM inference mesh daemon with an OpenAI-compatible API.",
        epilog="Settings: flags > MESHD_* environment > --config file > defaults. See docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = commands.add_parser("start", help="run the daemon in the foreground (what systemd runs)")
    start.add_argument("--config", metavar="FILE", type=Path, help="TOML config file (env MESHD_CONFIG)")
    start.add_argument("--name", help="this node's display name (env MESHD_NAME; default the host name)")
    start.add_argument("--state-dir", metavar="DIR", help="keys, trust store, sockets (env MESHD_STATE_DIR)")
    start.add_argument(
        "--api-listen", metavar="HOST:PORT",
        help=f"OpenAI API address (env MESHD_API_LISTEN; default 127.0.0.1:{DEFAULT_API_PORT})",
    )
    start.add_argument("--mesh-listen", metavar="HOST:PORT",
                       help=f"QUIC (UDP) address for peers (env MESHD_MESH_LISTEN; default 0.0.0.0:{DEFAULT_MESH_PORT})")
    start.add_argument("--no-discovery", action="store_true", default=None,
                       help="do not announce or browse with mDNS (env MESHD_NO_DISCOVERY=1)")
    start.add_argument("--peer", metavar="HOST:PORT", action="append", default=[],
                       help="a static peer to dial (repeatable; env MESHD_PEERS, comma-separated)")
    start.add_argument("--strategy", choices=["local-first", "least-loaded", "lowest-latency"],
                       help="how to pick a node for a request (env MESHD_ROUTING_STRATEGY; default local-first)")
    start.add_argument(
        "--model", metavar="[ALIAS=]PATH", action="append", default=[],
        help="serve this GGUF file (repeatable; id = file stem; env MESHD_MODEL, ':'-separated). "
        "Replaces the bundled model.",
    )
    start.add_argument("--no-default-model", action="store_true", default=None,
                       help="do not serve the bundled SmolLM2 model (env MESHD_NO_DEFAULT_MODEL=1)")
    start.add_argument("--require-keys", action="store_true", default=None,
                       help="require an API key on /v1/* even on loopback (env MESHD_REQUIRE_KEYS=1); "
                       "keys are required anyway once `meshctl keys create` made one")
    start.add_argument("--insecure-no-auth", action="store_true", default=None,
                       help="serve /v1/* without API keys even beyond loopback (env MESHD_INSECURE_NO_AUTH=1)")
    start.add_argument("--max-queue", metavar="N", type=int, help="waiting requests per model (env MESHD_MAX_QUEUE)")
    start.add_argument("--shutdown-grace", metavar="SECONDS", type=float,
                       help="time in-flight requests get on SIGTERM (env MESHD_SHUTDOWN_GRACE; default 10)")
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env MESHD_LOG_LEVEL")
    start.add_argument("--log-format", choices=["text", "json"], help="env MESHD_LOG_FORMAT")
    start.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default=None,
                       help="event loop (env MESHD_LOOP; auto = uvloop when installed)")

    commands.add_parser("version", help="print the version")

    doctor = commands.add_parser("doctor", help="check this machine and find local model servers to add")
    doctor.add_argument("--state-dir", metavar="DIR", help="env MESHD_STATE_DIR")
    doctor.add_argument("--api-listen", metavar="HOST:PORT", help="the API address to check")
    doctor.add_argument("--mesh-listen", metavar="HOST:PORT", help="the QUIC address to check")
    doctor.add_argument("--probe", metavar="NAME=PORT", action="append", default=[],
                        help="look for an OpenAI-compatible server on 127.0.0.1:PORT (repeatable; replaces the "
                        "default ports 11434, 1234, 8000, 8080)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "state_dir": args.state_dir,
        "name": args.name,
        "api.listen": args.api_listen,
        "serving.max_queue": args.max_queue,
        "shutdown_grace_s": args.shutdown_grace,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "no_default_model": args.no_default_model,
        "mesh.listen": args.mesh_listen,
        "no_discovery": args.no_discovery,
        "mesh.peers": args.peer or None,
        "routing.strategy": args.strategy,
        "auth.require_keys": args.require_keys,
        "auth.insecure_no_auth": args.insecure_no_auth,
    }
    if args.model:
        flags["models"] = [parse_model_arg("--model", item) for item in args.model]
    return flags


def run_loop(main: Any, choice: str) -> int:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("loop", "uvloop is not installed") from None
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    with asyncio.Runner() as runner:
        return runner.run(main)


def start(args: argparse.Namespace) -> int:
    from ..daemon import Daemon, StartupError
    from ..logs import setup_logging

    env = os.environ
    try:
        config_file = args.config or (Path(env["MESHD_CONFIG"]) if env.get("MESHD_CONFIG") else None)
        config = load_config(config_file, env, flags_from_args(args))
    except ConfigError as exc:
        print(f"meshd: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    daemon = Daemon(config, notify_socket=env.get("NOTIFY_SOCKET"))
    try:
        return run_loop(daemon.run(), args.loop or env.get("MESHD_LOOP", "auto"))
    except StartupError as exc:
        print(f"meshd: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"meshd: config error: {exc}", file=sys.stderr)
        return 2


def doctor(args: argparse.Namespace) -> int:
    from ..doctor import DEFAULT_PROBES, DoctorOptions, exit_code, render_json, render_text, run_checks

    env = os.environ
    try:
        config = load_config(Path(env["MESHD_CONFIG"]) if env.get("MESHD_CONFIG") else None, env, {
            "state_dir": args.state_dir, "api.listen": args.api_listen, "mesh.listen": args.mesh_listen})
        probes = DEFAULT_PROBES
        if args.probe:
            probes = tuple(_probe(item) for item in args.probe)
    except ConfigError as exc:
        print(f"meshd: config error: {exc}", file=sys.stderr)
        return 2
    options = DoctorOptions(
        state_dir=config.state_dir,
        api_listen=(config.api.listen.host, config.api.listen.port),
        mesh_listen=(config.mesh.listen.host, config.mesh.listen.port),
        probes=probes,
    )
    results = asyncio.run(run_checks(options))
    print(render_json(results) if args.json else render_text(results))
    return exit_code(results)


def _probe(item: str):  # type: ignore[no-untyped-def]
    from ..doctor import RuntimeProbe

    name, sep, port = item.rpartition("=")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--probe", f"expected NAME=PORT, got {item!r}")
    return RuntimeProbe(name or f"port-{port}", int(port), "openai")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"meshd {__version__}")
        return 0
    if args.command == "start":
        return start(args)
    if args.command == "doctor":
        return doctor(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
