"""One process of plain Optuna on an RDB storage, as users run it without tunefleet.

``python -m bench.plain_worker --study NAME --trials N [--sampler tpe|random]`` reads
the storage URL from ``TUNEFLEET_STORAGE_URL``, because argv is visible to every user
of the machine. It passes the URL string to Optuna, so the storage has Optuna's default
settings. It prints ``ready`` once connected and starts its trials when a line arrives
on stdin, so that every process of a run starts together. At exit it prints the numbers
of the trials it ran as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import optuna

from bench.trivial_objective import plain_objective


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_worker")
    parser.add_argument("--study", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler() if args.sampler == "random" else None
    study = optuna.load_study(study_name=args.study, storage=os.environ["TUNEFLEET_STORAGE_URL"], sampler=sampler)
    print("ready", flush=True)
    sys.stdin.readline()

    numbers: list[int] = []
    study.optimize(plain_objective, n_trials=args.trials,
                   callbacks=[lambda _study, trial: numbers.append(trial.number)])
    print(json.dumps({"numbers": numbers}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
