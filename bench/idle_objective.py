"""An objective that only waits, so that a fan-out benchmark times starting workers, not training.

A trial sleeps far longer than a measurement lasts, so the workers already started
use no CPU while the other hosts start theirs. ``tunefleet workers stop`` ends the
sleep with SIGTERM. It reads ``trivial_space.yml`` like ``bench.trivial_objective``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import optuna

TRIAL_SECONDS = 600.0


def objective(trial: optuna.Trial, params: Mapping[str, Any], context: Any) -> float:
    time.sleep(TRIAL_SECONDS)
    return params["x"]
