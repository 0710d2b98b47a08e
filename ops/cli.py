"""The ``tunefleet`` command line: parses, calls into ops modules, prints.

Data goes to stdout, progress and logs to stderr. Exit 0 on success, 1 on a
failure the user can act on (one line, ``--debug`` for the traceback), 2 on a
usage error.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ops import __version__, backup_cli, fleet_cli, output, storage_config, studies
from ops.cli_options import inventory_option
from ops.errors import TunefleetError
from ops.inventory import require_inventory_file

log = logging.getLogger("tunefleet")


def _format_option(*, choices: tuple[str, ...] = output.FORMATS, default: str = "table") -> Callable:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=default,
        show_default=True,
        help="Output format of the data written to stdout.",
    )


_env_file_option = click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Env file (mode 0600) with a TUNEFLEET_STORAGE_URL=... line. Without it: $TUNEFLEET_STORAGE_URL, "
    "then the file named by $TUNEFLEET_ENV_FILE, then $TUNEFLEET_HOME/storage.env (default "
    "~/.tunefleet/storage.env, written by 'tunefleet demo' and 'tunefleet provision').",
)


def _storage_from(env_file: Path | None):
    return studies.open_storage(storage_config.resolve_storage_url(env_file))


class TunefleetGroup(click.Group):
    """Turn TunefleetError into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TunefleetError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=TunefleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunefleet")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """tunefleet: crash-safe Optuna search fleets on PostgreSQL."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Optuna logs every trial at INFO; the commands print their own summaries.
    logging.getLogger("optuna").setLevel(logging.DEBUG if debug else logging.WARNING)
    # paramiko logs every SSH connection and SFTP channel at INFO.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if debug else logging.WARNING)


@cli.group()
def study() -> None:
    """Create and inspect studies on the storage."""


@study.command("create")
@click.argument("name")
@click.option("--trials", "target_trials", type=click.IntRange(min=1), required=True,
              help="Number of finished (complete or pruned) trials at which workers stop.")
@click.option("--direction", type=click.Choice(studies.DIRECTIONS), default="maximize", show_default=True,
              help="Whether the objective value is maximized or minimized.")
@click.option("--sampler", type=click.Choice(studies.SAMPLERS), default="tpe", show_default=True,
              help="Sampler every worker of the study uses.")
@click.option("--pruner", type=click.Choice(studies.PRUNERS), default="median", show_default=True,
              help="Pruner every worker of the study uses.")
@click.option("--seed", type=int, default=None, help="Sampler seed; trial seeds derive from it.")
@_env_file_option
def study_create(name: str, target_trials: int, direction: str, sampler: str, pruner: str,
                 seed: int | None, env_file: Path | None) -> None:
    """Create study NAME once, before any worker starts."""
    storage = _storage_from(env_file)
    settings = studies.StudySettings(target_trials=target_trials, sampler=sampler, pruner=pruner, seed=seed)
    studies.create_study(storage, name, settings, direction=direction)
    click.echo(f"created study '{name}' ({direction}, {target_trials} trials, {sampler} sampler, {pruner} pruner)",
               err=True)


@study.command("list")
@_format_option()
@_env_file_option
def study_list(fmt: str, env_file: Path | None) -> None:
    """List the studies at the storage with trial counts and best values."""
    records = studies.list_studies(_storage_from(env_file))
    rows = [
        {
            "study": record["name"],
            "direction": record["direction"],
            "target": record["target_trials"],
            **{state.lower(): record["trials"][state] for state in studies.STATE_ORDER},
            "best": record["best_value"],
        }
        for record in records
    ]
    columns = ["study", "direction", "target", *(state.lower() for state in studies.STATE_ORDER), "best"]
    output.emit(records, fmt, rows=rows, columns=columns)


@study.command("show")
@click.argument("name")
@_format_option()
@_env_file_option
def study_show(name: str, fmt: str, env_file: Path | None) -> None:
    """Show study NAME: trial counts, best trial and every trial."""
    loaded = studies.load_study(_storage_from(env_file), name)
    summary = studies.summarize(loaded)
    trials = studies.describe_trials(loaded)
    if fmt != "table":
        output.emit({**summary, "trial_list": trials}, fmt)
        return
    output.emit(summary, fmt, rows=[{**summary, "trials": summary["trials"]}],
                columns=["name", "direction", "target_trials", "trials", "best_value", "best_trial"])
    output.emit(trials, fmt, columns=["number", "state", "value", "duration_s", "params", "worker"],
                title=f"trials of {name}")


@study.command("best")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(("json", "yaml")), default=None,
              help="File format; by default taken from the --output suffix, else json.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the parameters to this file instead of stdout.")
@_env_file_option
def study_best(name: str, fmt: str | None, output_path: Path | None, env_file: Path | None) -> None:
    """Write the best trial's parameters of study NAME as JSON or YAML."""
    fmt = fmt or _format_from_suffix(output_path)
    loaded = studies.load_study(_storage_from(env_file), name)
    document = studies.best_params_document(loaded)
    text = output.dump_yaml(document) if fmt == "yaml" else output.dump_json(document)
    if output_path is None:
        click.echo(text, nl=False)
        return
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(text)
    click.echo(f"wrote the best parameters of trial {document['trial']} to {output_path}", err=True)


def _format_from_suffix(path: Path | None) -> str:
    if path is None or path.suffix.lower() == ".json":
        return "json"
    if path.suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    raise click.UsageError(f"cannot tell the format of {path} from its suffix; use .json, .yaml or --format")


_inventory_option = inventory_option("describing the fleet (groups db and gpu)")


@cli.command()
@_inventory_option
@click.option("--no-sudo", is_flag=True,
              help="Install PostgreSQL in the SSH user's home without root (user-space mode).")
@click.option("--limit", default=None, help="Run only on this host of the db group (Ansible host pattern).")
@click.option("--check", is_flag=True, help="Show what would change (Ansible check mode) and change nothing.")
def provision(inventory: Path, no_sudo: bool, limit: str | None, check: bool) -> None:
    """Install PostgreSQL on the inventory's db host and create the Optuna database.

    Running it again changes nothing. Ends by printing the storage URL with the
    password masked and the file that keeps the password.
    """
    from ops import progress, provision as provisioning, secrets

    require_inventory_file(inventory)
    console = progress.Console(stderr=True, soft_wrap=True)
    mode = "user space (no sudo)" if no_sudo else "system packages (sudo)"
    console.print(f"provisioning the db host of {inventory}: {mode}{', check mode' if check else ''}")
    result, server = provisioning.provision_database(
        inventory, no_sudo=no_sudo, limit=limit, check=check, on_event=progress.PlaybookProgress(console)
    )
    progress.print_recap(console, result.recap)
    if not result.ok:
        # One line per failure; the last one carries the exit status.
        *earlier, last = result.failures or [f"ansible-runner status {result.status}"]
        for line in earlier:
            click.echo(f"error: {line}", err=True)
        raise TunefleetError(last)
    if check:
        click.echo(f"check mode: {result.changed} change(s) would be made; nothing was changed", err=True)
        return

    from ops import storage_config

    env_file = storage_config.default_env_file()
    secrets.write_secret_file(env_file, f"{storage_config.URL_VARIABLE}={server.storage_url(masked=False)}\n")
    click.echo(f"{result.changed} change(s)", err=True)
    click.echo(f"storage URL: {server.storage_url(masked=True)}")
    click.echo(f"password file: {server.password_file} (mode 0600)")
    click.echo(f"env file for workers and study commands: {env_file} (mode 0600)")


@cli.command()
@click.option("--trials", "target_trials", type=click.IntRange(min=1), default=24, show_default=True,
              help="Finished trials at which the demo study stops.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Number of worker processes on this machine.")
@click.option("--inventory", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Inventory whose db host gets PostgreSQL. Default: the bundled inventory/local.yml.")
@click.option("--study", "study_name", default=None,
              help="Study name. Default: digits-demo-<UTC timestamp>, a new study each run.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="TCP port of the demo's PostgreSQL server. Default: postgresql_port from the inventory (54320).")
def demo(target_trials: int, workers: int, inventory: Path | None, study_name: str | None,
         port: int | None) -> None:
    """Run the whole flow on this machine: PostgreSQL without sudo, a study, workers, a live board."""
    from ops import demo as demo_flow

    demo_flow.run_demo(target_trials=target_trials, worker_count=workers, inventory=inventory,
                       study_name=study_name, port=port)


fleet_cli.register(cli)
backup_cli.register(cli)
backup_cli.register_study_commands(study)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli.main(args=argv, prog_name="tunefleet")


if __name__ == "__main__":
    main()
