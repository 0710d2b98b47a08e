"""A trivial objective, so that a storage benchmark measures the storage and the sampler alone.

``objective`` follows the tunefleet worker's contract and reads ``trivial_space.yml``;
``plain_objective`` samples the same two parameters for plain ``study.optimize``.
"""

from __future__ import annotations

from typing import Any, Mapping

import optuna

LOW, HIGH = -10.0, 10.0


def objective(trial: optuna.Trial, params: Mapping[str, Any], context: Any) -> float:
    return (params["x"] - 2.0) ** 2 + params["y"]


def plain_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", LOW, HIGH)
    y = trial.suggest_float("y", LOW, HIGH)
    return (x - 2.0) ** 2 + y
