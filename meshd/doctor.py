"""``meshd doctor``: checks of this host, as typed results, and their renderings.

Each check returns one ``CheckResult`` per line of output: ``ok``, ``warn``
(works, but something is missing or slower than it could be) or ``fail``
(meshd will not start or not work as configured; the exit code says so).
Local model runtimes found on their usual ports come back with the exact
``[[upstreams]]`` TOML snippet that adds them as a backend.

The CLI (``meshd doctor [--json]``) only builds ``DoctorOptions`` from its
flags and config and prints ``render_text`` or ``render_json``.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import stat
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from identity import KEY_FILE_NAME, IdentityError, probe_lock

from .backends import openai_wire as wire

Status = Literal["ok", "warn", "fail"]
MDNS_GROUP = "224.0.0.251"

# (distribution, why it matters). Required ones fail the check when missing.
REQUIRED_PACKAGES = (
    "aiohttp", "aioquic", "cryptography", "PyNaCl", "numpy", "msgpack", "zeroconf", "prometheus-client",
)
OPTIONAL_PACKAGES: Mapping[str, str] = {
    "llama-cpp-python": "in-process llama.cpp models",
    "uvloop": "a faster event loop",
    "qh3": "the faster QUIC engine",
    "gguf": "model identity for GGUF files",
    "mlx-lm": "MLX models",
    "vllm": "launching vLLM",
}
# Missing these limits what this node can do at all, so it is a warning, not a note.
IMPORTANT_OPTIONAL = {"llama-cpp-python"}


@dataclass(frozen=True)
class RuntimeProbe:
    """A local model server to look for: where, and which upstream dialect it speaks."""

    name: str
    port: int
    dialect: str = "openai"
    ollama_api: bool = False  # also ask Ollama's /api/tags


DEFAULT_PROBES: tuple[RuntimeProbe, ...] = (
    RuntimeProbe("ollama", 11434, "ollama", ollama_api=True),
    RuntimeProbe("lmstudio", 1234, "llama.cpp"),
    RuntimeProbe("vllm", 8000, "vllm"),
    RuntimeProbe("llama-server", 8080, "llama.cpp"),
)


@dataclass(frozen=True)
class DoctorOptions:
    state_dir: Path
    api_listen: tuple[str, int] | None = ("127.0.0.1", 8764)
    mesh_listen: tuple[str, int] | None = ("0.0.0.0", 8765)  # UDP (QUIC)
    probes: tuple[RuntimeProbe, ...] = DEFAULT_PROBES
    probe_host: str = "127.0.0.1"  # runtimes are only looked for on loopback
    probe_timeout_s: float = 0.5
    multicast_group: str = MDNS_GROUP


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    message: str
    hint: str | None = None  # what to do about it, or a config snippet to paste
    data: Mapping[str, Any] = field(default_factory=dict)  # machine-readable facts for --json


# --- environment ---------------------------------------------------------------------


def check_python() -> CheckResult:
    version = platform.python_version()
    data = {"version": version, "executable": sys.executable}
    if sys.version_info < (3, 11):
        return CheckResult("python", "fail", f"{version} is too old; meshd needs 3.11 or newer", data=data)
    return CheckResult("python", "ok", f"{version} ({sys.executable})", data=data)


def check_packages() -> list[CheckResult]:
    results = []
    for dist in ("meshd", *REQUIRED_PACKAGES, *OPTIONAL_PACKAGES):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        name = f"package {dist}"
        if version is not None:
            results.append(CheckResult(name, "ok", version, data={"version": version}))
        elif dist in OPTIONAL_PACKAGES:
            status: Status = "warn" if dist in IMPORTANT_OPTIONAL else "ok"
            results.append(CheckResult(name, status, f"not installed (optional: {OPTIONAL_PACKAGES[dist]})",
                                       data={"version": None}))
        else:
            results.append(CheckResult(name, "fail", "not installed (required)", hint=f"pip install {dist}",
                                       data={"version": None}))
    return results


def check_native() -> CheckResult:
    try:
        import meshd_native
    except (ImportError, OSError) as exc:  # missing, or a broken build of the extension
        return CheckResult("native extension", "warn", f"not available: {type(exc).__name__}: {exc}",
                           data={"implementation": None})
    impl = getattr(meshd_native, "IMPLEMENTATION", None)
    if impl == "native":
        return CheckResult("native extension", "ok", "compiled (Cython kernels in use)", data={"implementation": impl})
    reason_fn = getattr(meshd_native, "native_unavailable_reason", None)
    reason = reason_fn() if callable(reason_fn) else None
    return CheckResult(
        "native extension", "warn", f"pure-Python twin in use ({impl}){': ' + str(reason) if reason else ''}",
        hint="reinstall with a C compiler and Cython available to build meshd_native",
        data={"implementation": impl, "reason": reason},
    )


def check_llama_rpc() -> CheckResult:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return CheckResult("llama.cpp rpc", "warn", "llama-cpp-python is not installed", data={"rpc": False})
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libggml-rpc.so"
    if lib.is_file():
        return CheckResult("llama.cpp rpc", "ok", f"present ({lib})", data={"rpc": True, "path": str(lib)})
    return CheckResult(
        "llama.cpp rpc", "warn", f"llama-cpp-python was built without RPC ({lib} is missing)",
        hint="CMAKE_ARGS=-DGGML_RPC=on pip install --no-cache-dir --force-reinstall llama-cpp-python",
        data={"rpc": False, "path": str(lib)},
    )


def check_state_dir(state_dir: Path) -> list[CheckResult]:
    try:
        st = os.stat(state_dir)
    except FileNotFoundError:
        return [CheckResult("state dir", "ok", f"{state_dir} does not exist yet; meshd creates it (0700) on first start",
                            data={"path": str(state_dir), "exists": False})]
    except OSError as exc:
        return [CheckResult("state dir", "fail", f"cannot stat {state_dir}: {exc.strerror}", data={"path": str(state_dir)})]
    results = [_private("state dir", state_dir, st, 0o700, directory=True)]
    key = state_dir / KEY_FILE_NAME
    try:
        key_st = os.lstat(key)
    except FileNotFoundError:
        results.append(CheckResult("node key", "ok", f"{key} does not exist yet; created on first start",
                                   data={"path": str(key), "exists": False}))
    except OSError as exc:
        results.append(CheckResult("node key", "fail", f"cannot stat {key}: {exc.strerror}", data={"path": str(key)}))
    else:
        results.append(_private("node key", key, key_st, 0o600, directory=False))
    return results


def _private(name: str, path: Path, st: os.stat_result, mode: int, *, directory: bool) -> CheckResult:
    actual = stat.S_IMODE(st.st_mode)
    data = {"path": str(path), "mode": f"{actual:04o}", "uid": st.st_uid}
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        return CheckResult(name, "fail", f"{path} is not a {'directory' if directory else 'regular file'}", data=data)
    if st.st_uid != os.geteuid():
        return CheckResult(name, "fail", f"{path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})",
                           hint=f"chown {os.geteuid()} {path}", data=data)
    # A state dir may be 0710: group traverse only, for the admin socket's group (docs/service.md).
    if actual & 0o077 & ~(0o010 if directory else 0):
        return CheckResult(name, "fail", f"{path} has mode {actual:04o}: group/others have access",
                           hint=f"chmod {mode:o} {path}  (if nobody else could have read it)", data=data)
    return CheckResult(name, "ok", f"{path} (mode {actual:04o})", data=data)


def check_port(label: str, host: str, port: int, kind: int, running_pid: int | None) -> CheckResult:
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    where = f"{host}:{port}/{proto}"
    data = {"host": host, "port": port, "protocol": proto}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and running_pid is not None:
            return CheckResult(label, "ok", f"{where} is in use by the running meshd (pid {running_pid})", data=data)
        if exc.errno == errno.EADDRINUSE:
            return CheckResult(label, "fail", f"{where} is in use by another process",
                               hint=f"find it with `ss -lntup | grep :{port}`, or choose another port", data=data)
        return CheckResult(label, "fail", f"cannot bind {where}: {exc.strerror}", data=data)
    return CheckResult(label, "ok", f"{where} is free", data=data)


def check_multicast(group: str = MDNS_GROUP) -> CheckResult:
    """Can this host join the mDNS group (zeroconf discovery) on some interface?"""
    tried: list[str] = []
    addresses = ["0.0.0.0", *_ipv4_addresses()]
    for address in addresses:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(address))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError as exc:
            tried.append(f"{address}: {exc.strerror}")
            continue
        where = "the default interface" if address == "0.0.0.0" else address
        return CheckResult("multicast", "ok", f"can join {group} on {where}", data={"group": group, "interface": address})
    return CheckResult(
        "multicast", "warn", f"no interface can join {group} ({'; '.join(tried)}): zeroconf discovery will not work",
        hint="add peers statically in the config, or enable multicast on the LAN interface",
        data={"group": group, "interface": None},
    )


def _ipv4_addresses() -> list[str]:
    try:
        import ifaddr  # zeroconf's dependency
    except ImportError:
        return []
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found


# --- local runtimes ------------------------------------------------------------------


def toml_string(value: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML escapes, except ``\\/``, which json never emits)."""
    return json.dumps(value, ensure_ascii=False)


def upstream_snippet(name: str, base_url: str, models: Sequence[str], dialect: str) -> str:
    """The ``[[upstreams]]`` table that adds a found runtime as a backend."""
    listed = ", ".join(toml_string(m) for m in models)
    return "\n".join([
        "[[upstreams]]",
        f"name = {toml_string(name)}",
        f"base_url = {toml_string(base_url)}",
        f"dialect = {toml_string(dialect)}",
        f"models = [{listed}]",
    ])


async def probe_runtime(session: aiohttp.ClientSession, host: str, probe: RuntimeProbe) -> CheckResult:
    name = f"runtime {probe.name}"
    base = f"http://{host}:{probe.port}"
    data: dict[str, Any] = {"port": probe.port, "base_url": f"{base}/v1", "found": False}
    try:
        async with session.get(f"{base}/v1/models") as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        return CheckResult(name, "ok", f"nothing answers on {host}:{probe.port}", data=data)
    try:
        models = sorted(wire.models_listing(json.loads(body))) if status == 200 else None
    except (ValueError, wire.UpstreamError):
        models = None
    if models is None:
        return CheckResult(name, "ok", f"{host}:{probe.port} answers, but not as an OpenAI-compatible server (HTTP {status})",
                           data=data)
    if probe.ollama_api:
        try:
            async with session.get(f"{base}/api/tags") as resp:
                tags = wire.ollama_tags(await resp.json(content_type=None)) if resp.status == 200 else {}
            models = sorted(set(models) | set(tags))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass  # /v1/models already answered; the tags only add detail
    data.update(found=True, models=models, dialect=probe.dialect)
    if not models:
        return CheckResult(name, "ok", f"{probe.name} at {base}/v1 serves no models yet", data=data)
    snippet = upstream_snippet(probe.name, f"{base}/v1", models, probe.dialect)
    return CheckResult(
        name, "ok", f"{probe.name} at {base}/v1 serves {len(models)} model(s): {', '.join(models)}",
        hint=f"to serve them through meshd, add to the config file:\n{snippet}", data={**data, "snippet": snippet},
    )


async def probe_runtimes(options: DoctorOptions) -> list[CheckResult]:
    timeout = aiohttp.ClientTimeout(total=options.probe_timeout_s * 2, sock_connect=options.probe_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(probe_runtime(session, options.probe_host, p) for p in options.probes)))


# --- all of it -----------------------------------------------------------------------


def _local_checks(options: DoctorOptions) -> list[CheckResult]:
    results = [check_python(), *check_packages(), check_native(), check_llama_rpc()]
    results += check_state_dir(options.state_dir)
    try:
        holder = probe_lock(options.state_dir)
    except IdentityError:  # a lock we cannot read just means "not known to be running"
        holder = None
    running = holder.pid if holder is not None and holder.pid else None
    if options.api_listen is not None:
        results.append(check_port("api port", *options.api_listen, socket.SOCK_STREAM, running))
    if options.mesh_listen is not None:
        results.append(check_port("mesh port", *options.mesh_listen, socket.SOCK_DGRAM, running))
    results.append(check_multicast(options.multicast_group))
    return results


async def run_checks(options: DoctorOptions) -> list[CheckResult]:
    """Every check; the blocking ones in a worker thread, the probes concurrently."""
    local, probes = await asyncio.gather(asyncio.to_thread(_local_checks, options), probe_runtimes(options))
    return [*local, *probes]


def exit_code(results: Sequence[CheckResult]) -> int:
    return 1 if any(r.status == "fail" for r in results) else 0


_LABELS = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]"}


def render_text(results: Sequence[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for result in results:
        lines.append(f"{_LABELS[result.status]} {result.name.ljust(width)}  {result.message}")
        if result.hint:
            lines.extend(f"       {' ' * width}  {line}" if line else "" for line in result.hint.splitlines())
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "warn", "fail")}
    lines.append(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failures")
    return "\n".join(lines) + "\n"


def render_json(results: Sequence[CheckResult]) -> str:
    return json.dumps(
        {"ok": exit_code(results) == 0, "checks": [{**asdict(r), "data": dict(r.data)} for r in results]},
        indent=2,
    ) + "\n"


__all__ = [
    "DEFAULT_PROBES",
    "CheckResult",
    "DoctorOptions",
    "RuntimeProbe",
    "Status",
    "check_llama_rpc",
    "check_multicast",
    "check_native",
    "check_packages",
    "check_port",
    "check_python",
    "check_state_dir",
    "exit_code",
    "probe_runtime",
    "probe_runtimes",
    "render_json",
    "render_text",
    "run_checks",
    "toml_string",
    "upstream_snippet",
]
