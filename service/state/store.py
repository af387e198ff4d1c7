"""The state store: the prediction log, feedback and rollouts, in SQLAlchemy Core tables behind one small interface.

``CONVSERVE_STATE_URL`` names it: ``sqlite:///PATH`` (the embedded default, one file) or
``postgresql://user:pass@host:port/db`` (psycopg 3; what several replicas share). No other module writes SQL.

The schema carries a version (table ``convserve_schema``). The first process to open an empty store creates
the tables; a store written by a newer convserve (a higher version than :data:`SCHEMA_VERSION`) is refused
with :class:`StateStoreError`, and an older one is brought up to date by :data:`MIGRATIONS`, one step per
version, each in its own transaction.

Every method here blocks (it talks to the database): the server calls them from threads, never on its event loop.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

SCHEMA_VERSION = 2
"""The schema this code reads and writes."""

metadata = sa.MetaData()

schema_table = sa.Table(
    "convserve_schema", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)

predictions = sa.Table(
    "predictions", metadata,
    # The prediction id: the answer's request id and the image's (row's) index in the request.
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.String(16), nullable=False),
    sa.Column("arm", sa.String(16), nullable=True),  # the rollout arm that answered; null outside a rollout
    sa.Column("created_at", sa.Double, nullable=False),  # unix seconds
    sa.Column("class_id", sa.Integer, nullable=False),
    sa.Column("score", sa.Double, nullable=False),
    # The model input as the model saw it (after preprocessing), for a fraction of predictions:
    # ``input_dtype`` uint8 when every value is a whole number 0..255 (784 bytes for a digit), else float32.
    sa.Column("input", sa.LargeBinary, nullable=True),
    sa.Column("input_dtype", sa.String(8), nullable=True),
    sa.Column("input_shape", sa.String(32), nullable=True),  # "28,28,1"
    # Queries by model use the primary key's prefix; retention deletes by time. One index more per row written
    # is a cost on every prediction, so there is no other.
    sa.Index("ix_predictions_time", "created_at"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

# Rollouts (service/rollout.py), schema version 2. One row per model: the version that serves, the candidate being
# rolled out, and a revision that every change increments: a change names the revision it was decided on, so of
# two workers or replicas deciding at once, one changes the row and the other finds it changed (no lock needed).
rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("stable", sa.Integer, nullable=True),
    sa.Column("candidate", sa.Integer, nullable=True),
    sa.Column("mode", sa.String(16), nullable=True),  # shadow or canary while a candidate runs
    sa.Column("traffic", sa.Double, nullable=False, default=0.0),
    sa.Column("phase", sa.String(32), nullable=True),  # the current phase's id: its counters' key
    sa.Column("started_at", sa.Double, nullable=True),  # the phase's start (unix seconds)
    sa.Column("updated_at", sa.Double, nullable=False),
)

rollout_history = sa.Table(
    "rollout_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(128), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),  # started, advanced, promoted, rolled_back, aborted
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON: the guards' figures when it was decided
    sa.Column("at", sa.Double, nullable=False),
)

rollout_counts = sa.Table(
    "rollout_counts", metadata,
    # Each process's running totals for one phase (JSON), replaced on every sync: the phase's totals are the sum.
    sa.Column("phase", sa.String(32), primary_key=True),
    sa.Column("process", sa.String(64), primary_key=True),
    sa.Column("counts", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

ROLLOUT_TABLES = (rollouts, rollout_history, rollout_counts)
BLOCKING_DECISIONS = ("rolled_back", "aborted")
"""A version whose latest decision is one of these is not served again unless promoted by hand."""

PREDICTION_COLUMNS = tuple(c.name for c in predictions.columns)
"""The order of a prediction row's values in :meth:`StateStore.write_rows`."""

def _add_rollout_tables(conn: Connection) -> None:
    metadata.create_all(conn, tables=list(ROLLOUT_TABLES))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_rollout_tables}
"""``MIGRATIONS[v](connection)`` brings a store at schema version ``v`` to ``v + 1``."""


class StateStoreError(Exception):
    """The store cannot be used: unreachable, or written by a newer convserve."""


class PredictionNotFound(Exception):
    """Feedback names a prediction the store does not have."""

    def __init__(self, request_id: str, index: int) -> None:
        super().__init__(f"no prediction with id {request_id!r} and index {index}")
        self.request_id, self.index = request_id, index


class LabelConflict(Exception):
    """Feedback gives a prediction a label other than the one it already has."""

    def __init__(self, request_id: str, index: int, existing: int, label: int) -> None:
        super().__init__(f"prediction {request_id!r} index {index} already has label {existing}; "
                         f"a different label ({label}) is refused")
        self.request_id, self.index, self.existing, self.label = request_id, index, existing, label


@dataclass(frozen=True)
class Record:
    """One logged prediction (one image or row of a request)."""

    model: str
    request_id: str
    idx: int
    version: str
    created_at: float
    class_id: int
    score: float
    arm: str | None = None
    input: bytes | None = None
    input_dtype: str | None = None
    input_shape: str | None = None


@dataclass(frozen=True)
class Label:
    """A true label for one prediction."""

    request_id: str
    idx: int
    label: int


@dataclass(frozen=True)
class FeedbackResult:
    """What one feedback batch did: ``new`` labels stored, ``repeated`` ones the store already had, and each
    labelled prediction's (version, predicted class, label)."""

    new: int
    repeated: int
    outcomes: list[tuple[str, int, int]]


@dataclass
class VersionCounts:
    """The raw counts behind one version's live quality (see :mod:`service.state.quality`)."""

    version: str
    predicted: dict[int, int]
    """Predictions per predicted class."""
    score_sum: float
    confusion: dict[tuple[int, int], int]
    """Labelled predictions per (true label, predicted class)."""

    @property
    def predictions(self) -> int:
        return sum(self.predicted.values())


@dataclass(frozen=True)
class LabelledExample:
    """A labelled prediction whose model input was kept: what the closed loop trains on."""

    request_id: str
    idx: int
    version: str
    created_at: float
    label: int
    predicted: int
    input: bytes
    input_dtype: str
    input_shape: str


def engine_url(url: str) -> sa.URL:
    """The SQLAlchemy URL of a ``CONVSERVE_STATE_URL``: ``postgresql://`` means psycopg 3."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Several worker processes write one file: WAL lets readers and one writer proceed together, and a
    # writer that finds the file locked waits (busy_timeout) instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return engine_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say nothing of it
        return "(unparsable URL)"


class StateStore:
    """The prediction log, feedback and their queries, on one SQLAlchemy engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            target = engine_url(url)
        except Exception as exc:
            raise StateStoreError(f"CONVSERVE_STATE_URL is not a database URL ({exc}); use sqlite:///PATH or "
                                  "postgresql://user:password@host:port/database") from None
        if target.get_backend_name() == "sqlite" and target.database not in (None, "", ":memory:"):
            from pathlib import Path

            Path(target.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = sa.create_engine(target, pool_pre_ping=True)
        except Exception as exc:  # an unknown dialect, a driver that is not installed
            raise StateStoreError(f"cannot use the state store {redacted(url)}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def close(self) -> None:
        self.engine.dispose()

    # Schema -------------------------------------------------------------------------------------

    def open(self, attempts: int = 5) -> int:
        """Create the schema on first use, bring an older one up to date, refuse a newer one; returns the version.

        Several processes may open an empty store at once: whichever loses the race to create a table or write
        the version row finds the winner's work on its next attempt."""
        for attempt in range(attempts):
            try:
                return self._open()
            except StateStoreError:
                raise
            except SQLAlchemyError as exc:
                if attempt == attempts - 1:
                    raise StateStoreError(f"cannot open the state store {redacted(self.url)}: "
                                          f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _open(self) -> int:
        metadata.create_all(self.engine, tables=[schema_table])
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(schema_table.c.version).where(schema_table.c.id == 1)).scalar()
        if found is None:
            metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                conn.execute(schema_table.insert().values(id=1, version=SCHEMA_VERSION))
            return SCHEMA_VERSION
        if found > SCHEMA_VERSION:
            raise StateStoreError(
                f"the state store {redacted(self.url)} has schema version {found}, written by a newer convserve "
                f"than this one (it knows version {SCHEMA_VERSION}); upgrade convserve, or point "
                "CONVSERVE_STATE_URL at another store")
        while found < SCHEMA_VERSION:
            with self.engine.begin() as conn:
                MIGRATIONS[found](conn)
                conn.execute(schema_table.update().where(schema_table.c.id == 1).values(version=found + 1))
            found += 1
        metadata.create_all(self.engine)  # tables added by this version's code
        return found

    def schema_version(self) -> int | None:
        """The store's schema version; None when no convserve process has created the schema there yet."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(schema_table.name):
                return None
            return conn.execute(sa.select(schema_table.c.version).where(schema_table.c.id == 1)).scalar()

    # The prediction log -------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> int:
        """Store predictions; returns how many were new. A prediction id already logged (a client that reuses
        its X-Request-Id) keeps its first record, so feedback stays attached to what was answered first."""
        return self.write_rows([tuple(getattr(r, name) for name in PREDICTION_COLUMNS) for r in records])

    def write_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """:meth:`write` for rows of values in :data:`PREDICTION_COLUMNS` order: the prediction log's fast path.

        The INSERT is SQLAlchemy's, compiled once for the engine's dialect, and handed to the driver's
        executemany as it is: per row, no more work than the driver's own (SQLAlchemy's per-row parameter
        processing cost more than the insert itself)."""
        if not rows:
            return 0
        sql, positional = self._insert
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(sql, list(rows) if positional else
                                     [dict(zip(PREDICTION_COLUMNS, row)) for row in rows])
            return len(rows)
        except IntegrityError:
            pass
        return self._write_one_by_one([dict(zip(PREDICTION_COLUMNS, row)) for row in rows])

    @functools.cached_property
    def _insert(self) -> tuple[str, bool]:
        compiled = predictions.insert().compile(dialect=self.engine.dialect)
        if compiled.positional:
            assert tuple(compiled.positiontup or ()) == PREDICTION_COLUMNS
        return compiled.string, compiled.positional

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> int:
        written = 0
        with self.engine.begin() as conn:  # one at a time, each in a savepoint, skipping the repeated ids
            for row in rows:
                try:
                    with conn.begin_nested():
                        conn.execute(predictions.insert(), row)
                    written += 1
                except IntegrityError:
                    continue
        return written

    def prune(self, max_age_seconds: float, max_rows: int, now: float | None = None) -> int:
        """Retention: delete predictions (and their feedback) older than ``max_age_seconds``, then the oldest
        beyond ``max_rows``; returns how many predictions went."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            cutoff = now - max_age_seconds
            kept_from = conn.execute(sa.select(predictions.c.created_at).order_by(predictions.c.created_at.desc())
                                     .offset(max_rows).limit(1)).scalar()
            if kept_from is not None:
                cutoff = max(cutoff, kept_from + 1e-6)
            p, f = predictions.c, feedback.c
            gone = sa.select(p.model, p.request_id, p.idx).where(p.created_at < cutoff)
            conn.execute(feedback.delete().where(sa.tuple_(f.model, f.request_id, f.idx).in_(gone)))
            return conn.execute(predictions.delete().where(p.created_at < cutoff)).rowcount or 0

    # Feedback -----------------------------------------------------------------------------------

    def add_feedback(self, model: str, labels: Sequence[Label], now: float | None = None) -> FeedbackResult:
        """Attach true labels to logged predictions, all or none: :class:`PredictionNotFound` or
        :class:`LabelConflict` for the first item that cannot be taken, and then nothing is stored. The same
        label again is taken (idempotent); the same prediction twice in one batch must agree with itself."""
        now = time.time() if now is None else now
        wanted: dict[tuple[str, int], int] = {}
        for item in labels:
            key = (item.request_id, item.idx)
            if key in wanted and wanted[key] != item.label:
                raise LabelConflict(item.request_id, item.idx, wanted[key], item.label)
            wanted[key] = item.label
        p, f = predictions.c, feedback.c
        try:
            with self.engine.begin() as conn:
                found = self._select_keyed(conn, sa.select(p.request_id, p.idx, p.version, p.class_id)
                                           .where(p.model == model), p, wanted)
                existing = self._select_keyed(conn, sa.select(f.request_id, f.idx, f.label)
                                              .where(f.model == model), f, wanted)
                known = {(r.request_id, r.idx): r for r in found}
                labelled = {(r.request_id, r.idx): r.label for r in existing}
                for (request_id, idx), label in wanted.items():
                    if (request_id, idx) not in known:
                        raise PredictionNotFound(request_id, idx)
                    if labelled.get((request_id, idx), label) != label:
                        raise LabelConflict(request_id, idx, labelled[request_id, idx], label)
                new = [{"model": model, "request_id": r, "idx": i, "label": label, "created_at": now}
                       for (r, i), label in wanted.items() if (r, i) not in labelled]
                if new:
                    conn.execute(feedback.insert(), new)
        except IntegrityError:
            # Another request labelled one of these predictions between our read and our write: read again,
            # which answers with the conflict, or accepts the repeat of the same label.
            return self.add_feedback(model, labels, now)
        outcomes = [(known[key].version, known[key].class_id, label) for key, label in wanted.items()
                    if key not in labelled]
        return FeedbackResult(len(new), len(wanted) - len(new), outcomes)

    @staticmethod
    def _select_keyed(conn: Connection, query: sa.Select[Any], columns: Any,
                      keys: Iterable[tuple[str, int]]) -> list[Any]:
        keys = list(keys)
        out: list[Any] = []
        for start in range(0, len(keys), 500):  # bounded IN lists
            chunk = keys[start:start + 500]
            out.extend(conn.execute(query.where(sa.tuple_(columns.request_id, columns.idx).in_(chunk))).all())
        return out

    # Queries ------------------------------------------------------------------------------------

    def version_counts(self, model: str, since: float | None = None,
                       recent: int | None = None) -> list[VersionCounts]:
        """Per version with logged predictions: predictions per class, the score sum, and the confusion counts.

        ``recent``: the class counts and scores come from the model's newest ``recent`` predictions only (a
        bounded read, for the gauges); the confusion counts still from every labelled one in the window."""
        p, f = predictions.c, feedback.c
        window = [p.model == model] + ([p.created_at >= since] if since is not None else [])
        by_version: dict[str, VersionCounts] = {}
        source: Any = predictions
        if recent is not None:
            source = (sa.select(p.version, p.class_id, p.score).where(*window)
                      .order_by(p.created_at.desc()).limit(recent).subquery())
        s = source.c
        with self.engine.connect() as conn:
            for version, class_id, n, score_sum in conn.execute(
                    sa.select(s.version, s.class_id, sa.func.count(), sa.func.sum(s.score))
                    .where(*(window if recent is None else ())).group_by(s.version, s.class_id)):
                counts = by_version.setdefault(version, VersionCounts(version, {}, 0.0, {}))
                counts.predicted[class_id] = n
                counts.score_sum += float(score_sum or 0.0)
            joined = predictions.join(feedback, sa.and_(f.model == p.model, f.request_id == p.request_id,
                                                        f.idx == p.idx))
            for version, label, class_id, n in conn.execute(
                    sa.select(p.version, f.label, p.class_id, sa.func.count()).select_from(joined)
                    .where(*window).group_by(p.version, f.label, p.class_id)):
                counts = by_version.setdefault(version, VersionCounts(version, {}, 0.0, {}))
                counts.confusion[label, class_id] = n
        return list(by_version.values())

    def labelled_counts(self, model: str, since: float) -> dict[str, tuple[int, int]]:
        """Per version: (correct, labelled) over the labelled predictions made since ``since``. Read from the
        feedback side (labels are few next to predictions), so it stays cheap however long the log is: the
        rollout's accuracy guard asks for it on every sync."""
        p, f = predictions.c, feedback.c
        joined = feedback.join(predictions, sa.and_(p.model == f.model, p.request_id == f.request_id,
                                                    p.idx == f.idx))
        correct = sa.func.sum(sa.case((p.class_id == f.label, 1), else_=0))
        with self.engine.connect() as conn:
            return {version: (int(right or 0), int(n)) for version, right, n in conn.execute(
                sa.select(p.version, correct, sa.func.count()).select_from(joined)
                .where(f.model == model, p.created_at >= since).group_by(p.version))}

    def labelled_examples(self, model: str, since: float | None = None,
                          version: str | None = None) -> list[LabelledExample]:
        """Labelled predictions of a model whose input was kept, oldest first."""
        p, f = predictions.c, feedback.c
        joined = predictions.join(feedback, sa.and_(f.model == p.model, f.request_id == p.request_id,
                                                    f.idx == p.idx))
        query = (sa.select(p.request_id, p.idx, p.version, p.created_at, f.label, p.class_id, p.input,
                           p.input_dtype, p.input_shape)
                 .select_from(joined).where(p.model == model, p.input.is_not(None))
                 .order_by(p.created_at, p.request_id, p.idx))
        if since is not None:
            query = query.where(p.created_at >= since)
        if version is not None:
            query = query.where(p.version == version)
        with self.engine.connect() as conn:
            return [LabelledExample(r.request_id, r.idx, r.version, r.created_at, r.label, r.class_id,
                                    bytes(r.input), r.input_dtype, r.input_shape) for r in conn.execute(query)]

    def count_predictions(self, model: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(predictions)
        if model is not None:
            query = query.where(predictions.c.model == model)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    # Rollouts ------------------------------------------------------------------------------------

    def rollout_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, set[int]]]:
        """Every model's rollout row, and per model the versions not to serve (latest decision: rolled back or
        aborted), in one read."""
        with self.engine.connect() as conn:
            rows = {r.model: dict(r._mapping) for r in conn.execute(sa.select(rollouts))}
            h = rollout_history.c
            latest = (sa.select(h.model, h.version, sa.func.max(h.id).label("last"))
                      .where(h.decision.in_(("promoted", *BLOCKING_DECISIONS))).group_by(h.model, h.version)
                      .subquery())
            blocked: dict[str, set[int]] = {}
            for model, version, decision in conn.execute(
                    sa.select(h.model, h.version, h.decision).join(latest, h.id == latest.c.last)):
                if decision in BLOCKING_DECISIONS:
                    blocked.setdefault(model, set()).add(version)
        return rows, blocked

    def create_rollout(self, model: str, stable: int, now: float | None = None) -> bool:
        """The first row of a model (its first served version); False when another process wrote it first."""
        try:
            with self.engine.begin() as conn:
                conn.execute(rollouts.insert().values(model=model, revision=1, stable=stable, candidate=None,
                                                      mode=None, traffic=0.0, phase=None, started_at=None,
                                                      updated_at=time.time() if now is None else now))
            return True
        except IntegrityError:
            return False

    def change_rollout(self, model: str, revision: int, values: dict[str, Any],
                       history: Sequence[dict[str, Any]] = (), now: float | None = None) -> bool:
        """Change a model's row if it is still at ``revision``, recording ``history`` in the same transaction;
        False (nothing written) when another process changed it first."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            changed = conn.execute(rollouts.update()
                                   .where(rollouts.c.model == model, rollouts.c.revision == revision)
                                   .values(**values, revision=revision + 1, updated_at=now)).rowcount
            if changed != 1:
                return False
            if history:
                conn.execute(rollout_history.insert(), [{"model": model, "at": now, **h} for h in history])
            if "phase" in values:  # the counters of phases that ended are never read again
                current = sa.select(rollouts.c.phase).where(rollouts.c.phase.is_not(None))
                conn.execute(rollout_counts.delete().where(rollout_counts.c.phase.not_in(current)))
        return True

    def rollout_history(self, model: str, limit: int = 50) -> list[dict[str, Any]]:
        """A model's rollout decisions, newest first."""
        h = rollout_history.c
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                sa.select(h.version, h.decision, h.reason, h.evidence, h.at).where(h.model == model)
                .order_by(h.id.desc()).limit(limit))]

    def put_counts(self, phase: str, process: str, counts: str, now: float | None = None) -> None:
        """Replace one process's running totals for a phase."""
        now = time.time() if now is None else now
        c = rollout_counts.c
        with self.engine.begin() as conn:
            if conn.execute(rollout_counts.update().where(c.phase == phase, c.process == process)
                            .values(counts=counts, updated_at=now)).rowcount == 0:
                conn.execute(rollout_counts.insert().values(phase=phase, process=process, counts=counts,
                                                            updated_at=now))

    def phase_counts(self, phase: str) -> list[str]:
        """Every process's totals for a phase (JSON texts)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(rollout_counts.c.counts)
                                     .where(rollout_counts.c.phase == phase)).scalars())
