"""Studies on the storage: create, list, show, and the best trial's parameters.

The study is created once by the operator, before any worker starts, because
two workers creating the same study at the same moment race inside Optuna.
Its settings go into the study user attribute ``tunefleet`` so that every
worker builds the same sampler and pruner and stops at the same target.
"""

from __future__ import annotations

import collections
import datetime
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from ops.errors import TunefleetError
from trainer.storage import mask_url

SETTINGS_ATTR = "tunefleet"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class StudySettings:
    """Settings that every worker of a study shares."""

    target_trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None

    def as_attr(self) -> dict[str, Any]:
        return {
            "target_trials": self.target_trials,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
        }


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Connect to the storage, turning connection failures into one line."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2}
    if url.startswith("postgresql"):
        # Without it, a server that accepts the TCP connection and never replies hangs the command.
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (sqlalchemy.exc.ArgumentError, ImportError, ValueError) as exc:
        raise TunefleetError(
            f"invalid storage URL {mask_url(url)}: {exc}",
            "expected postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE",
        ) from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        reason = " ".join(str(exc.orig or exc).split())
        raise TunefleetError(
            f"cannot connect to the storage at {mask_url(url)}: {reason}",
            "check that the server runs (tunefleet demo or tunefleet provision) "
            "and that host, port, user and password in the storage URL are right",
        ) from None


def create_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    settings: StudySettings,
    *,
    direction: str = "maximize",
) -> optuna.Study:
    """Create a new study and store the settings its workers read."""
    if not name.strip():
        raise TunefleetError("invalid study name: it is empty", "give the study a name such as digits-lr-search")
    if settings.target_trials < 1:
        raise TunefleetError(f"invalid target of {settings.target_trials} trials", "use --trials 1 or more")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        raise TunefleetError(
            f"study '{name}' already exists",
            f"pick another name, or inspect it with: tunefleet study show {name}",
        ) from None
    study.set_user_attr(SETTINGS_ATTR, settings.as_attr())
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise TunefleetError(
            f"study '{name}' not found at the storage",
            f"list the studies with 'tunefleet study list', or create it with: tunefleet study create {name}",
        ) from None


def count_states(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts = collections.Counter(trial.state.name for trial in trials)
    return {state: counts.get(state, 0) for state in STATE_ORDER}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """Return the best finished trial, or None while no trial has completed."""
    try:
        return study.best_trial
    except ValueError:
        return None


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Describe one study: its settings, trial counts by state and best trial."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    settings = study.user_attrs.get(SETTINGS_ATTR, {})
    return {
        "name": study.study_name,
        "direction": study.direction.name.lower(),
        "target_trials": settings.get("target_trials"),
        "trials": count_states(trials),
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": best.params if best else None,
    }


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    return [summarize(load_study(storage, summary.study_name)) for summary in optuna.get_all_study_summaries(storage)]


def describe_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """Return one record per trial, oldest first, for ``study show``."""
    records = []
    for trial in study.get_trials(deepcopy=False):
        duration = None
        if trial.datetime_start and trial.datetime_complete:
            duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        records.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "duration_s": duration,
                "params": trial.params,
                "worker": trial.user_attrs.get("worker"),
                "checkpoint": trial.user_attrs.get("checkpoint"),
                "retried_from": trial.system_attrs.get("failed_trial"),
            }
        )
    return records


def best_params_document(study: optuna.Study) -> dict[str, Any]:
    """Return the best trial's parameters with enough context to trace them back."""
    best = best_trial(study)
    if best is None:
        raise TunefleetError(
            f"study '{study.study_name}' has no completed trial yet",
            f"wait for the workers, or check them with: tunefleet study show {study.study_name}",
        )
    return {
        "study": study.study_name,
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "checkpoint": best.user_attrs.get("checkpoint"),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def finished_count(counts: dict[str, int]) -> int:
    """Trials that count toward the target: completed and pruned ones."""
    return counts.get(TrialState.COMPLETE.name, 0) + counts.get(TrialState.PRUNED.name, 0)
