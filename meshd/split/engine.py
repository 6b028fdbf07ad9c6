"""The parent's side of a split model: a LlamaEngine look-alike whose context lives in a child.

llama.cpp aborts the process that owns a context when one of its RPC servers
goes away, so the context lives in ``host.py``, a child process. This proxy
speaks ``hostwire`` to it, and turns the child's death into a re-plan: it asks
``plan_for(True)`` where the layers go now, loads a new child there and resumes
the same request from the tokens already delivered, so the caller sees one
stream. Like LlamaEngine it is used from one thread (the model's executor).
"""

from __future__ import annotations

import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..backends.base import GenerationFinished, GenerationRequest, TextGenerated
from ..errors import BackendError, InvalidRequest
from .hostwire import error_from_wire, recv_msg, request_to_wire, send_msg
from .rpc_server import child_env, log_tail

log = logging.getLogger(__name__)

__all__ = ["HostPlan", "PlanFor", "SplitEngine"]

LOAD_TIMEOUT_S = 120.0
STOP_GRACE_S = 3.0
MAX_RECOVERIES = 2  # per request; a third loss means the mesh cannot hold this model now
POLL_S = 0.1  # how often a blocked read looks at the cancel flag
CANCEL_GRACE_S = 10.0  # a child that does not stop this long after a cancel is stuck (a hung RPC peer): killed


@dataclass(frozen=True)
class HostPlan:
    endpoints: tuple[str, ...]  # "127.0.0.1:PORT" per RPC device, in device order (may be empty: all local)
    n_gpu_layers: int  # layers placed on the RPC devices (the last ones)
    tensor_split: tuple[float, ...] | None = None  # proportions among the endpoints (None: llama.cpp default)
    summary: str = ""  # for logs, e.g. "local 16 layers, node-b 15 layers"
    head_on_host: bool = False  # keep the output head's weights on this host (rpclib.keep_output_on_cpu)


# Called on the engine thread; blocks. True: the previous host child died (re-plan
# without what failed). Raises a MeshdError when no plan is possible.
PlanFor = Callable[[bool], HostPlan]


class _Lost(Exception):
    """The host child is gone (EOF, broken pipe): its RPC server or the child itself died."""


class SplitEngine:
    """One split model: a host child process with the context, replaced after a loss."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, plan_for: PlanFor, log_path: Path,
                 *, load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.plan_for = plan_for
        self.log_path = log_path
        self.load_timeout_s = load_timeout_s
        self.plan: HostPlan | None = None
        self.devices: list[dict[str, Any]] = []
        self.restarts = 0
        self.ready: dict[str, Any] = {}  # the child's whole ready message
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        # One conversation at a time on the socket: a prompt_tokens() from another
        # thread waits for the running generation rather than interleave with it.
        self._channel = threading.Lock()

    # --- lifecycle -------------------------------------------------------------

    def load(self) -> None:
        with self._channel:
            self._start(self.plan_for(False))

    def close(self) -> None:
        self._stop()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    @property
    def context_length(self) -> int:
        return int(self.ready["n_ctx"])

    @property
    def embedding_length(self) -> int:
        return int(self.ready["n_embd"])

    def _start(self, plan: HostPlan) -> None:
        """Spawn a host child for ``plan`` and wait for its ready; BackendError(split_load_failed)."""
        self._stop()
        ours, theirs = socket.socketpair()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- split host: {plan.summary or plan.endpoints} ---\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshd.split.host", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=child_env(),
            )
        theirs.close()  # or the child's death would never read as EOF here
        self._proc, self._sock = proc, ours
        config = {"path": str(self.path), "n_ctx": self.n_ctx, "n_threads": self.n_threads,
                  "endpoints": list(plan.endpoints), "n_gpu_layers": plan.n_gpu_layers,
                  "tensor_split": list(plan.tensor_split) if plan.tensor_split is not None else None,
                  "head_on_host": plan.head_on_host}
        try:
            send_msg(ours, config)
            ours.settimeout(self.load_timeout_s)
            ready = recv_msg(ours)
        except (OSError, BackendError) as exc:  # socket.timeout is an OSError
            self._stop()
            why = "did not load in time" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            raise BackendError(f"split host {why} (plan: {plan.summary}); {log_tail(self.log_path)}",
                               code="split_load_failed") from exc
        ours.settimeout(None)
        if ready is None or ready.get("op") != "ready":
            reason = error_from_wire(ready).message if ready is not None else (
                f"exited with code {self._reap()}: {log_tail(self.log_path) or '(no output)'}")
            self._stop()
            raise BackendError(f"cannot load split model {self.path.name} (plan: {plan.summary}): {reason}",
                               code="split_load_failed")
        self.plan, self.ready, self.devices = plan, ready, list(ready.get("devices") or [])
        log.info("split host ready", extra={"fields": {
            "pid": proc.pid, "plan": plan.summary, "load_s": ready.get("load_s"),
            "devices": ",".join(f"{d.get('device')}={d.get('model_buffer_mib')}MiB" for d in self.devices)}})

    def _reap(self) -> int | None:
        """Wait for (or kill) a child that should be exiting; its exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _stop(self) -> None:
        """EOF to the child (it exits 0), then SIGKILL if it lingers."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._reap()
        self._proc = None

    # --- requests ----------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        with self._channel:
            try:
                self._send({"op": "tokens", "request": request_to_wire(request)})
                reply = self._recv(None)
                assert reply is not None
            except _Lost as exc:
                self._lost(str(exc), 0)
                raise BackendError("the split worker was lost while tokenizing; retry",
                                   code="split_worker_lost") from None
        if reply.get("op") == "error":
            raise error_from_wire(reply)
        return list(reply["ids"]), list(reply.get("stops") or [])

    def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        raise InvalidRequest("embeddings are not served by a split model", code="unsupported")

    def generate(
        self,
        request: GenerationRequest,
        emit: Callable[[TextGenerated], None],
        cancelled: threading.Event,
    ) -> GenerationFinished:
        with self._channel:
            return self._generate(request, emit, cancelled)

    def _generate(self, request: GenerationRequest, emit: Callable[[TextGenerated], None],
                  cancelled: threading.Event) -> GenerationFinished:
        if self.plan is None:
            raise BackendError("the split model is not loaded", code="split_not_loaded")
        started = time.perf_counter()
        texts: list[str] = []  # delivered to the caller: a resumed child starts after these
        ids: list[int] = []
        first_text: float | None = None
        losses = 0
        why = ""
        while True:
            if not self.alive():
                if losses > MAX_RECOVERIES:
                    raise BackendError(f"the split worker was lost {losses} times during this request "
                                       f"({why}); giving up", code="split_worker_lost")
                plan = self.plan_for(True)  # its MeshdError (no plan possible) is the caller's answer
                try:
                    self._start(plan)
                except BackendError as exc:
                    losses, why = losses + 1, exc.message
                    continue
                self.restarts += 1
            attempt = replace(request, resume_token_ids=request.resume_token_ids + tuple(ids),
                              resume_text=request.resume_text + "".join(texts))
            attempt_started = time.perf_counter()

            def deliver(delta: TextGenerated) -> None:
                nonlocal first_text
                if first_text is None and delta.text:
                    first_text = time.perf_counter()
                texts.append(delta.text)
                ids.extend(delta.token_ids)
                emit(delta)

            try:
                done = self._run(attempt, deliver, cancelled)
            except _Lost as exc:
                why = str(exc)
                losses += 1
                self._lost(why, len(ids))
                if cancelled.is_set():
                    return GenerationFinished("cancelled", 0, len(request.resume_token_ids) + len(ids))
                if ids and _constrained(request):
                    # LlamaEngine cannot replay a grammar's state; say what happened, as a server error.
                    raise BackendError("the split worker was lost during constrained output, which cannot "
                                       "be resumed", code="split_worker_lost") from None
                continue
            ttft = done.ttft_s
            if losses:
                # The child's ttft is of the resumed run; the caller's is from the start.
                if first_text is not None:
                    ttft = first_text - started
                elif ttft is not None:
                    ttft += attempt_started - started
            return replace(done, ttft_s=ttft)

    def _run(self, request: GenerationRequest, deliver: Callable[[TextGenerated], None],
             cancelled: threading.Event) -> GenerationFinished:
        """One request on the current child; raises _Lost if the child goes away."""
        self._send({"op": "generate", "request": request_to_wire(request)})
        cancel_sent: float | None = None  # when
        while True:
            if cancelled.is_set() and cancel_sent is None:
                self._send({"op": "cancel"})
                cancel_sent = time.monotonic()
            message = self._recv(cancelled)
            if message is None:  # nothing yet: look at the cancel flag again
                if cancel_sent is not None and time.monotonic() - cancel_sent > CANCEL_GRACE_S:
                    raise _Lost(f"the host child did not stop within {CANCEL_GRACE_S:.0f} s of a cancel")
                continue
            op = message.get("op")
            if op == "text":
                if cancel_sent is None:  # after a cancel the caller has stopped listening
                    deliver(TextGenerated(message["text"], tuple(message.get("token_ids") or ())))
            elif op == "finished":
                return GenerationFinished(
                    finish_reason="cancelled" if cancel_sent is not None else message["finish_reason"],
                    prompt_tokens=int(message["prompt_tokens"]),
                    completion_tokens=int(message["completion_tokens"]),
                    ttft_s=message.get("ttft_s"),
                    cached_tokens=int(message.get("cached_tokens") or 0),
                )
            elif op == "error":
                raise error_from_wire(message)
            else:
                raise BackendError(f"unexpected split host message {op!r}", code="split_protocol_error")

    # --- the channel ---------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise _Lost("no host child")
        try:
            send_msg(self._sock, message)
        except OSError as exc:
            raise _Lost(f"cannot write to the host child: {exc}") from None

    def _recv(self, cancelled: threading.Event | None) -> dict[str, Any] | None:
        """The next message; None if none came within POLL_S while ``cancelled`` is given (to look at it)."""
        sock = self._sock
        if sock is None:
            raise _Lost("no host child")
        while True:
            readable, _, _ = select.select([sock], [], [], POLL_S)
            if readable:
                break
            if cancelled is not None:
                return None
        try:
            message = recv_msg(sock)
        except OSError as exc:
            raise _Lost(f"cannot read from the host child: {exc}") from None
        if message is None:
            raise _Lost("the host child closed its channel")
        return message

    def _lost(self, why: str, delivered_tokens: int) -> None:
        """Reap a dead (or dying) child and log what it said last."""
        proc = self._proc
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        code = self._reap()
        self._proc = None
        log.warning("split host lost", extra={"fields": {
            "pid": proc.pid if proc else None, "exit_code": code, "why": why,
            "plan": self.plan.summary if self.plan else None, "delivered_tokens": delivered_tokens,
            "log_tail": log_tail(self.log_path, 400)}})


def _constrained(request: GenerationRequest) -> bool:
    fmt = request.params.response_format
    return bool(fmt) and fmt.get("type") != "text"  # type: ignore[union-attr]
