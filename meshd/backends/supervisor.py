"""Run one child server process and keep it running: start, readiness, restart, stop.

Generic over the command, so the same code supervises ``vllm serve`` in
production and any server that answers HTTP in tests. The child runs in its
own process group, so stopping it also stops whatever it spawned (vLLM starts
worker processes); its output goes line by line to the daemon log.

If meshd itself is killed with SIGKILL the child survives it: run meshd under
systemd (the unit kills the whole control group) to rule that out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp

from ..errors import BackendError

log = logging.getLogger(__name__)
child_log = logging.getLogger("meshd.child")

SupervisorState = Literal["stopped", "starting", "ready", "backoff", "stopping", "failed"]


@dataclass(frozen=True)
class SupervisorConfig:
    name: str
    argv: tuple[str, ...]
    ready_url: str | None = None  # GET until it answers 200; None: ready once started
    env: Mapping[str, str] | None = None  # the child's whole environment; None inherits ours
    cwd: Path | None = None
    ready_timeout_s: float = 600.0  # a child not ready by then is killed and restarted
    ready_poll_s: float = 0.25
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_reset_s: float = 60.0  # a child that stayed up this long restarts after the initial delay
    stop_timeout_s: float = 10.0  # SIGTERM, then SIGKILL after this long


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildStarted:
    name: str
    pid: int


@dataclass(frozen=True)
class ChildReady:
    name: str
    pid: int
    after_s: float


@dataclass(frozen=True)
class ChildNotReady:
    """The child did not become ready within ``ready_timeout_s``; it is killed."""

    name: str
    pid: int
    after_s: float


@dataclass(frozen=True)
class ChildExited:
    name: str
    pid: int
    returncode: int
    uptime_s: float


@dataclass(frozen=True)
class RestartScheduled:
    name: str
    attempt: int  # consecutive quick failures so far
    delay_s: float


@dataclass(frozen=True)
class ChildStopped:
    name: str
    pid: int
    returncode: int
    killed: bool  # SIGTERM was not enough


SupervisorEvent = ChildStarted | ChildReady | ChildNotReady | ChildExited | RestartScheduled | ChildStopped


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Delay before restart ``attempt`` (1-based): doubling from ``initial``, capped."""
    return min(maximum, initial * 2 ** max(0, attempt - 1))


class ProcessSupervisor:
    """Keeps one child process running until ``stop``."""

    def __init__(self, config: SupervisorConfig, on_event: Callable[[SupervisorEvent], None] | None = None) -> None:
        self.config = config
        self.state: SupervisorState = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.last_output: collections.deque[str] = collections.deque(maxlen=40)
        self._on_event = on_event
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._first_start: asyncio.Future[None] | None = None

    def _emit(self, event: SupervisorEvent) -> None:
        log.info(type(event).__name__, extra={"fields": vars(event)})
        if self._on_event is not None:
            self._on_event(event)

    # --- public ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and wait until it is ready.

        Raises ``BackendError`` (with the child's last output) if the first
        child exits or times out before it is ready: that is a configuration
        problem, not something a restart fixes. Later failures restart it.
        """
        if self._task is not None:
            return
        self._stopping.clear()
        self._first_start = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.config.name}")
        try:
            await self._first_start
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def stop(self) -> None:
        """Stop the child (SIGTERM to its group, SIGKILL after ``stop_timeout_s``); no restart."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.state = "stopped"
        self._ready.clear()

    # --- the loop ----------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                proc = await self._spawn()
                outcome = await self._run_once(proc, started)
                if self._stopping.is_set() or outcome == "stopped":
                    return
                if self._first_start is not None and not self._first_start.done():
                    tail = "\n".join(self.last_output) or "(no output)"
                    self.state = "failed"
                    self._first_start.set_exception(BackendError(
                        f"{self.config.name}: the child {outcome} before it was ready; last output:\n{tail}",
                        code="child_failed",
                    ))
                    return
                uptime = time.monotonic() - started
                attempt = 1 if uptime >= self.config.backoff_reset_s else attempt + 1
                delay = backoff_delay(attempt, self.config.backoff_initial_s, self.config.backoff_max_s)
                self.state = "backoff"
                self._emit(RestartScheduled(self.config.name, attempt, delay))
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    return
                except TimeoutError:
                    self.restarts += 1
        except OSError as exc:
            self.state = "failed"
            error = BackendError(f"{self.config.name}: cannot start {self.config.argv[0]}: {exc.strerror or exc}",
                                 code="child_failed")
            if self._first_start is not None and not self._first_start.done():
                self._first_start.set_exception(error)
            else:
                log.error("child cannot be restarted", extra={"fields": {"child": self.config.name, "error": error.message}})
        finally:
            if self._first_start is not None and not self._first_start.done():
                self._first_start.set_exception(BackendError(f"{self.config.name}: stopped before it was ready",
                                                             code="child_failed"))

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.state = "starting"
        self._ready.clear()
        proc = await asyncio.create_subprocess_exec(
            *self.config.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(self.config.env) if self.config.env is not None else None,
            cwd=self.config.cwd,
            start_new_session=True,  # its own process group: stop reaches its workers too
        )
        self._proc, self.pid = proc, proc.pid
        self._emit(ChildStarted(self.config.name, proc.pid))
        return proc

    async def _run_once(self, proc: asyncio.subprocess.Process, started: float) -> str:
        """Run one child to its end; returns how it ended."""
        pump = asyncio.create_task(self._pump_output(proc))
        ready = asyncio.create_task(self._await_ready(proc, started))
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        outcome = "exited"
        try:
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(proc)
                return "stopped"
            if ready.done() and not ready.cancelled() and ready.exception() is None and ready.result() is False:
                outcome = "was not ready in time"
            self._emit(ChildExited(self.config.name, proc.pid, proc.returncode or 0, time.monotonic() - started))
            return outcome if outcome != "exited" else f"exited with code {proc.returncode}"
        finally:
            self._ready.clear()
            for task in (ready, exited, stopping):
                task.cancel()
            self._kill_group(proc.pid)  # anything it left behind in its group
            await asyncio.gather(ready, exited, stopping, return_exceptions=True)
            # The pump ends when the last writer closes the pipe; a grandchild that
            # left the group could hold it open, so do not wait for that forever.
            await asyncio.wait([pump], timeout=2.0)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _await_ready(self, proc: asyncio.subprocess.Process, started: float) -> bool:
        url = self.config.ready_url
        if url is not None:
            deadline = started + self.config.ready_timeout_s
            timeout = aiohttp.ClientTimeout(total=max(1.0, self.config.ready_poll_s * 4))
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while True:
                    if time.monotonic() > deadline:
                        self._emit(ChildNotReady(self.config.name, proc.pid, time.monotonic() - started))
                        self._kill_group(proc.pid)
                        return False
                    try:
                        async with session.get(url) as resp:
                            if resp.status == 200:
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass  # not listening yet: that is what we are waiting for
                    await asyncio.sleep(self.config.ready_poll_s)
        self.state = "ready"
        self._ready.set()
        self._emit(ChildReady(self.config.name, proc.pid, time.monotonic() - started))
        if self._first_start is not None and not self._first_start.done():
            self._first_start.set_result(None)
        return True

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        """Every line the child writes goes to the daemon log (logger ``meshd.child``)."""
        if proc.stdout is None:
            return
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                line = await proc.stdout.read(65536)
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip()
            if text:
                self.last_output.append(text)
                child_log.info(text, extra={"fields": {"child": self.config.name, "pid": proc.pid}})

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        self.state = "stopping"
        killed = False
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.stop_timeout_s)
        except TimeoutError:
            killed = True
            self._kill_group(proc.pid)
            await proc.wait()
        self._emit(ChildStopped(self.config.name, proc.pid, proc.returncode or 0, killed))

    def _kill_group(self, pgid: int) -> None:
        self._signal_group(pgid, signal.SIGKILL)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass  # the group is already empty
        except PermissionError as exc:
            log.warning("cannot signal the child's process group", extra={"fields": {"pgid": pgid, "error": str(exc)}})


__all__ = [
    "ChildExited",
    "ChildNotReady",
    "ChildReady",
    "ChildStarted",
    "ChildStopped",
    "ProcessSupervisor",
    "RestartScheduled",
    "SupervisorConfig",
    "SupervisorEvent",
    "SupervisorState",
    "backoff_delay",
]
