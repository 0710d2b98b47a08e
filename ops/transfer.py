"""Move one study between storages through Optuna's API: the logical path.

A physical backup restores only onto the same PostgreSQL major version. Copying a
study trial by trial works across majors and into a SQLite file for offline analysis.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ops.errors import TunefleetError
from ops.studies import count_states

RUNNING_POLICIES = ("fail", "skip")

# Trials in these states belong to a worker that may be dead; the copy cannot run them.
UNFINISHED_STATES = (TrialState.RUNNING,)
# User attribute set on a trial that was RUNNING at the source and copied as FAIL.
FAILED_ON_COPY_ATTR = "tunefleet_failed_on_copy"


@dataclass
class TransferReport:
    """Outcome of copying one study: trials copied, RUNNING trials failed or skipped."""

    study: str
    source: str
    target: str
    copied: int = 0
    failed_running: list[int] = field(default_factory=list)
    skipped_running: list[int] = field(default_factory=list)
    trials: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study, "source": self.source, "target": self.target, "copied": self.copied,
            "failed_running": self.failed_running, "skipped_running": self.skipped_running, "trials": self.trials,
        }


def copy_study(source: optuna.storages.BaseStorage, target: optuna.storages.BaseStorage, name: str, *,
               source_label: str, target_label: str, running: str = "fail") -> TransferReport:
    """Copy study `name` from `source` to `target`, where it must not exist yet.

    RUNNING trials are copied as FAIL (`running="fail"`) or left out (`"skip"`), because
    no worker will ever finish them in the target. A copy that fails halfway deletes
    the half-copied study from the target, so nothing is left that looks whole.
    """
    if running not in RUNNING_POLICIES:
        raise TunefleetError(f"invalid running-trial policy {running!r}", f"use one of {', '.join(RUNNING_POLICIES)}")
    try:
        study = optuna.load_study(study_name=name, storage=source)
    except KeyError:
        raise TunefleetError(f"study '{name}' not found at {source_label}",
                             "list the studies there with 'tunefleet study list'") from None
    copied_study = _create_target_study(study, target, target_label)

    report = TransferReport(study=name, source=source_label, target=target_label)
    trials = _prepare_trials(study.get_trials(deepcopy=False), running, report)
    try:
        copied_study.add_trials(trials)
    except Exception:
        optuna.delete_study(study_name=name, storage=target)
        raise
    report.copied = len(trials)
    report.trials = count_states(copied_study.get_trials(deepcopy=False))
    return report


def _create_target_study(study: optuna.Study, target: optuna.storages.BaseStorage, target_label: str) -> optuna.Study:
    try:
        copied = optuna.create_study(study_name=study.study_name, storage=target, directions=study.directions)
    except optuna.exceptions.DuplicatedStudyError:
        raise TunefleetError(
            f"study '{study.study_name}' already exists at {target_label}; nothing was copied",
            "delete it there first, or copy into another storage",
        ) from None
    for key, value in study.user_attrs.items():
        copied.set_user_attr(key, value)
    source_storage = study._storage
    for key, value in source_storage.get_study_system_attrs(study._study_id).items():
        target.set_study_system_attr(copied._study_id, key, value)
    return copied


def _prepare_trials(trials: list[FrozenTrial], running: str, report: TransferReport) -> list[FrozenTrial]:
    prepared = []
    now = datetime.datetime.now()
    for trial in trials:
        if trial.state not in UNFINISHED_STATES:
            prepared.append(trial)
            continue
        if running == "skip":
            report.skipped_running.append(trial.number)
            continue
        failed = copy.deepcopy(trial)
        failed.state = TrialState.FAIL
        failed.values = None
        failed.datetime_complete = now
        failed.set_user_attr(FAILED_ON_COPY_ATTR, True)
        report.failed_running.append(trial.number)
        prepared.append(failed)
    return prepared

