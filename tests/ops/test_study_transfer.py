"""Copying one study between storages: PostgreSQL to SQLite, and between PostgreSQL databases."""

from __future__ import annotations

import datetime
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from ops.errors import TunefleetError
from ops.studies import open_storage
from ops.transfer import FAILED_ON_COPY_ATTR, copy_study

pytestmark = pytest.mark.slow


@pytest.fixture
def source_study(storage_url) -> optuna.Study:
    """A study with COMPLETE, PRUNED and FAIL trials, one RUNNING trial of a dead worker, and attributes."""
    study = optuna.create_study(study_name=f"transfer-{uuid.uuid4().hex[:8]}", storage=storage_url,
                                direction="minimize")
    study.set_user_attr("tunefleet", {"target_trials": 10, "sampler": "tpe", "pruner": "none", "seed": 3})

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -2.0, 2.0)
        trial.report(x * x, 0)
        if trial.number == 3:
            raise optuna.TrialPruned()
        if trial.number == 4:
            raise RuntimeError("a failing trial")
        trial.set_user_attr("checkpoint", f"/results/trial-{trial.number}.pt")
        return x * x

    study.optimize(objective, n_trials=6, catch=(RuntimeError,))
    dead = study.ask()
    dead.suggest_float("x", -2.0, 2.0)
    return study


def test_export_to_sqlite_fails_running(source_study, storage_url, tmp_path):
    target_url = f"sqlite:///{tmp_path / 'offline.db'}"

    report = copy_study(open_storage(storage_url), open_storage(target_url), source_study.study_name,
                        source_label="source", target_label="sqlite")

    assert report.failed_running == [6]
    assert report.skipped_running == []
    assert report.copied == 7
    copied = optuna.load_study(study_name=source_study.study_name, storage=target_url)
    original = source_study.get_trials(deepcopy=False)
    restored = copied.get_trials(deepcopy=False)
    assert [t.number for t in restored] == [t.number for t in original]
    for before, after in zip(original[:6], restored[:6]):
        assert after.state == before.state
        assert after.params == before.params
        assert after.values == before.values
        assert after.intermediate_values == before.intermediate_values
        assert after.user_attrs == before.user_attrs
    assert restored[6].state == TrialState.FAIL
    assert restored[6].user_attrs[FAILED_ON_COPY_ATTR] is True
    assert copied.best_value == pytest.approx(source_study.best_value)
    assert copied.user_attrs == source_study.user_attrs
    assert copied.direction == source_study.direction
    # The source keeps its RUNNING trial: exporting changes nothing there.
    assert source_study.get_trials(deepcopy=False)[6].state == TrialState.RUNNING


def test_export_skip_leaves_running_out(source_study, storage_url, tmp_path):
    target_url = f"sqlite:///{tmp_path / 'offline.db'}"

    report = copy_study(open_storage(storage_url), open_storage(target_url), source_study.study_name,
                        source_label="source", target_label="sqlite", running="skip")

    assert report.skipped_running == [6]
    assert report.copied == 6
    assert report.trials["RUNNING"] == 0
    assert report.trials["COMPLETE"] == 4


def test_export_refuses_existing_target_study(source_study, storage_url, tmp_path):
    target_url = f"sqlite:///{tmp_path / 'offline.db'}"
    existing = optuna.create_study(study_name=source_study.study_name, storage=target_url)
    existing.enqueue_trial({"x": 0.5})

    with pytest.raises(TunefleetError) as caught:
        copy_study(open_storage(storage_url), open_storage(target_url), source_study.study_name,
                   source_label="source", target_label="sqlite")

    assert "already exists" in str(caught.value)
    assert len(optuna.load_study(study_name=source_study.study_name, storage=target_url).trials) == 1


def test_export_unknown_study_fails(storage_url, tmp_path):
    with pytest.raises(TunefleetError) as caught:
        copy_study(open_storage(storage_url), open_storage(f"sqlite:///{tmp_path / 'x.db'}"), "no-such-study",
                   source_label="source", target_label="sqlite")

    assert "not found" in str(caught.value)


def test_import_back_into_postgresql(source_study, storage_url, tmp_path):
    """A round trip through SQLite into another name on PostgreSQL keeps every finished trial."""
    sqlite_url = f"sqlite:///{tmp_path / 'offline.db'}"
    copy_study(open_storage(storage_url), open_storage(sqlite_url), source_study.study_name,
               source_label="source", target_label="sqlite")
    renamed = f"{source_study.study_name}-back"
    optuna.copy_study(from_study_name=source_study.study_name, from_storage=sqlite_url, to_storage=sqlite_url,
                      to_study_name=renamed)

    report = copy_study(open_storage(sqlite_url), open_storage(storage_url), renamed,
                        source_label="sqlite", target_label="postgresql")

    assert report.failed_running == []
    back = optuna.load_study(study_name=renamed, storage=storage_url)
    assert report.trials == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 2, "RUNNING": 0, "WAITING": 0}
    assert back.best_trial.params == source_study.best_trial.params
    assert all(trial.datetime_start <= datetime.datetime.now() for trial in back.trials)
