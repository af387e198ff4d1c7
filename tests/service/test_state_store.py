"""The state store on SQLite and on a real PostgreSQL, the same tests for both: schema creation and refusal,
the prediction log, feedback all-or-nothing, the quality counts, retention and the closed loop's examples."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from service.state.store import (
    SCHEMA_VERSION,
    Label,
    LabelConflict,
    PredictionNotFound,
    Record,
    StateStore,
    StateStoreError,
    schema_table,
)
from tests.support.postgres import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.sqlite"
    else:
        with fresh_database() as database:
            yield database


@pytest.fixture()
def store(url: str) -> Iterator[StateStore]:
    s = StateStore(url)
    s.open()
    yield s
    s.close()


def record(request_id: str, idx: int = 0, *, version: str = "1", class_id: int = 0, score: float = 0.9,
           at: float = 1000.0, model: str = "digits", data: bytes | None = None) -> Record:
    return Record(model, request_id, idx, version, at, class_id, score, None, data,
                  "uint8" if data is not None else None, "2,2,1" if data is not None else None)


def test_first_open_creates_the_schema_at_the_current_version(url):
    s = StateStore(url)
    assert s.open() == SCHEMA_VERSION
    assert s.schema_version() == SCHEMA_VERSION
    tables = set(sa.inspect(s.engine).get_table_names())
    assert {"convserve_schema", "predictions", "feedback"} <= tables
    assert StateStore(url).open() == SCHEMA_VERSION  # a second open finds it and keeps it


def test_a_schema_newer_than_the_code_is_refused_with_a_message(store, url):
    with store.engine.begin() as conn:
        conn.execute(schema_table.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(StateStoreError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer convserve.*upgrade"):
        StateStore(url).open()


def test_an_unusable_url_is_refused_with_a_message():
    with pytest.raises(StateStoreError, match="not a database URL"):
        StateStore("not a url at all")


def test_a_store_that_cannot_be_reached_is_refused_without_the_password():
    s = StateStore("postgresql://someone:secret-word@127.0.0.1:1/nowhere")
    with pytest.raises(StateStoreError) as caught:
        s.open(attempts=1)
    assert "secret-word" not in str(caught.value)
    assert "cannot open the state store" in str(caught.value)


def test_processes_opening_an_empty_store_at_once_agree_on_one_schema(url):
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            StateStore(url).open()
        except BaseException as exc:  # collected: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with StateStore(url).engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema_table)).scalar() == 1


def test_a_reused_request_id_keeps_the_first_record(store):
    assert store.write([record("a", class_id=1), record("b", class_id=2)]) == 2
    assert store.write([record("a", class_id=9), record("c", class_id=3)]) == 1
    counts = {c.version: c for c in store.version_counts("digits")}
    assert counts["1"].predicted == {1: 1, 2: 1, 3: 1}


def test_feedback_attaches_labels_and_counts_the_confusion(store):
    store.write([record("r1", 0, class_id=3), record("r1", 1, class_id=5), record("r2", 0, class_id=7, version="2")])
    result = store.add_feedback("digits", [Label("r1", 0, 3), Label("r1", 1, 6), Label("r2", 0, 7)])
    assert (result.new, result.repeated) == (3, 0)
    assert sorted(result.outcomes) == [("1", 3, 3), ("1", 5, 6), ("2", 7, 7)]
    counts = {c.version: c for c in store.version_counts("digits")}
    assert counts["1"].confusion == {(3, 3): 1, (6, 5): 1}
    assert counts["2"].confusion == {(7, 7): 1}


def test_the_same_label_again_is_accepted_once(store):
    store.write([record("r1")])
    store.add_feedback("digits", [Label("r1", 0, 4)])
    again = store.add_feedback("digits", [Label("r1", 0, 4)])
    assert (again.new, again.repeated, again.outcomes) == (0, 1, [])


def test_a_different_label_is_a_conflict_and_stores_nothing(store):
    store.write([record("r1"), record("r2")])
    store.add_feedback("digits", [Label("r1", 0, 4)])
    with pytest.raises(LabelConflict):
        store.add_feedback("digits", [Label("r2", 0, 1), Label("r1", 0, 5)])
    assert store.version_counts("digits")[0].confusion == {(4, 0): 1}  # r2's label was not stored either


def test_an_unknown_prediction_fails_the_whole_batch(store):
    store.write([record("r1")])
    with pytest.raises(PredictionNotFound) as caught:
        store.add_feedback("digits", [Label("r1", 0, 2), Label("nope", 0, 1)])
    assert (caught.value.request_id, caught.value.index) == ("nope", 0)
    assert store.version_counts("digits")[0].confusion == {}


def test_feedback_is_per_model(store):
    store.write([record("r1", model="colors")])
    with pytest.raises(PredictionNotFound):
        store.add_feedback("digits", [Label("r1", 0, 2)])


def test_one_batch_may_not_give_one_prediction_two_labels(store):
    store.write([record("r1")])
    with pytest.raises(LabelConflict):
        store.add_feedback("digits", [Label("r1", 0, 2), Label("r1", 0, 3)])


def test_quality_counts_honour_the_time_window(store):
    store.write([record("old", at=100.0, class_id=1), record("new", at=200.0, class_id=2, score=0.5)])
    store.add_feedback("digits", [Label("old", 0, 1), Label("new", 0, 2)])
    (recent,) = store.version_counts("digits", since=150.0)
    assert recent.predicted == {2: 1}
    assert recent.score_sum == pytest.approx(0.5)
    assert recent.confusion == {(2, 2): 1}


def test_retention_deletes_old_predictions_and_their_feedback(store):
    store.write([record(f"r{i}", at=float(i)) for i in range(10)])
    store.add_feedback("digits", [Label("r0", 0, 0), Label("r9", 0, 0)])
    assert store.prune(max_age_seconds=100, max_rows=1000, now=105.0) == 5  # r0..r4 are older than 100 s
    assert store.count_predictions() == 5
    assert store.prune(max_age_seconds=1e9, max_rows=2, now=105.0) == 3  # the oldest beyond 2 rows
    assert store.count_predictions() == 2
    (counts,) = store.version_counts("digits")
    assert counts.predicted == {0: 2} and counts.confusion == {(0, 0): 1}  # r9 and its label remain
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM feedback")).scalar() == 1


def test_labelled_examples_return_the_kept_inputs(store):
    pixels = np.array([0, 17, 255, 3], dtype=np.uint8).tobytes()
    store.write([record("k", data=pixels, class_id=1, at=5.0), record("n", class_id=2, at=6.0)])
    store.add_feedback("digits", [Label("k", 0, 7), Label("n", 0, 2)])
    (example,) = store.labelled_examples("digits")  # "n" kept no input
    assert (example.request_id, example.label, example.predicted, example.version) == ("k", 7, 1, "1")
    assert example.input == pixels and example.input_dtype == "uint8" and example.input_shape == "2,2,1"


def test_an_older_schema_is_brought_up_to_date_one_step_at_a_time(store, url, monkeypatch):
    """A store at the current version meets code that knows one more: the step runs once, in order."""
    import service.state.store as store_module

    steps: list[int] = []

    def add_a_column(conn) -> None:
        steps.append(SCHEMA_VERSION)
        conn.execute(sa.text("ALTER TABLE feedback ADD COLUMN note VARCHAR(32)"))

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION, add_a_column)
    assert StateStore(url).open() == SCHEMA_VERSION + 1
    assert StateStore(url).open() == SCHEMA_VERSION + 1  # already there: not run again
    assert steps == [SCHEMA_VERSION]
    assert "note" in {c["name"] for c in sa.inspect(StateStore(url).engine).get_columns("feedback")}


def test_the_gauges_read_only_the_newest_predictions_but_every_label(store):
    store.write([record(f"r{i}", at=float(i), class_id=i % 2) for i in range(10)])
    store.add_feedback("digits", [Label("r0", 0, 0)])
    (counts,) = store.version_counts("digits", recent=3)  # r7, r8, r9
    assert counts.predicted == {1: 2, 0: 1}
    assert counts.confusion == {(0, 0): 1}  # r0 is old, its label still counts


# --- Rollouts (schema version 2) --------------------------------------------------------------------------

def test_a_version_1_store_gets_the_rollout_tables_by_its_migration(url):
    """A store written before rollouts existed (schema 1: predictions and feedback only) is migrated in place."""
    from service.state.store import ROLLOUT_TABLES, feedback, metadata, predictions

    engine = sa.create_engine(StateStore(url).engine.url)
    metadata.create_all(engine, tables=[schema_table, predictions, feedback])
    with engine.begin() as conn:
        conn.execute(schema_table.insert().values(id=1, version=1))
    engine.dispose()
    s = StateStore(url)
    assert s.open() == SCHEMA_VERSION == 2
    tables = set(sa.inspect(s.engine).get_table_names())
    assert {t.name for t in ROLLOUT_TABLES} <= tables
    assert s.create_rollout("digits", 1)
    s.close()


def test_a_rollout_change_is_taken_once_at_the_revision_it_was_read(store):
    assert store.create_rollout("digits", 1, now=10.0)
    assert not store.create_rollout("digits", 2)  # the first row stays
    rows, blocked = store.rollout_state()
    row = rows["digits"]
    assert (row["stable"], row["candidate"], row["revision"], blocked) == (1, None, 1, {})
    start = {"candidate": 2, "mode": "shadow", "traffic": 0.0, "phase": "p1", "started_at": 11.0}
    assert store.change_rollout("digits", 1, start)
    assert not store.change_rollout("digits", 1, {"candidate": 3})  # a second decider read the same revision
    row = store.rollout_state()[0]["digits"]
    assert (row["candidate"], row["mode"], row["revision"], row["phase"]) == (2, "shadow", 2, "p1")


def test_two_threads_deciding_at_once_take_one_decision(store):
    store.create_rollout("digits", 1)
    store.change_rollout("digits", 1, {"candidate": 2, "mode": "canary", "traffic": 0.1, "phase": "p",
                                       "started_at": 1.0})
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def decide(decision: str) -> None:
        barrier.wait()
        results.append(store.change_rollout("digits", 2, {"candidate": None, "mode": None, "phase": None},
                                            [{"version": 2, "decision": decision, "reason": "r", "evidence": "{}"}]))

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("promoted", "rolled_back")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert len(store.rollout_history("digits")) == 1


def test_the_latest_decision_on_a_version_says_whether_it_is_blocked(store):
    store.create_rollout("digits", 1)

    def decide(revision: int, version: int, decision: str) -> None:
        assert store.change_rollout("digits", revision, {},
                                    [{"version": version, "decision": decision, "reason": decision,
                                      "evidence": "{}"}])

    decide(1, 2, "rolled_back")
    decide(2, 3, "aborted")
    decide(3, 4, "promoted")
    assert store.rollout_state()[1] == {"digits": {2, 3}}
    decide(4, 2, "promoted")  # promoted by hand after its rollback: served again
    assert store.rollout_state()[1] == {"digits": {3}}
    assert [h["decision"] for h in store.rollout_history("digits")] == ["promoted", "promoted", "aborted",
                                                                       "rolled_back"]


def test_phase_counts_are_each_processs_latest_and_go_with_their_phase(store):
    store.create_rollout("digits", 1)
    store.change_rollout("digits", 1, {"candidate": 2, "phase": "p1"})
    store.put_counts("p1", "a", '{"candidate": 1}')
    store.put_counts("p1", "a", '{"candidate": 5}')  # replaced, not added
    store.put_counts("p1", "b", '{"candidate": 2}')
    assert sorted(store.phase_counts("p1")) == ['{"candidate": 2}', '{"candidate": 5}']
    store.change_rollout("digits", 2, {"candidate": 2, "phase": "p2"})
    assert store.phase_counts("p1") == []  # a new phase: the old one's counts are gone


def test_labelled_counts_per_version_since_a_time(store):
    store.write([record("a", version="1", class_id=3, at=10.0), record("b", version="1", class_id=3, at=20.0),
                 record("c", version="2", class_id=5, at=20.0), record("d", version="2", class_id=5, at=21.0),
                 record("e", version="2", class_id=1, at=22.0)])
    store.add_feedback("digits", [Label("a", 0, 3), Label("b", 0, 3), Label("c", 0, 5), Label("d", 0, 4)])
    assert store.labelled_counts("digits", 15.0) == {"1": (1, 1), "2": (1, 2)}  # "a" is older, "e" unlabelled
    assert store.labelled_counts("digits", 0.0) == {"1": (2, 2), "2": (1, 2)}
    assert store.labelled_counts("other", 0.0) == {}
