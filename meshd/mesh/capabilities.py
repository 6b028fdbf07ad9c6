"""Signed capability announcements: what a node has and how busy it is.

The payload is a plain dict (it travels as msgpack inside a signed record):
node descriptor (OS, CPU model, memory, accelerators), backends, model identity
descriptors and live load (in flight, queued, completion tokens/s over the
last minute). Verification is the identity library's, with a replay guard so
an old announcement cannot be played back.

Accelerators are only those found: a GPU-class device llama.cpp lists, Metal
through MLX, or a GPU device node; an empty list means none was found, None
that nobody looked yet.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from identity import NodeId, NodeKey, RecordSigner, ReplayGuard, verify_record

log = logging.getLogger(__name__)

CAPABILITIES_KIND = "meshd.capabilities"
CAPABILITIES_TTL_S = 300.0
CPUINFO = Path("/proc/cpuinfo")
# enum ggml_backend_dev_type (ggml-backend.h, as bundled with llama-cpp-python 0.3.36):
# CPU 0, GPU 1, IGPU 2, ACCEL 3. ACCEL is BLAS or AMX running on the CPU: not an accelerator.
GGML_DEVICE_TYPES = {1: "gpu", 2: "igpu"}


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def cpu_model(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU's marketing name ("AMD EPYC 7B13"), or None when the OS does not say."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None
    if sys.platform == "win32":
        return platform.processor() or None
    return None  # platform.processor() elsewhere is the architecture, not a model


def _llama_cpp_accelerators() -> list[dict[str, Any]]:
    """GPU-class devices llama.cpp would offload to (blocking: imports llama_cpp)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return []
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        log.info("llama_cpp does not import; no accelerators from it", extra={"fields": {"error": str(exc)}})
        return []
    if not llama_cpp.llama_supports_gpu_offload():
        return []
    # An RPC build says "offload supported" with no GPU at all: ask ggml for its devices.
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = []
    try:
        lib = next(lib_dir / n for n in ("libggml.so", "libggml.dylib", "ggml.dll") if (lib_dir / n).exists())
        ggml = ctypes.CDLL(str(lib))
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
            fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
        ggml.ggml_backend_dev_type.argtypes, ggml.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
        for index in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(index)
            kind = GGML_DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev))
            if kind is not None:
                found.append({"type": kind, "via": "llama.cpp",
                              "name": (ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace") or None,
                              "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace") or None})
    except (StopIteration, OSError, AttributeError) as exc:
        if llama_cpp.llama_supports_rpc():
            log.info("cannot list llama.cpp devices; claiming none", extra={"fields": {"error": str(exc)}})
            return []  # offload may be RPC alone: not a local accelerator
        return [{"type": "gpu", "via": "llama.cpp", "name": None, "description": None}]
    return found


def _mlx_accelerators() -> list[dict[str, Any]]:
    """Metal through MLX (Apple only; blocking: imports mlx.core)."""
    if sys.platform != "darwin" or importlib.util.find_spec("mlx") is None:
        return []
    try:
        import mlx.core as mx

        if not mx.metal.is_available():
            return []
        info = mx.metal.device_info()
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        log.info("mlx does not report Metal", extra={"fields": {"error": str(exc)}})
        return []
    name = info.get("device_name") or info.get("architecture")
    return [{"type": "gpu", "via": "mlx", "name": str(name) if name else None, "description": "Metal"}]


def _device_node_accelerators(dev_dir: Path = Path("/dev")) -> list[dict[str, Any]]:
    """GPU device nodes (NVIDIA, AMD ROCm, WSL): present, whichever runtime uses them."""
    from ..backends.vllm import detect_gpus

    return [{"type": "gpu", "via": "device", "name": str(dev_dir / name), "description": None}
            for name in detect_gpus(dev_dir)]


def detect_accelerators() -> list[dict[str, Any]]:
    """Accelerators this node really has; [] when none is found. Blocking: call it off the event loop."""
    return [*_llama_cpp_accelerators(), *_mlx_accelerators(), *_device_node_accelerators()]


def node_descriptor(accelerators: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """OS, CPU, memory. ``accelerators`` comes from ``detect_accelerators()`` (None: not looked yet)."""
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "accelerators": accelerators,
        "python": platform.python_version(),
    }


class CapabilityAnnouncer:
    """Signs the current capabilities, re-signing only when something changed."""

    def __init__(self, key: NodeKey, collect: Callable[[], dict[str, Any]]) -> None:
        self._signer = RecordSigner(key, CAPABILITIES_KIND, ttl=CAPABILITIES_TTL_S)
        self._collect = collect
        self._last_payload: dict[str, Any] | None = None
        self._last_record: bytes | None = None
        self._signed_at = 0.0

    def current(self, now: float | None = None) -> tuple[bytes, bool]:
        """(signed record, changed since last call)."""
        now = time.time() if now is None else now
        payload = self._collect()
        stale = now - self._signed_at > CAPABILITIES_TTL_S / 2
        if payload == self._last_payload and self._last_record is not None and not stale:
            return self._last_record, False
        self._last_payload, self._signed_at = payload, now
        self._last_record = self._signer.sign(payload, now=now)
        return self._last_record, True


class CapabilityVerifier:
    def __init__(self) -> None:
        self._guard = ReplayGuard()

    def __call__(self, signed: bytes, peer_node_id: str, now: float) -> dict[str, Any]:
        # The session passes its monotonic clock; record expiry is wall-clock.
        record = verify_record(signed, kind=CAPABILITIES_KIND, now=time.time(), signer=NodeId.parse(peer_node_id))
        if not self._guard.accept(record, now=time.time()):
            return dict(record.payload) if isinstance(record.payload, dict) else {}
        if not isinstance(record.payload, dict):
            raise ValueError("capability payload is not a map")
        return dict(record.payload)


__all__ = ["CAPABILITIES_KIND", "CapabilityAnnouncer", "CapabilityVerifier", "cpu_model", "detect_accelerators",
           "node_descriptor"]
