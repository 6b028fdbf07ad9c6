"""The llama.cpp RPC server as a child process, and the parent's helpers to run it.

``python -m meshd.split.rpc_server --endpoint 127.0.0.1:PORT --cache-dir DIR``

The server has no authentication and trusts every byte it reads, so it only
ever listens on loopback: peers reach it through authenticated tunnels. It
runs in a process of its own because a malformed request or a lost client can
abort it, and because it blocks in C forever. It dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import BackendError

__all__ = ["die_with_parent", "log_tail", "main", "spawn_rpc_server", "wait_listening", "wait_listening_async"]

LOOPBACK_HOSTS = ("127.0.0.1",)  # ggml takes numeric IPv4 only: "localhost" fails to bind
PARENT_PID_ENV = "MESHD_SPLIT_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent goes (Linux; elsewhere a no-op).

    The parent is the *thread* that spawned us: spawn from a long-lived thread.
    If the parent died before this call, the kernel will never send the signal,
    hence the check against the pid the parent wrote into the environment.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)  # orphaned already


def check_endpoint(endpoint: str) -> str | None:
    """None when ``endpoint`` is ``127.0.0.1:PORT``, else why not.

    ggml splits an endpoint at its *first* colon, so IPv6 (``::1``) cannot be
    expressed at all, and its server binds numeric addresses only (``localhost``
    fails); loopback IPv4 is the only safe choice anyway.
    """
    host, sep, port = endpoint.partition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return f"endpoint {endpoint!r} is not HOST:PORT"
    if host not in LOOPBACK_HOSTS:
        return (f"refusing to listen on {host!r}: the llama.cpp RPC server has no authentication and "
                f"must only listen on loopback ({', '.join(LOOPBACK_HOSTS)})")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshd.split.rpc_server", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="127.0.0.1:PORT (loopback only)")
    parser.add_argument("--cache-dir", required=True, help="directory for the tensor cache")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    refused = check_endpoint(args.endpoint)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    die_with_parent()
    from .rpclib import rpc_support, start_rpc_server

    missing = rpc_support()
    if missing:
        print(missing, file=sys.stderr)
        return 3
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    start_rpc_server(args.endpoint, args.cache_dir, max(1, args.threads))
    # It returns only when it could not start (the reason is already on stderr).
    return 1


# --- the parent's side ------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env[PARENT_PID_ENV] = str(os.getpid())
    # ggml's abort would otherwise try to attach gdb for a backtrace: seconds of delay
    # before a lost host child reads as lost, for a trace nobody reads.
    env.setdefault("GGML_NO_BACKTRACE", "1")
    return env


def spawn_rpc_server(port: int, cache_dir: Path, n_threads: int, log_path: Path) -> subprocess.Popen:
    """Start the server on ``127.0.0.1:port``, its output appended to ``log_path``.

    The returned Popen carries ``log_path`` as an attribute, for ``wait_listening``.
    """
    with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshd.split.rpc_server", "--endpoint", f"127.0.0.1:{port}",
             "--cache-dir", str(cache_dir), "--threads", str(max(1, n_threads))],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=False, env=child_env(),
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def log_tail(path: Path | None, limit: int = 1500) -> str:
    """The last ``limit`` characters of a child's log, for an error message."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _exited(proc: subprocess.Popen) -> BackendError:
    tail = log_tail(getattr(proc, "log_path", None))
    return BackendError(f"the RPC server exited with code {proc.returncode}: {tail or '(no output)'}",
                        code="split_worker_failed")


def _accepts(port: int) -> bool:
    # Connecting and closing is harmless: the server drops this client and accepts the next.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Block until 127.0.0.1:port accepts connections; BackendError if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise _exited(proc)
        if _accepts(port):
            return
        if time.monotonic() >= deadline:
            raise BackendError(f"the RPC server did not listen on port {port} within {timeout:.0f} s",
                               code="split_worker_failed")
        time.sleep(0.05)


async def wait_listening_async(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """``wait_listening`` for the event loop (each probe runs in a worker thread)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise _exited(proc)
        if await asyncio.to_thread(_accepts, port):
            return
        if time.monotonic() >= deadline:
            raise BackendError(f"the RPC server did not listen on port {port} within {timeout:.0f} s",
                               code="split_worker_failed")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
