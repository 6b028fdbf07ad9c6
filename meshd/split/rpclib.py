"""ctypes bindings to llama.cpp's RPC backend (ggml-rpc), as llama-cpp-python ships it.

The libraries are opened with ``RTLD_NOLOAD`` by SONAME, after ``import
llama_cpp``: that returns the very copies libllama already pulled in. The
wheel ships each ggml library as several identical *files* (``libggml.so``,
``libggml.so.0``, ...); opening another file by path would load a second ggml
with its own backend registry, and a server registered there is never seen by
llama. NOLOAD also makes "not built with GGML_RPC" detectable: libggml then
does not link libggml-rpc, so nothing is loaded under that name.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError

__all__ = ["keep_output_on_cpu", "register_rpc_servers", "rpc_support", "start_rpc_server"]

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type in ggml-backend.h

_NO_RPC = "llama-cpp-python was built without GGML_RPC; run scripts/install"


@dataclass(frozen=True)
class _Libs:
    ggml: ctypes.CDLL
    rpc: ctypes.CDLL


def _open_loaded(soname: str) -> ctypes.CDLL:
    """The already loaded library of that SONAME; OSError when none is loaded."""
    return ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)


@functools.lru_cache(maxsize=1)
def _libs() -> _Libs | str:
    """The bound libraries, or a one-line reason why they are unusable (cached: it cannot change)."""
    try:
        import llama_cpp  # noqa: F401  - loads libllama, hence libggml and (if built) libggml-rpc
    except ImportError:
        return "llama-cpp-python is not installed; run scripts/install"
    except (OSError, RuntimeError) as exc:  # a broken wheel: the shared library would not load
        return f"llama-cpp-python cannot load its library: {exc}"
    try:
        ggml = _open_loaded("libggml.so.0")
    except OSError:
        return "llama-cpp-python's libggml.so.0 is not loaded (an unexpected build); run scripts/install"
    try:
        rpc = _open_loaded("libggml-rpc.so.0")
    except OSError:
        return _NO_RPC
    try:
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_register.restype = None
        rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        rpc.ggml_backend_rpc_start_server.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
        ]
        rpc.ggml_backend_rpc_start_server.restype = None
        ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    except AttributeError as exc:  # an older ggml-rpc without the registry API
        return f"llama-cpp-python's ggml-rpc lacks {exc}; run scripts/install"
    return _Libs(ggml=ggml, rpc=rpc)


def rpc_support() -> str | None:
    """None when llama.cpp's RPC backend is usable here, else a one-line reason."""
    libs = _libs()
    return libs if isinstance(libs, str) else None


def _require() -> _Libs:
    libs = _libs()
    if isinstance(libs, str):
        raise BackendError(libs, code="split_unsupported")
    return libs


def register_rpc_servers(endpoints: Sequence[str]) -> None:
    """Make each ``host:port`` RPC server a llama.cpp device (RPC0, RPC1, ... in this order).

    Call before the model is loaded. It connects to each server to count its
    devices; an unreachable server aborts the process (llama.cpp's choice),
    which is why only the host child calls this.
    """
    libs = _require()
    for endpoint in endpoints:
        reg: Any = libs.rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise BackendError(f"RPC server {endpoint} reports no devices", code="split_load_failed")
        libs.ggml.ggml_backend_register(reg)


def start_rpc_server(endpoint: str, cache_dir: str, n_threads: int) -> None:
    """Serve this machine's CPU to RPC clients on ``endpoint``; returns only if it cannot start.

    The server handles one client connection at a time, in turn, forever.
    ``cache_dir`` keeps large tensors by hash so that a reload skips the transfer.
    """
    libs = _require()
    device = libs.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not device:
        raise BackendError("ggml has no CPU device", code="split_worker_failed")
    devices = (ctypes.c_void_p * 1)(device)
    libs.rpc.ggml_backend_rpc_start_server(endpoint.encode(), cache_dir.encode(), n_threads, 1, devices)


class _BuftOverride(ctypes.Structure):
    # struct llama_model_tensor_buft_override (llama.h): a name pattern and a buffer type.
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# The head's weights; a tied model's head is its token table, named token_embd.weight (whose
# input copy is on the CPU anyway). Matched with std::regex_search by llama.cpp.
_HEAD_PATTERN = rb"^(output|token_embd)\.weight$"
_kept: list[Any] = []  # the override arrays: llama.cpp reads them while loading


def keep_output_on_cpu() -> None:
    """Load the output head's weights into CPU memory even though its layer is offloaded.

    llama.cpp offloads the output layer before any repeating layer, so a split
    host would receive every token's logits (vocabulary x 4 bytes, ~196 KB for
    SmolLM2) from its last worker; with the weights here, only the final hidden
    state crosses. llama.cpp takes this as ``tensor_buft_overrides`` in the model
    parameters, which llama-cpp-python's ``Llama(...)`` has no argument for: this
    wraps ``llama_model_default_params``, which ``Llama`` calls to build them.
    Meant for the host child (one model per process); call before loading.
    """
    libs = _require()
    device = libs.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    buft = libs.ggml.ggml_backend_dev_buffer_type(device) if device else None
    if not buft:
        raise BackendError("ggml has no CPU buffer type", code="split_load_failed")
    overrides = (_BuftOverride * 2)(_BuftOverride(_HEAD_PATTERN, buft), _BuftOverride(None, None))
    _kept.append(overrides)
    import llama_cpp.llama_cpp as bindings

    # The binding's own function (not ``__wrapped__``: that is its Python stub), once even if called again.
    default = getattr(bindings.llama_model_default_params, "meshd_default", bindings.llama_model_default_params)

    def with_overrides() -> Any:
        params = default()
        params.tensor_buft_overrides = ctypes.addressof(overrides)
        return params

    with_overrides.meshd_default = default  # type: ignore[attr-defined]
    bindings.llama_model_default_params = with_overrides
