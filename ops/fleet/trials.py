"""The study side of fleet commands: which trial each worker runs, and trials of dead workers."""

from __future__ import annotations

import logging
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

logger = logging.getLogger("tunefleet.fleet")

# The same retry limit as the worker's heartbeat callback (trainer.worker.MAX_STALE_RETRIES).
MAX_RETRIES = 3


def worker_id(hostname: str, pid: int) -> str:
    """Return the id a worker stores in its trials' `worker` user attribute."""
    return f"{hostname}:{pid}"


def running_trials(study: optuna.Study) -> dict[str, int]:
    """Map each worker id to the number of the trial it runs."""
    return {
        str(trial.user_attrs["worker"]): trial.number
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if "worker" in trial.user_attrs
    }


def fail_trials_of(study: optuna.Study, worker_ids: set[str]) -> list[int]:
    """Mark the RUNNING trials of workers known to be dead as FAIL and queue each again.

    Call it only after the workers' processes are confirmed gone, because a live worker
    would go on writing to a trial that is already FAIL. Returns the failed trial numbers.
    """
    storage = study._storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if str(trial.user_attrs.get("worker")) not in worker_ids:
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # the worker finished it before it died
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(study, storage.get_trial(trial._trial_id))
        logger.warning("trial %d of dead worker %s marked FAIL and queued again",
                       trial.number, trial.user_attrs.get("worker"))
        failed.append(trial.number)
    return failed
