"""One model state across worker processes: repository API calls, readiness and per-model readiness.

:class:`Cluster` is the single-process case (a call applies here, readiness is this process's).
:class:`WorkerCluster` shares a state directory, made by the supervisor for one run, with the other workers::

    expected                 how many workers the supervisor keeps running
    draining                 present from SIGTERM on: every worker's readiness fails
    workers/<pid>.json       each worker's state: ready, its models' ready versions, the last command applied
    commands/<gen>.json      repository API calls (index, load, unload), numbered in one sequence
    generation, lock         the last number given, and the lock (flock) that gives them out

A repository API call in any worker appends a command; every worker, the answering one included, applies
the commands in order, so all of them reach the same model state, and publishes the number it reached.
The answering worker waits until every live worker has reached its command, or answers 503 naming the
workers that did not follow in time. A worker that starts later (a replacement) reads the commands first:
models unloaded through the API stay unloaded there too. Disk changes are still found by each worker's
poller. Files are replaced atomically (write, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.errors import ServingError
from service.metrics import Metrics
from service.repository import ModelRepository

log = logging.getLogger("service.cluster")

TICK_SECONDS = 0.1
"""How often a worker looks for new commands and publishes its state (a tiny file read)."""
KEPT_ERRORS = 20


class WorkersOutOfStep(ServingError):
    """Some workers did not apply a repository call in time (or failed to): the model state may differ."""

    status = 503


async def apply_locally(repository: ModelRepository, action: str, model: str | None) -> None:
    """What a repository API call does in one process."""
    if action == "index":
        await repository.refresh()  # the index also picks up what changed on disk
    elif action == "load":
        await repository.load(str(model))
    elif action == "unload":
        await repository.unload(str(model))
    else:
        raise ValueError(f"unknown repository action {action!r}")


class Cluster:
    """A single process: a repository API call applies here; readiness is this process's own."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def join(self) -> None:
        """Before the models load."""

    def start(self, ready: Callable[[], bool]) -> None:
        """Once the models are loaded; ``ready`` tells whether this process is ready."""

    async def leave(self) -> None:
        """At shutdown."""

    async def apply(self, action: str, model: str | None = None) -> None:
        await apply_locally(self.repository, action, model)

    def ready(self) -> bool:
        """Every other worker is ready too."""
        return True

    def model_ready(self, name: str, version: str | None) -> bool:
        """Every other worker serves this model (version) too."""
        return True


# --- The shared directory (the supervisor's side too) --------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (killed, not yet reaped by the supervisor)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def prepare(directory: Path, workers: int) -> None:
    """Make an empty state directory for a run of ``workers`` workers."""
    (directory / "workers").mkdir(parents=True, exist_ok=True)
    (directory / "commands").mkdir(exist_ok=True)
    _write_json(directory / "generation", 0)
    set_expected(directory, workers)


def set_expected(directory: Path, workers: int) -> None:
    try:
        _write_json(directory / "expected", workers)
    except OSError:
        log.exception("could not record the number of workers")


def begin_drain(directory: Path) -> None:
    """From now on every worker's readiness fails."""
    try:
        (directory / "draining").touch()
    except OSError:  # the directory is gone (removed under us): nothing left to tell
        log.exception("could not mark the workers as draining")


def forget_worker(directory: Path, pid: int) -> None:
    """A dead worker's state no longer counts (its pid may even be reused)."""
    try:
        (directory / "workers" / f"{pid}.json").unlink(missing_ok=True)
    except OSError:
        log.exception("could not remove a worker's state")


class WorkerCluster(Cluster):
    """This worker's side of the shared state directory (see the module docstring)."""

    def __init__(self, directory: Path, repository: ModelRepository, metrics: Metrics, sync_seconds: float) -> None:
        super().__init__(repository)
        self.directory = Path(directory)
        self.metrics = metrics
        self.sync_seconds = sync_seconds
        self.pid = os.getpid()
        self.applied = 0
        self._joined_at = 0
        self._ready: Callable[[], bool] = lambda: False
        self._started = False
        self._lock = asyncio.Lock()  # commands apply one at a time, in order
        self._outcomes: dict[int, BaseException | None] = {}  # this worker's own commands, for their callers
        self._errors: dict[str, str] = {}  # generation -> why applying it failed here
        self._published: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._supervisor = 0

    # Lifecycle ---------------------------------------------------------------------------------

    async def join(self) -> None:
        self.pid = os.getpid()
        self._supervisor = os.getppid()
        self._publish()
        self._joined_at = self._generation()
        unloaded: dict[str, bool] = {}
        for generation in range(1, self._joined_at + 1):
            command = _read_json(self._command_path(generation)) or {}
            if command.get("action") in ("load", "unload"):
                unloaded[command["model"]] = command["action"] == "unload"
        self.repository.keep_unloaded(name for name, is_unloaded in unloaded.items() if is_unloaded)

    def start(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._started = True  # from here on this worker accepts connections: its readiness counts
        self.applied = max(self.applied, self._joined_at)
        self._publish()
        self._task = asyncio.create_task(self._follow())

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        forget_worker(self.directory, self.pid)
        if self._orphaned() and not self._statuses():
            shutil.rmtree(self.directory, ignore_errors=True)  # the supervisor did not live to remove it

    def _orphaned(self) -> bool:
        return os.getppid() != self._supervisor

    async def _follow(self) -> None:
        while True:
            if self._orphaned():
                # The supervisor was killed (SIGKILL, out of memory): stop as it would have stopped us.
                log.error("the supervisor is gone; shutting this worker down")
                os.kill(self.pid, signal.SIGTERM)
                return
            try:
                await self.catch_up()
                self.metrics.poll_functions()
                self._publish()
            except Exception:  # one bad tick must not stop the next
                log.exception("worker state sync failed")
            await asyncio.sleep(TICK_SECONDS)

    # Commands ----------------------------------------------------------------------------------

    async def apply(self, action: str, model: str | None = None) -> None:
        generation = await asyncio.to_thread(self._append, action, model)
        await self.catch_up()
        outcome = self._outcomes.pop(generation, None)
        if outcome is not None:
            raise outcome  # refused here (say, not loaded): refused the same way everywhere
        await self._wait_for(generation, action, model)

    def _append(self, action: str, model: str | None) -> int:
        with open(self.directory / "lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            generation = self._generation() + 1
            _write_json(self._command_path(generation),
                        {"generation": generation, "action": action, "model": model, "origin": self.pid})
            _write_json(self.directory / "generation", generation)
        return generation

    async def catch_up(self) -> None:
        """Apply every command not applied yet, in order."""
        async with self._lock:
            latest = self._generation()
            while self.applied < latest:
                generation = self.applied + 1
                command = _read_json(self._command_path(generation)) or {}
                outcome: BaseException | None = None
                try:
                    await apply_locally(self.repository, command.get("action", ""), command.get("model"))
                except ServingError as exc:
                    outcome = exc  # the same answer in every worker: nothing to apply
                except Exception as exc:
                    outcome = exc
                    self._errors[str(generation)] = f"{type(exc).__name__}: {exc}"
                    for old in list(self._errors)[:-KEPT_ERRORS]:
                        del self._errors[old]
                    log.exception("repository command failed", extra={"command": command})
                if command.get("origin") == self.pid:
                    self._outcomes[generation] = outcome
                self.applied = generation
                self._publish()

    async def _wait_for(self, generation: int, action: str, model: str | None) -> None:
        deadline = time.monotonic() + self.sync_seconds
        while True:
            others = [s for s in self._statuses() if s["pid"] != self.pid]
            behind = [s["pid"] for s in others if s["generation"] < generation]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise WorkersOutOfStep(
                    f"{self._describe(action, model)} was applied in worker {self.pid} but workers "
                    f"{', '.join(map(str, sorted(behind)))} did not apply it within {self.sync_seconds:g} s; "
                    "until they do, answers may differ between workers")
            await asyncio.sleep(0.02)
        failed = {s["pid"]: s["errors"][str(generation)] for s in others if str(generation) in s.get("errors", {})}
        if failed:
            raise WorkersOutOfStep(
                f"{self._describe(action, model)} failed in workers "
                + "; ".join(f"{pid}: {reason}" for pid, reason in sorted(failed.items())))

    @staticmethod
    def _describe(action: str, model: str | None) -> str:
        return f"repository {action}" + (f" of model {model!r}" if model else "")

    # Readiness ---------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the pod can serve. Until it first could: every expected worker is up and ready. From then on:
        every worker that serves is ready, and at least one does; a dead worker (gone at once from the statuses)
        and its replacement while it loads (it accepts no connection before its models are loaded) do not count,
        so one worker's death does not take the whole pod out of its load balancer."""
        if (self.directory / "draining").exists():
            return False
        statuses = self._serving()
        return bool(statuses) and all(s["ready"] for s in statuses)

    def _serving(self) -> list[dict[str, Any]]:
        """The statuses readiness is judged on; [] when the pod cannot be ready yet."""
        statuses = self._statuses()
        served = self.directory / "served"
        if served.exists():
            return [s for s in statuses if s.get("started")]
        if not (self._all_present(statuses) and all(s["ready"] for s in statuses)):
            return []
        with contextlib.suppress(OSError):
            served.touch()  # the pod has served: from now on, a worker's replacement does not unready it
        return statuses

    def model_ready(self, name: str, version: str | None) -> bool:
        statuses = self._serving()
        if not statuses:
            return False
        for status in statuses:
            versions = status["models"].get(name) or []
            # A label (stable, canary) names whichever version each worker routes it to: the model suffices.
            if not versions or (version is not None and version.isdigit() and int(version) not in versions):
                return False
        return True

    def _all_present(self, statuses: list[dict[str, Any]]) -> bool:
        expected = _read_json(self.directory / "expected")
        return len(statuses) >= (expected if isinstance(expected, int) else 1)

    # Files -------------------------------------------------------------------------------------

    def _generation(self) -> int:
        value = _read_json(self.directory / "generation")
        return value if isinstance(value, int) else 0

    def _command_path(self, generation: int) -> Path:
        return self.directory / "commands" / f"{generation:08d}.json"

    def _publish(self) -> None:
        """Write this worker's state if it changed."""
        status = {
            "pid": self.pid,
            "ready": bool(self._ready()),
            "started": self._started,
            "generation": self.applied,
            "models": {m.name: [v.version for v in m.ready_versions()] for m in self.repository.models()},
            "errors": dict(self._errors),
        }
        if status != self._published:
            _write_json(self.directory / "workers" / f"{self.pid}.json", status)
            self._published = status

    def _statuses(self) -> list[dict[str, Any]]:
        """The state of every live worker (this one included)."""
        statuses = []
        for path in (self.directory / "workers").glob("*.json"):
            status = _read_json(path)
            pid = status.get("pid") if isinstance(status, dict) else None
            if isinstance(pid, int) and pid > 0 and (pid == self.pid or _alive(pid)):
                statuses.append(status)
        return statuses
