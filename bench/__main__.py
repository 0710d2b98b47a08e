"""``python -m bench storage|fanout|backup|data|provision|all``: run benchmark parts and rewrite docs/benchmarks.md.

Each part stores its raw figures in bench/results.json under its own key, so running
one part keeps the last figures of the others, and the page is rendered from the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine_facts, use_private_state_dir
from bench.report import render
from ops.paths import project_root

PARTS = ("storage", "fanout", "backup", "data", "provision")
RESULTS_FILE = Path(__file__).resolve().parent / "results.json"
REPORT_FILE = project_root() / "docs" / "benchmarks.md"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def load_results() -> dict[str, Any]:
    if RESULTS_FILE.exists():
        return json.loads(RESULTS_FILE.read_text())
    return {}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=(*PARTS, "all", "report"),
                        help="part to run; 'report' only rewrites the page from bench/results.json")
    parser.add_argument("--repetitions", type=int, default=3, metavar="N",
                        help="repetitions of every measurement, at least 3 (default: 3)")
    args = parser.parse_args(argv)
    if args.repetitions < 3:
        parser.error(f"--repetitions must be at least 3, got {args.repetitions}")

    results = load_results()
    if args.part == "all":
        parts = PARTS
    elif args.part == "report":
        parts = ()
    else:
        parts = (args.part,)
    if parts:
        state_dir = use_private_state_dir()
        results["machine"] = machine_facts()
    try:
        run_parts(parts, args.repetitions, results)
    finally:
        if parts:
            # It contains the password files of the benchmark's servers, which are gone now.
            shutil.rmtree(state_dir, ignore_errors=True)

    write_atomically(REPORT_FILE, render(results))
    log(f"wrote {REPORT_FILE}")
    return 0


def run_parts(parts: tuple[str, ...], repetitions: int, results: dict[str, Any]) -> None:
    for part in parts:
        started = time.monotonic()
        log(f"{part}: starting, {repetitions} repetitions")
        module = importlib.import_module(f"bench.{part}")
        results[part] = module.run(repetitions, log)
        results[part]["finished_at"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        results[part]["elapsed_s"] = round(time.monotonic() - started, 1)
        # Other work on the machine skews the figures, so the report shows it beside them.
        results[part]["load_average"] = round(os.getloadavg()[1], 2)
        if part == "storage":
            results["machine"]["PostgreSQL"] = results[part]["server_version"]
        # Saved after each part, so that a later part failing keeps the earlier figures.
        write_atomically(RESULTS_FILE, json.dumps(results, indent=1) + "\n")
        log(f"{part}: done in {results[part]['elapsed_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
