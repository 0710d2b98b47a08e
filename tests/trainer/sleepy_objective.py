"""A fast objective for process-control tests: sleeps, reports each step, returns x.

``fixed.step_seconds`` and ``fixed.steps`` set how long a trial runs. Setting the
environment variable SLEEPY_OBJECTIVE_FAIL makes every trial fail.
"""

import os
import time


def objective(trial, params, context):
    steps = int(context.fixed.get("steps", 3))
    for step in range(steps):
        time.sleep(float(context.fixed.get("step_seconds", 0.1)))
        trial.report(params["x"], step)
    if os.environ.get("SLEEPY_OBJECTIVE_FAIL"):
        raise RuntimeError("failing as SLEEPY_OBJECTIVE_FAIL asks")
    context.save_checkpoint({"x": params["x"], "seed": context.seed})
    return params["x"]
