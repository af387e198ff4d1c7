"""Safe online rollout: a newly published version is a candidate, tried on real traffic before it serves.

A model's rollout row in the state store (:mod:`service.state.store`) says which version is ``stable`` (answers
unversioned requests) and which is the ``candidate``, in which mode:

- ``shadow``: stable answers every request; the candidate runs on a copy of a fraction of them
  (``CONVSERVE_ROLLOUT_SHADOW_FRACTION``) after the answer is computed, off the client's path;
- ``canary``: a share of unversioned requests (``CONVSERVE_ROLLOUT_TRAFFIC``) is answered by the candidate, the
  same arm for the same ``X-Rollout-Key``; stable runs on a copy of a fraction of those, off the path.

Either way the two versions' top-1 answers are compared on the same inputs (agreement), and each arm's answers,
errors and latencies are counted. Every worker keeps its own running totals for the phase and writes them to the
store on each sync (``rollout_counts``); the phase's evidence is their sum, so every worker and replica judges
the same figures, and whichever first writes a decision (a change of the row at the revision it read) takes it:
the others find the row changed and follow it. :func:`evaluate` is the decision, on the guards:

=============  =========================================================================================
agreement      rows on which both answered the same class; Wilson interval of the proportion
errors         candidate error rate minus stable's; Newcombe's interval of the difference
latency        candidate p99 over stable's p99 (stable's floored at 2 ms), from the phase's histograms;
               the candidate's p99 bounded below by an order statistic (normal approximation of its rank)
accuracy       candidate live accuracy minus stable's on labelled predictions (feedback) of the phase;
               Newcombe's interval; only once each arm has ``CONVSERVE_ROLLOUT_MIN_LABELS`` labels
=============  =========================================================================================

A guard *fails* when its whole 99% interval is on the wrong side of its threshold (clear evidence, taken at
any time, before the minimum of answers too), *holds* when its estimate is on the right side, and is *pending*
otherwise. Once the candidate has ``CONVSERVE_ROLLOUT_MIN_REQUESTS`` answers and every guard holds, the phase
passes: a shadow moves to canary (or straight to promotion, ``CONVSERVE_ROLLOUT_AFTER_SHADOW=promote``), a
canary is promoted. A phase still undecided after ``CONVSERVE_ROLLOUT_MAX_SECONDS`` is rolled back: a
candidate is served only on evidence.

Latencies are what each arm's answers took in this process: the client's request for the arm that answered it
(decoding included), the copy's run for a shadow candidate (queue and inference; decoding too when the two
versions preprocess differently). In shadow the candidate is therefore timed without the decoding stable pays,
a lenient comparison; in canary both arms answer clients the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import Conflict, ModelNotFound, ModelNotReady, Overloaded, UnprocessableInput
from service.metrics import Metrics
from service.repository import Model, ModelRepository, ModelVersion
from service.settings import Settings
from service.state.quality import wilson_interval

if TYPE_CHECKING:
    from service.decoding import DecodePool
    from service.state import State

log = logging.getLogger("service.rollout")

Z99 = 2.5758293035489004
"""The standard normal quantile of a two-sided 99% interval: the evidence is looked at on every sync, so each
look is held to a stricter level than a single test would be."""
LATENCY_BOUNDS = tuple(1e-4 * 2 ** (i / 4) for i in range(73))
"""Upper bounds of the latency histograms' buckets: 0.1 ms to 26 s, each 19% above the last."""
LATENCY_FLOOR_SECONDS = 0.002
"""Stable's p99 below this counts as this: a candidate taking 1.5 ms where stable takes 0.6 ms is not slow."""
LATENCY_MIN_SAMPLES = 50
MAX_MIRRORS = 32
"""Most copies of requests running at once per model and worker; more are skipped (and counted)."""
STATE_CODES = {None: 0, "shadow": 1, "canary": 2}
HISTORY_DECISIONS = ("promoted", "rolled_back", "aborted")


# --- Statistics --------------------------------------------------------------------------------------------

def difference_interval(s1: int, n1: int, s2: int, n2: int, z: float = Z99) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval (his method 10) of ``s1/n1 - s2/n2``, from the two Wilson intervals."""
    a, b = wilson_interval(s1, n1, z), wilson_interval(s2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = s1 / n1, s2 / n2
    d = p1 - p2
    return (d - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2),
            d + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2))


def quantile(histogram: list[int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram over :data:`LATENCY_BOUNDS` (its bucket's upper bound)."""
    total = sum(histogram)
    if total == 0:
        return None
    return _ranked(histogram, max(1, math.ceil(q * total)), upper=True)


def quantile_lower_bound(histogram: list[int], q: float, z: float = Z99) -> float | None:
    """A lower confidence bound of the ``q`` quantile: the order statistic of rank ``n q - z sqrt(n q (1-q))``
    (the normal approximation of the rank's binomial distribution), at its bucket's lower bound."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = math.floor(total * q - z * math.sqrt(total * q * (1 - q)))
    return _ranked(histogram, rank, upper=False) if rank >= 1 else 0.0


def _ranked(histogram: list[int], rank: int, upper: bool) -> float:
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return LATENCY_BOUNDS[i] if upper else (LATENCY_BOUNDS[i - 1] if i else 0.0)
    return LATENCY_BOUNDS[-1]


def latency_bucket(seconds: float) -> int:
    if seconds <= LATENCY_BOUNDS[0]:
        return 0
    return min(len(LATENCY_BOUNDS) - 1, math.ceil(4 * math.log2(seconds / LATENCY_BOUNDS[0]) - 1e-9))


def key_share(model: str, key: str) -> float:
    """Where a rollout key falls in [0, 1): below the canary's traffic share, the candidate answers it."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


# --- Evidence ------------------------------------------------------------------------------------------------

def _histogram() -> list[int]:
    return [0] * len(LATENCY_BOUNDS)


@dataclass
class PhaseCounts:
    """What one process saw of one rollout phase (and, summed, what every process saw)."""

    candidate: int = 0
    """Candidate answers: its shadow runs, or the canary requests it answered."""
    candidate_errors: int = 0
    stable: int = 0
    """Requests stable answered during the phase."""
    stable_errors: int = 0
    compared: int = 0
    """Rows both versions answered (the request's answer and its copy's)."""
    agreed: int = 0
    skipped: int = 0
    """Copies not run: too many running already, or the other version busy or gone."""
    candidate_latency: list[int] = field(default_factory=_histogram)
    stable_latency: list[int] = field(default_factory=_histogram)

    def answered(self, candidate: bool, seconds: float, error: bool) -> None:
        if candidate:
            self.candidate += 1
            self.candidate_errors += error
            if not error:
                self.candidate_latency[latency_bucket(seconds)] += 1
        else:
            self.stable += 1
            self.stable_errors += error
            if not error:
                self.stable_latency[latency_bucket(seconds)] += 1

    def add(self, other: PhaseCounts) -> None:
        for name in ("candidate", "candidate_errors", "stable", "stable_errors", "compared", "agreed", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("candidate_latency", "stable_latency"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for i, n in enumerate(theirs[:len(mine)]):
                mine[i] += n

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PhaseCounts:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Thresholds:
    min_requests: int
    max_seconds: float
    min_agreement: float
    max_error_increase: float
    max_latency_ratio: float
    max_accuracy_drop: float
    min_labels: int

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(settings.rollout_min_requests, settings.rollout_max_seconds, settings.rollout_min_agreement,
                   settings.rollout_max_error_increase, settings.rollout_max_latency_ratio,
                   settings.rollout_max_accuracy_drop, settings.rollout_min_labels)


@dataclass(frozen=True)
class Guard:
    name: str
    status: str  # holds, fails, pending, no_data
    value: float | None
    threshold: float
    interval: tuple[float, float] | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "value": self.value, "threshold": self.threshold}
        if self.interval is not None:
            out["ci99"] = [round(x, 6) if math.isfinite(x) else None for x in self.interval]
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class Accuracy:
    """Labelled predictions of the phase per arm: (correct, labelled)."""

    stable: tuple[int, int]
    candidate: tuple[int, int]


@dataclass(frozen=True)
class Verdict:
    action: str  # wait, pass, rollback
    reason: str  # a code: agreement, errors, latency, accuracy, deadline, guards_held, evidence
    detail: str
    guards: tuple[Guard, ...]

    def evidence(self, counts: PhaseCounts) -> dict[str, Any]:
        return {"guards": {g.name: g.to_dict() for g in self.guards},
                "candidate_answers": counts.candidate, "stable_answers": counts.stable,
                "compared": counts.compared, "agreed": counts.agreed}


def _agreement(c: PhaseCounts, t: Thresholds) -> Guard:
    interval = wilson_interval(c.agreed, c.compared, Z99)
    if interval is None:
        return Guard("agreement", "pending", None, t.min_agreement, detail="no compared answers yet")
    value = c.agreed / c.compared
    status = "fails" if interval[1] < t.min_agreement else "holds" if value >= t.min_agreement else "pending"
    return Guard("agreement", status, round(value, 6), t.min_agreement, interval,
                 f"{c.agreed} of {c.compared} compared rows agree")


def _errors(c: PhaseCounts, t: Thresholds) -> Guard:
    if c.candidate == 0:
        return Guard("errors", "pending", None, t.max_error_increase, detail="no candidate answers yet")
    interval = difference_interval(c.candidate_errors, c.candidate, c.stable_errors, max(c.stable, 1))
    value = c.candidate_errors / c.candidate - c.stable_errors / max(c.stable, 1)
    status = ("fails" if interval is not None and interval[0] > t.max_error_increase
              else "holds" if value <= t.max_error_increase else "pending")
    return Guard("errors", status, round(value, 6), t.max_error_increase, interval,
                 f"candidate {c.candidate_errors}/{c.candidate} errors, stable {c.stable_errors}/{c.stable}")


def _latency(c: PhaseCounts, t: Thresholds) -> Guard:
    n_candidate, n_stable = sum(c.candidate_latency), sum(c.stable_latency)
    if min(n_candidate, n_stable) < LATENCY_MIN_SAMPLES:
        return Guard("latency", "pending", None, t.max_latency_ratio,
                     detail=f"{min(n_candidate, n_stable)} of {LATENCY_MIN_SAMPLES} timed answers")
    p99_candidate, p99_stable = quantile(c.candidate_latency, 0.99), quantile(c.stable_latency, 0.99)
    low_candidate = quantile_lower_bound(c.candidate_latency, 0.99)
    assert p99_candidate is not None and p99_stable is not None and low_candidate is not None
    base = max(p99_stable, LATENCY_FLOOR_SECONDS)
    ratio = p99_candidate / base
    status = ("fails" if low_candidate / base > t.max_latency_ratio
              else "holds" if ratio <= t.max_latency_ratio else "pending")
    return Guard("latency", status, round(ratio, 4), t.max_latency_ratio, (low_candidate / base, math.inf),
                 f"p99 candidate {p99_candidate * 1000:.2f} ms (at least {low_candidate * 1000:.2f}), "
                 f"stable {p99_stable * 1000:.2f} ms")


def _accuracy(a: Accuracy | None, t: Thresholds) -> Guard:
    threshold = -t.max_accuracy_drop
    if a is None or min(a.stable[1], a.candidate[1]) < t.min_labels:
        labelled = "no" if a is None else f"{a.candidate[1]} candidate and {a.stable[1]} stable"
        return Guard("accuracy", "no_data", None, threshold,
                     detail=f"{labelled} labelled predictions (needs {t.min_labels} per arm)")
    (sc, sn), (cc, cn) = a.stable, a.candidate
    interval = difference_interval(cc, cn, sc, sn)
    value = cc / cn - sc / sn
    status = ("fails" if interval is not None and interval[1] < threshold
              else "holds" if value >= threshold else "pending")
    return Guard("accuracy", status, round(value, 6), threshold, interval,
                 f"candidate {cc}/{cn} correct, stable {sc}/{sn}")


def evaluate(counts: PhaseCounts, accuracy: Accuracy | None, t: Thresholds, elapsed: float) -> Verdict:
    """The decision on a phase's evidence (see the module docstring)."""
    guards = (_agreement(counts, t), _errors(counts, t), _latency(counts, t), _accuracy(accuracy, t))
    for guard in guards:
        if guard.status == "fails":
            return Verdict("rollback", guard.name, f"{guard.name} fails: {guard.detail}", guards)
    enough = counts.candidate >= t.min_requests
    if enough and all(g.status in ("holds", "no_data") for g in guards):
        return Verdict("pass", "guards_held", f"every guard holds after {counts.candidate} candidate answers",
                       guards)
    if elapsed >= t.max_seconds:
        waiting = [g.name for g in guards if g.status == "pending"]
        why = (f"{counts.candidate} of {t.min_requests} candidate answers" if not enough
               else "pending: " + ", ".join(waiting))
        return Verdict("rollback", "deadline", f"undecided after {elapsed:.0f} s ({why})", guards)
    return Verdict("wait", "evidence", "gathering evidence", guards)


# --- The rollouts of one process -----------------------------------------------------------------------

@dataclass
class Active:
    """A model's running rollout, as this process routes it."""

    model: str
    stable: int
    candidate: int
    mode: str
    traffic: float
    phase: str
    started_at: float
    counts: PhaseCounts = field(default_factory=PhaseCounts)
    mirrors: int = 0


class Rollouts:
    """Routing, copies and decisions of every model's rollout in this process; :meth:`run` keeps them in line
    with the store."""

    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics, state: State | None,
                 decoder: DecodePool) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.state = state
        self.decoder = decoder
        self.thresholds = Thresholds.of(settings)
        self.process = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.active: dict[str, Active] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.blocked: dict[str, set[int]] = {}
        self.verdicts: dict[str, Verdict] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one sync at a time (the loop's, an admin call's)

    # Modes --------------------------------------------------------------------------------------------

    def mode_of(self, model: Model) -> str:
        """The model's rollout mode: its config.pbtxt ``rollout`` parameter, else ``CONVSERVE_ROLLOUT``; off
        without a state store."""
        if self.state is None:
            return "off"
        config = model.config
        if config is not None and "rollout" in config.parameters:
            return config.parameters["rollout"].string_value.strip().lower()
        return self.settings.rollout

    # The request path ---------------------------------------------------------------------------------

    def route(self, name: str, key: str | None) -> str | None:
        """The version an unversioned request goes to when a canary takes it (else None: stable)."""
        a = self.active.get(name)
        if a is None or a.mode != "canary":
            return None
        share = key_share(name, key) if key else random.random()
        return str(a.candidate) if share < a.traffic else None

    def arm(self, mv: ModelVersion) -> str | None:
        a = self.active.get(mv.name)
        if a is None:
            return None
        return "candidate" if mv.version == a.candidate else "stable" if mv.version == a.stable else None

    def answered(self, mv: ModelVersion, seconds: float, error: bool) -> None:
        """Count a client's answer (or failure) by a version in a rollout."""
        a = self.active.get(mv.name)
        if a is not None and mv.version in (a.stable, a.candidate):
            a.counts.answered(mv.version == a.candidate, seconds, error)

    def mirror_target(self, mv: ModelVersion) -> ModelVersion | None:
        """The other version, when this answer's request is to be copied to it (shadow: the candidate, on a
        fraction of stable's answers; canary: stable, on a fraction of the candidate's)."""
        a = self.active.get(mv.name)
        if a is None:
            return None
        if mv.version == a.stable and a.mode == "shadow":
            other = a.candidate
        elif mv.version == a.candidate:
            other = a.stable
        else:
            return None
        if random.random() >= self.settings.rollout_shadow_fraction:
            return None
        target = self.repository.model(mv.name).loaded.get(other)
        if target is None or not target.ready or a.mirrors >= MAX_MIRRORS:
            a.counts.skipped += 1
            return None
        return target

    def mirror(self, answered: ModelVersion, target: ModelVersion, classes: list[int],
               rows: np.ndarray | None, images: list[bytes] | None) -> None:
        """Run the copy in the background: the client's answer does not wait for it."""
        a = self.active.get(answered.name)
        if a is None:
            return
        if rows is None:  # images the other version decodes its own way: a task of its own
            a.mirrors += 1
            task = asyncio.get_running_loop().create_task(self._mirror(a, target, classes, rows, images))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        # Rows ready: straight into the other version's queue, its answer compared by a callback (no task, no
        # coroutine: a copy costs the request next to nothing beyond the inference itself).
        hold = target.hold() if target.ready else None
        if hold is None:
            a.counts.skipped += 1
            return
        hold.__enter__()
        try:
            target.batcher.check_capacity()
            future = target.batcher.enqueue(len(rows), rows)
        except (ModelNotReady, Overloaded):
            hold.__exit__(None, None, None)
            a.counts.skipped += 1
            return
        a.mirrors += 1
        started = time.perf_counter()

        def done(f: asyncio.Future[Any]) -> None:
            hold.__exit__(None, None, None)
            a.mirrors -= 1
            error = f.cancelled() or f.exception() is not None
            self._compare(a, target, classes, None if error else f.result(), time.perf_counter() - started)

        future.add_done_callback(done)

    def _compare(self, a: Active, target: ModelVersion, classes: list[int], outputs: Any, seconds: float) -> None:
        counts, is_candidate = a.counts, target.version == a.candidate
        probabilities = outputs.get(target.output.name) if outputs is not None else None
        if (probabilities is None or probabilities.shape[0] != len(classes)
                or not np.isfinite(probabilities).all()):
            if is_candidate:
                counts.answered(True, 0.0, True)  # the candidate failed on a request stable answered
            else:
                counts.skipped += 1
            return
        if is_candidate:
            counts.answered(True, seconds, False)
        counts.compared += len(classes)
        counts.agreed += sum(x == y for x, y in zip(classes, probabilities.argmax(axis=1).tolist()))

    async def _mirror(self, a: Active, target: ModelVersion, classes: list[int], rows: np.ndarray | None,
                      images: list[bytes] | None) -> None:
        started = time.perf_counter()
        outputs = None
        try:
            with target.hold():
                target.batcher.check_capacity()
                assert images is not None
                outputs = await self.decoder.outputs(images, target.image_spec, lambda _s: None,
                                                     target.predict, target.predict_prepared)
        except (ModelNotReady, Overloaded):
            a.counts.skipped += 1
            return
        except Exception as exc:  # counted as the copy's failure below
            log.debug("rollout copy failed", extra={"model": a.model, "version": target.version,
                                                    "error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            a.mirrors -= 1
        self._compare(a, target, classes, outputs, time.perf_counter() - started)

    def thresholds_of(self, model: Model) -> Thresholds:
        """The guards' thresholds; a model's config.pbtxt parameter ``rollout_min_agreement`` sets its own."""
        config = model.config
        if config is not None and "rollout_min_agreement" in config.parameters:
            value = float(config.parameters["rollout_min_agreement"].string_value)
            return dataclasses.replace(self.thresholds, min_agreement=value)
        return self.thresholds

    # Sync with the store ------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.state is None:
            return
        while True:
            await asyncio.sleep(self.settings.rollout_sync_seconds)
            try:
                await self.sync()
            except Exception:  # the store is down: routing keeps its last state
                log.warning("rollout sync failed", exc_info=True)

    async def load(self) -> None:
        """Before the first load: serve what the store says (a restart mid-rollout resumes it)."""
        if self.state is None:
            return
        rows, blocked = await self.state.call(self.state.store.rollout_state)
        self.rows, self.blocked = rows, blocked
        for name, row in rows.items():
            self.repository.pin(name, row["stable"], row["candidate"], blocked.get(name, set()))

    async def sync(self) -> None:
        """Read every rollout, apply it here, start rollouts for new versions, and decide running ones."""
        if self.state is None:
            return
        async with self._lock:
            store = self.state.store
            rows, blocked = await self.state.call(store.rollout_state)
            on_disk = await asyncio.to_thread(self.repository.discover)
            now = time.time()
            for model in self.repository.models():
                name = model.name
                if self.mode_of(model) == "off":
                    self._deactivate(name)
                    if self.repository.pin(name, None, None, set()):
                        await self.repository.refresh(only=name)
                    continue
                row = rows.get(name)
                if row is None:
                    if model.serving is not None:
                        await self.state.call(store.create_rollout, name, model.serving.version)
                    continue
                await self._apply(model, row, blocked.get(name, set()))
                await self._step(model, row, blocked.get(name, set()), on_disk.get(name, []), now)
            self.rows, self.blocked = rows, blocked

    async def _apply(self, model: Model, row: dict[str, Any], blocked: set[int]) -> None:
        name = model.name
        if self.repository.pin(name, row["stable"], row["candidate"], blocked):
            await self.repository.refresh(only=name)
        if row["candidate"] is None or row["mode"] is None:
            self._deactivate(name)
            return
        a = self.active.get(name)
        if a is None or a.phase != row["phase"]:
            a = self.active[name] = Active(name, row["stable"], row["candidate"], row["mode"], row["traffic"],
                                           row["phase"], row["started_at"])
        a.stable, a.candidate, a.mode, a.traffic = row["stable"], row["candidate"], row["mode"], row["traffic"]
        self.metrics.rollout_state.labels(name).set(STATE_CODES.get(a.mode, 0))

    def _deactivate(self, name: str) -> None:
        if self.active.pop(name, None) is not None or name in self.rows:
            self.metrics.rollout_state.labels(name).set(0)
        self.verdicts.pop(name, None)

    async def _step(self, model: Model, row: dict[str, Any], blocked: set[int], on_disk: list[int],
                    now: float) -> None:
        stable, candidate = row["stable"], row["candidate"]
        ready = {mv.version for mv in model.ready_versions()}
        newer = [v for v in on_disk if v not in blocked and v in ready and v > max(stable or 0, candidate or 0)]
        if candidate is None:
            if stable not in on_disk and model.serving is not None and model.serving.version != stable:
                await self._change(model, row, {"stable": model.serving.version}, "promoted", model.serving.version,
                                   "stable_gone", f"version {stable} is no longer in the model repository", {})
            elif newer:
                await self._start(model, row, max(newer), self.mode_of(model), self.settings.rollout_traffic)
            return
        if candidate not in on_disk:
            await self._change(model, row, _ended(), "aborted", candidate, "candidate_gone",
                               f"version {candidate} is no longer in the model repository", {})
        elif newer:
            await self._start(model, row, max(newer), self.mode_of(model), self.settings.rollout_traffic,
                              f"superseded by version {max(newer)}")
        elif stable not in on_disk:
            await self._change(model, row, {**_ended(), "stable": candidate}, "promoted", candidate, "stable_gone",
                               f"version {stable} is no longer in the model repository", {})
        else:
            await self._decide(model, row, now)

    async def _start(self, model: Model, row: dict[str, Any], candidate: int, mode: str, traffic: float,
                     replaces: str | None = None) -> bool:
        values = {"candidate": candidate, "mode": mode, "traffic": traffic if mode == "canary" else 0.0,
                  "phase": secrets.token_hex(8), "started_at": time.time()}
        history = []
        if row["candidate"] is not None and row["candidate"] != candidate:
            history.append(_history(row["candidate"], "aborted", replaces or "replaced", {}))
        won = await self.state_call("change_rollout", model.name, row["revision"], values, history)
        if won:
            if history:
                self.metrics.rollout_decisions.labels(model.name, "aborted", "superseded").inc()
            log.info("rollout started", extra={"model": model.name, "stable": row["stable"], "candidate": candidate,
                                               "mode": mode, "traffic": values["traffic"]})
            await self._refresh_row(model)
        return won

    async def _decide(self, model: Model, row: dict[str, Any], now: float) -> None:
        assert self.state is not None
        a = self.active.get(model.name)
        if a is None:
            return
        store = self.state.store
        await self.state.call(store.put_counts, a.phase, self.process, a.counts.to_json())
        totals = PhaseCounts()
        for text in await self.state.call(store.phase_counts, a.phase):
            totals.add(PhaseCounts.from_json(text))
        accuracy = await self._accuracy(model.name, a)
        verdict = evaluate(totals, accuracy, self.thresholds_of(model), now - a.started_at)
        self.verdicts[model.name] = verdict
        if totals.compared:
            self.metrics.rollout_agreement.labels(model.name, str(a.candidate)).set(totals.agreed / totals.compared)
        evidence = verdict.evidence(totals)
        if verdict.action == "rollback":
            await self._change(model, row, _ended(), "rolled_back", a.candidate, verdict.reason, verdict.detail,
                               evidence)
        elif verdict.action == "pass":
            if a.mode == "shadow" and self.settings.rollout_after_shadow == "canary":
                if await self._start(model, row, a.candidate, "canary", self.settings.rollout_traffic):
                    log.info("rollout decision", extra={"model": model.name, "version": a.candidate,
                                                        "decision": "advanced", "reason": verdict.reason,
                                                        "detail": "shadow passed; canary next", "evidence": evidence})
            else:
                await self._change(model, row, {**_ended(), "stable": a.candidate}, "promoted", a.candidate,
                                   verdict.reason, verdict.detail, evidence)

    async def _accuracy(self, name: str, a: Active) -> Accuracy:
        counts = await self.state_call("labelled_counts", name, a.started_at)
        return Accuracy(counts.get(str(a.stable), (0, 0)), counts.get(str(a.candidate), (0, 0)))

    async def _change(self, model: Model, row: dict[str, Any], values: dict[str, Any], decision: str, version: int,
                      reason: str, detail: str, evidence: dict[str, Any]) -> bool:
        won = await self.state_call("change_rollout", model.name, row["revision"], values,
                                    [_history(version, decision, detail, evidence)])
        if won:
            self.metrics.rollout_decisions.labels(model.name, decision, reason).inc()
            log.info("rollout decision", extra={"model": model.name, "version": version, "decision": decision,
                                                "reason": reason, "detail": detail, "evidence": evidence})
            await self._refresh_row(model)
        return won

    async def state_call(self, method: str, *args: Any) -> Any:
        assert self.state is not None
        return await self.state.call(getattr(self.state.store, method), *args)

    async def _refresh_row(self, model: Model) -> None:
        """Apply a change this process just wrote, without waiting for the next sync."""
        rows, blocked = await self.state_call("rollout_state")
        if model.name in rows:
            await self._apply(model, rows[model.name], blocked.get(model.name, set()))
        self.rows, self.blocked = rows, blocked

    # The API ----------------------------------------------------------------------------------------

    async def describe(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}/rollout``."""
        model = self.repository.model(name)
        mode = self.mode_of(model)
        if mode == "off" or self.state is None:
            serving = model.serving
            return {"model": name, "stable": str(serving.version) if serving else None, "candidate": None,
                    "mode": "off", "traffic": 0.0, "state": "off", "guards": {}, "history": []}
        rows, _ = await self.state_call("rollout_state")
        row = rows.get(name)
        history = await self.state_call("rollout_history", name)
        guards: dict[str, Any] = {}
        if row is not None and row["candidate"] is not None and row["phase"] is not None:
            # From the row, not this worker's routing: the answer is the same whichever worker gives it.
            a = Active(name, row["stable"], row["candidate"], row["mode"], row["traffic"], row["phase"],
                       row["started_at"])
            totals = PhaseCounts()
            for text in await self.state_call("phase_counts", a.phase):
                totals.add(PhaseCounts.from_json(text))
            thresholds = self.thresholds_of(model)
            verdict = evaluate(totals, await self._accuracy(name, a), thresholds, time.time() - a.started_at)
            guards = {**verdict.evidence(totals)["guards"], "candidate_answers": totals.candidate,
                      "stable_answers": totals.stable, "compared": totals.compared, "skipped": totals.skipped,
                      "min_requests": thresholds.min_requests,
                      "seconds": round(time.time() - a.started_at, 1), "max_seconds": thresholds.max_seconds}
        candidate = row["candidate"] if row else None
        return {
            "model": name,
            "stable": str(row["stable"]) if row and row["stable"] is not None else
            (str(model.serving.version) if model.serving else None),
            "candidate": str(candidate) if candidate is not None else None,
            "mode": (row["mode"] if row and candidate is not None else mode),
            "traffic": row["traffic"] if row and candidate is not None else 0.0,
            "state": row["mode"] if row and candidate is not None else "stable",
            "started_at": row["started_at"] if row and candidate is not None else None,
            "guards": guards,
            "history": [{"version": str(h["version"]), "decision": h["decision"], "reason": h["reason"],
                         "evidence": json.loads(h["evidence"] or "{}"), "at": h["at"]} for h in history],
        }

    async def _fresh_row(self, model: Model) -> dict[str, Any]:
        if self.mode_of(model) == "off" or self.state is None:
            raise Conflict(f"rollouts are off for model {model.name!r} (CONVSERVE_ROLLOUT=off, its config.pbtxt, "
                           "or no state store)")
        rows, _ = await self.state_call("rollout_state")
        row = rows.get(model.name)
        if row is None:
            if model.serving is None:
                raise ModelNotReady(f"model {model.name!r} has no ready version")
            await self.state_call("create_rollout", model.name, model.serving.version)
            rows, _ = await self.state_call("rollout_state")
            row = rows[model.name]
        return row

    async def _on_disk(self, name: str, version: str) -> int:
        if not version.isdigit() or int(version) not in (await asyncio.to_thread(self.repository.discover)).get(
                name, []):
            raise ModelNotFound(f"model {name!r} has no version {version!r} in the model repository")
        return int(version)

    async def _by_hand(self, name: str, act: Callable[[Model, dict[str, Any]], Any]) -> dict[str, Any]:
        async with self._lock:
            model = self.repository.model(name)
            for _ in range(5):  # another process may change the row between our read and our write
                if await act(model, await self._fresh_row(model)):
                    break
            else:
                raise Conflict(f"the rollout of {name!r} kept changing; retry")
        return await self.describe(name)

    async def start_by_hand(self, name: str, candidate: str, mode: str | None, traffic: float | None) -> dict[str, Any]:
        mode = mode or self.settings.rollout
        if mode not in ("shadow", "canary"):
            raise UnprocessableInput(f"mode must be shadow or canary, got {mode!r}")
        if traffic is not None and not 0 <= traffic <= 1:
            raise UnprocessableInput(f"traffic must be between 0 and 1, got {traffic}")
        version = await self._on_disk(name, candidate)

        async def act(model: Model, row: dict[str, Any]) -> bool:
            if row["stable"] == version:
                raise Conflict(f"version {version} is already stable")
            return await self._start(model, row, version, mode,
                                     self.settings.rollout_traffic if traffic is None else traffic, "replaced by hand")

        return await self._by_hand(name, act)

    async def promote_by_hand(self, name: str, version: str | None) -> dict[str, Any]:
        async def act(model: Model, row: dict[str, Any]) -> bool:
            target = row["candidate"] if version is None else await self._on_disk(name, version)
            if target is None:
                raise Conflict(f"model {name!r} has no rollout running; name a version to promote")
            if target == row["stable"] and row["candidate"] is None:
                raise Conflict(f"version {target} is already stable")
            history = []
            if row["candidate"] is not None and row["candidate"] != target:
                history.append(_history(row["candidate"], "aborted", f"version {target} promoted by hand", {}))
            history.append(_history(target, "promoted", "promoted by hand", {}))
            won = await self.state_call("change_rollout", name, row["revision"], {**_ended(), "stable": target},
                                        history)
            if won:
                self.metrics.rollout_decisions.labels(name, "promoted", "by_hand").inc()
                log.info("rollout decision", extra={"model": name, "version": target, "decision": "promoted",
                                                    "reason": "by_hand"})
                await self._refresh_row(model)
            return won

        return await self._by_hand(name, act)

    async def abort_by_hand(self, name: str) -> dict[str, Any]:
        async def act(model: Model, row: dict[str, Any]) -> bool:
            if row["candidate"] is None:
                raise Conflict(f"model {name!r} has no rollout running")
            return await self._change(model, row, _ended(), "aborted", row["candidate"], "by_hand", "aborted by hand",
                                      {})

        return await self._by_hand(name, act)


def _ended() -> dict[str, Any]:
    return {"candidate": None, "mode": None, "traffic": 0.0, "phase": None, "started_at": None}


def _history(version: int, decision: str, reason: str, evidence: dict[str, Any]) -> dict[str, Any]:
    return {"version": version, "decision": decision, "reason": reason, "evidence": json.dumps(evidence)}

