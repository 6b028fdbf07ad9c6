"""The split host child: owns the llama.cpp context whose layers live partly on RPC servers.

``python -m meshd.split.host --fd N``, where N is its end of a socketpair
(``hostwire`` framing). llama.cpp aborts the whole process when an RPC
connection breaks; living in a child, that abort costs meshd one EOF, which
``engine.SplitEngine`` answers by loading a new child with a new plan.

Protocol: one config message, answered by ``ready`` or ``error``; then one
request at a time (``generate`` streams ``text`` messages and ends with
``finished`` or ``error``; ``tokens`` answers ``tokens``). ``cancel`` may
arrive while a generation runs. EOF: exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .hostwire import error_to_wire, recv_msg, request_from_wire, send_msg
from .rpc_server import die_with_parent

__all__ = ["BufferLog", "main"]

# GGML_LOG_LEVEL_*: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_INFO, _WARN, _CONT = 2, 3, 5
# "load_tensors: RPC0[127.0.0.1:4000] model buffer size =    58.28 MiB"
# "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB"
# "llama_kv_cache: RPC0[127.0.0.1:4000] KV buffer size =     5.25 MiB"
# "sched_reserve: RPC0[127.0.0.1:4000] compute buffer size =    97.12 MiB"
_BUFFER = re.compile(r"^\w+:\s+(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")
# A buffer type names its device: "CPU_Mapped", "CPU_REPACK" -> "CPU"; "RPC0[host:port]" stays.
_DEVICE = re.compile(r"^(RPC\d+\[[^\]]*\]|[A-Za-z0-9]+)")
_ENDPOINT = re.compile(r"^RPC\d+\[([^\]]*)\]$")


class BufferLog:
    """llama.cpp's log, kept for what it says about buffers; warnings and errors go to ``out_fd``.

    ``out_fd`` is a duplicate of stderr taken at start: ``Llama(verbose=False)``
    points fd 2 at /dev/null while it loads, the very time we want to log.
    """

    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.devices: dict[str, dict[str, Any]] = {}
        self._partial = ""
        self._level = _INFO
        self._callback: Any = None  # held: ctypes would free a callback still installed in C

    def install(self) -> None:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, _user: Any) -> None:
            self.feed(level, text.decode("utf-8", errors="replace"))

        self._callback = callback
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def feed(self, level: int, text: str) -> None:
        if level != _CONT:
            self._level = level
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(self._level, line)

    def _line(self, level: int, line: str) -> None:
        found = _BUFFER.match(line)
        if found:
            name, kind, mib = found.groups()
            device = _DEVICE.match(name).group(1)  # type: ignore[union-attr]
            entry = self.devices.setdefault(device, {"device": device, "endpoint": _endpoint(device),
                                                     "model_buffer_mib": 0.0, "kv_buffer_mib": 0.0,
                                                     "compute_buffer_mib": 0.0})
            key = f"{kind.lower()}_buffer_mib"
            entry[key] = round(entry[key] + float(mib), 2)
        if found or level >= _WARN:
            try:
                os.write(self.out_fd, (line + "\n").encode("utf-8", errors="replace"))
            except OSError:
                pass

    def device_list(self) -> list[dict[str, Any]]:
        """Devices in the order llama.cpp reported them (model buffers first)."""
        return [dict(d) for d in self.devices.values()]


def _endpoint(device: str) -> str | None:
    found = _ENDPOINT.match(device)
    return found.group(1) if found else None


def _load(config: dict[str, Any], buffers: BufferLog) -> tuple[Any, dict[str, Any]]:
    from ..backends.llama_engine import LlamaEngine
    from .rpclib import keep_output_on_cpu, register_rpc_servers

    started = time.perf_counter()
    endpoints = list(config.get("endpoints") or [])
    kwargs: dict[str, Any] = {"n_gpu_layers": int(config.get("n_gpu_layers") or 0)}
    if config.get("tensor_split"):
        kwargs["tensor_split"] = [float(x) for x in config["tensor_split"]]
    register_rpc_servers(endpoints)
    if config.get("head_on_host") and endpoints:
        keep_output_on_cpu()
    engine = LlamaEngine(Path(config["path"]), int(config["n_ctx"]), int(config.get("n_threads") or 0),
                         llama_kwargs=kwargs)
    engine.load()
    import llama_cpp

    n_layer = int(llama_cpp.llama_model_n_layer(engine._llama._model.model))
    return engine, {
        "op": "ready", "n_ctx": engine.context_length, "n_embd": engine.embedding_length,
        # n_gpu_layers counts the output layer too: n_layer + 1 places everything on the devices.
        "n_layer": n_layer, "n_gpu_layers_max": n_layer + 1,
        "devices": buffers.device_list(), "load_s": round(time.perf_counter() - started, 3),
        "pid": os.getpid(),
    }


def _reader(sock: socket.socket, inbox: queue.Queue[Any]) -> None:
    """Reads every message; sets a generation's cancel event itself, so that it lands mid-request."""
    current: threading.Event | None = None
    while True:
        try:
            message = recv_msg(sock)
        except Exception:  # noqa: BLE001 - a broken stream ends the child like EOF
            message = None
        if message is None:
            if current is not None:
                current.set()
            inbox.put(None)
            return
        if message.get("op") == "cancel":
            if current is not None:  # a cancel that crossed "finished" lands on a finished request: harmless
                current.set()
            continue
        event = threading.Event()
        if message.get("op") == "generate":
            current = event
        inbox.put((message, event))


def _serve(sock: socket.socket, engine: Any) -> None:
    from ..errors import InvalidRequest

    inbox: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_reader, args=(sock, inbox), name="host-reader", daemon=True).start()
    while (item := inbox.get()) is not None:
        message, cancelled = item
        op = message.get("op")
        try:
            if op == "generate":
                request = request_from_wire(message["request"])

                def emit(delta: Any) -> None:
                    send_msg(sock, {"op": "text", "text": delta.text, "token_ids": list(delta.token_ids)})

                done = engine.generate(request, emit, cancelled)
                send_msg(sock, {"op": "finished", "finish_reason": done.finish_reason,
                                "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                "ttft_s": done.ttft_s, "cached_tokens": done.cached_tokens})
            elif op == "tokens":
                ids, stops = engine.prompt_tokens(request_from_wire(message["request"]))
                send_msg(sock, {"op": "tokens", "ids": list(ids), "stops": list(stops)})
            else:
                send_msg(sock, error_to_wire(InvalidRequest(f"unknown split host op {op!r}")))
        except OSError:
            return  # the parent is gone
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent, typed
            try:
                send_msg(sock, error_to_wire(exc))
            except OSError:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshd.split.host")
    parser.add_argument("--fd", type=int, required=True, help="this child's end of the parent's socketpair")
    args = parser.parse_args(argv)
    die_with_parent()
    sock = socket.socket(fileno=args.fd)
    config = recv_msg(sock)
    if config is None:
        return 0
    buffers = BufferLog(os.dup(2))
    buffers.install()
    try:
        engine, ready = _load(config, buffers)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, typed
        send_msg(sock, error_to_wire(exc))
        return 1
    send_msg(sock, ready)
    _serve(sock, engine)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: freeing the model frees RPC buffers over the
    # network, and a server that is already gone would abort us on the way out.
    os._exit(code)
