"""`tunefleet backup create|list|verify|prune|schedule`, `restore`, `study export|import`: parse, call, print.

`register(cli)` adds the backup group and restore to the top-level command group, and
`register_study_commands(study)` adds export and import to the study group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ops import backups, output, storage_config, studies, transfer
from ops.cli_options import inventory_option
from ops.errors import TunefleetError
from ops.inventory import require_inventory_file
from trainer.storage import mask_url, normalize_url


def _site_options(function: Callable) -> Callable:
    """Add the options that locate the db host and its backup directory."""
    options = [
        inventory_option("whose db group contains the database server"),
        click.option("--no-sudo", is_flag=True,
                     help="The server was provisioned with --no-sudo (user space, under postgresql_prefix)."),
        click.option("--backup-dir", default=None,
                     help="Backup directory on the db host. Default: PREFIX/backups with --no-sudo, "
                          f"else {backups.SYSTEM_BACKUP_DIR}."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_format_option = click.option("--format", "fmt", type=click.Choice(output.FORMATS), default="table",
                              show_default=True, help="Output format of the data written to stdout.")


@contextlib.contextmanager
def _backup_host(inventory: Path, no_sudo: bool, backup_dir: str | None) -> Iterator[backups.BackupHost]:
    require_inventory_file(inventory)
    host = backups.open_backup_host(inventory, no_sudo=no_sudo, backup_dir=backup_dir)
    try:
        yield host
    finally:
        if host.connection is not None:
            host.connection.close()


@click.group()
def backup() -> None:
    """Take, list, verify and prune backups of the database server."""


@backup.command("create")
@_site_options
@click.option("--compression", type=click.Choice(("auto", "zstd", "lz4", "gzip")), default="auto",
              show_default=True, help="Compression of the backup's tar files. auto: zstd, else lz4 on "
                                      "PostgreSQL 15 and later, gzip before.")
@_format_option
def backup_create(inventory: Path, no_sudo: bool, backup_dir: str | None, compression: str, fmt: str) -> None:
    """Take a base backup of the running server, verify it, and record it.

    The backup is written under a temporary name and listed as good only after its
    checksums and its unpacked data directory have been verified.
    """
    with _backup_host(inventory, no_sudo, backup_dir) as host:
        click.echo(f"backing up into {host.site.backup_dir} on the db host", err=True)
        try:
            record = backups.create_backup(host, compression=compression)
        except KeyboardInterrupt:
            raise _interrupted(host) from None
    if record.get("removed_partials"):
        click.echo("removed the partial directories of backups that did not finish: "
                   + ", ".join(record["removed_partials"]), err=True)
    output.emit(record, fmt, rows=[_row(record)], columns=LIST_COLUMNS)


def _interrupted(host: backups.BackupHost) -> TunefleetError:
    if host.connection is None:
        return TunefleetError("backup interrupted; the backup script removed its partial directory and "
                              "recorded the attempt as failed", "run tunefleet backup create again")
    # NOTE: Ctrl-C closes only the SSH channel, and without a terminal sshd sends the
    # remote script no signal, so it runs on to a good or failed record of its own.
    return TunefleetError("backup interrupted here, but the backup script may still be running on the db host",
                          "see how it ended with tunefleet backup list")


LIST_COLUMNS = ["name", "started_at", "status", "size_mb", "postgresql", "duration_s", "studies"]


def _row(record: dict[str, Any]) -> dict[str, Any]:
    studies_text = ", ".join(
        f"{study['name']} ({study['trials'].get('COMPLETE', 0)} complete)" for study in record.get("studies") or []
    )
    size = record.get("size_bytes")
    return {
        "name": record.get("name"),
        "started_at": record.get("started_at"),
        "status": (f"{record['status']}: {record.get('error')}" if record.get("status") in ("failed", "damaged")
                   else record.get("status")),
        "size_mb": round(size / 1e6, 1) if size is not None else None,
        "postgresql": record.get("postgresql_version"),
        "duration_s": record.get("duration_s"),
        "studies": studies_text or None,
    }


@backup.command("list")
@_site_options
@click.option("--now", default=None, metavar="ISO8601",
              help="Time to measure the newest backup's age against. Default: the db host's clock.")
@_format_option
def backup_list(inventory: Path, no_sudo: bool, backup_dir: str | None, now: str | None, fmt: str) -> None:
    """List every backup, oldest first, and warn when the newest good one is older than 26 hours."""
    with _backup_host(inventory, no_sudo, backup_dir) as host:
        listing = backups.list_backups(host, now=now)
    for warning in listing["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    output.emit(listing, fmt, rows=[_row(record) for record in listing["backups"]], columns=LIST_COLUMNS)


@backup.command("verify")
@click.argument("name")
@_site_options
@click.option("--restore", is_flag=True,
              help="Also restore into a scratch server on a free loopback port, compare the studies "
                   "with the backup's study manifest, and remove the scratch server.")
@_format_option
def backup_verify(name: str, inventory: Path, no_sudo: bool, backup_dir: str | None, restore: bool,
                  fmt: str) -> None:
    """Check backup NAME's checksums and unpack and verify its data directory."""
    with _backup_host(inventory, no_sudo, backup_dir) as host:
        result = backups.verify_backup(host, name, restore=restore)
    if fmt != "table":
        output.emit(result, fmt)
        return
    click.echo(f"backup {name}: verified")
    if restore:
        for study in result["drill"]["studies"]:
            click.echo(f"restore drill: study {study['name']} came back with trials {study['trials']}")


@backup.command("prune")
@_site_options
@click.option("--keep-daily", type=click.IntRange(min=0), required=True,
              help="Number of most recent days whose newest good backup is kept.")
@click.option("--keep-weekly", type=click.IntRange(min=0), required=True,
              help="Number of most recent ISO weeks whose newest good backup is kept.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted and delete nothing.")
@_format_option
def backup_prune(inventory: Path, no_sudo: bool, backup_dir: str | None, keep_daily: int, keep_weekly: int,
                 dry_run: bool, fmt: str) -> None:
    """Delete backups beyond the retention. The newest good backup is never deleted."""
    with _backup_host(inventory, no_sudo, backup_dir) as host:
        result = backups.prune_backups(host, keep_daily=keep_daily, keep_weekly=keep_weekly, dry_run=dry_run)
    if fmt != "table":
        output.emit(result, fmt)
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb}: {', '.join(result['deleted']) or 'nothing'}")
    click.echo(f"kept: {', '.join(result['kept']) or 'nothing'}")


@backup.command("schedule")
@_site_options
@click.option("--hour", type=click.IntRange(0, 23), default=2, show_default=True,
              help="Hour of the nightly backup, in the db host's local time.")
@click.option("--minute", type=click.IntRange(0, 59), default=30, show_default=True,
              help="Minute of the nightly backup.")
@click.option("--keep-daily", type=click.IntRange(min=0), default=7, show_default=True,
              help="Days whose newest good backup the nightly prune keeps.")
@click.option("--keep-weekly", type=click.IntRange(min=0), default=4, show_default=True,
              help="ISO weeks whose newest good backup the nightly prune keeps.")
@click.option("--scheduler", type=click.Choice(("systemd", "cron")), default=None,
              help="Default: a systemd timer when the play runs as root on systemd, else the account's crontab.")
def backup_schedule(inventory: Path, no_sudo: bool, backup_dir: str | None, hour: int, minute: int,
                    keep_daily: int, keep_weekly: int, scheduler: str | None) -> None:
    """Install the nightly backup job on the db host through Ansible. Running it again changes nothing."""
    from ops import progress

    if keep_daily < 1 and keep_weekly < 1:
        raise click.UsageError("--keep-daily and --keep-weekly are both 0; keep at least one")
    with _backup_host(inventory, no_sudo, backup_dir) as host:
        console = progress.Console(stderr=True, soft_wrap=True)
        result = backups.schedule_backups(inventory, host, hour=hour, minute=minute, keep_daily=keep_daily,
                                          keep_weekly=keep_weekly, scheduler=scheduler or "",
                                          on_event=progress.PlaybookProgress(console))
    progress.print_recap(console, result.recap)
    if not result.ok:
        for line in result.failures:
            click.echo(f"error: {line}", err=True)
        raise TunefleetError("scheduling the nightly backup failed", "fix the cause above and run the same command")
    click.echo(f"nightly backup at {hour:02d}:{minute:02d} into {host.site.backup_dir}, keeping {keep_daily} daily "
               f"and {keep_weekly} weekly; {result.changed} change(s)", err=True)


@click.command("restore")
@click.argument("name")
@click.option("--to", "target", required=True, metavar="HOST",
              help="Inventory name of the machine to restore onto; it must have no data directory yet.")
@_site_options
@_format_option
def restore(name: str, target: str, inventory: Path, no_sudo: bool, backup_dir: str | None, fmt: str) -> None:
    """Restore backup NAME of the db host onto HOST and check that every study came back.

    Installs the backup's PostgreSQL major on HOST with the provisioning role, unpacks the
    backup into its empty data directory, starts the server and compares the studies with
    the backup's study manifest. Another major is rejected; use tunefleet study export.
    """
    from ops import progress, restore as restoring

    if not inventory.is_file():
        raise TunefleetError(f"inventory {inventory} not found", "pass -i/--inventory")
    console = progress.Console(stderr=True, soft_wrap=True)
    console.print(f"restoring backup {name} onto {target}")
    report = restoring.restore_backup(inventory, name, target, no_sudo=no_sudo, backup_dir=backup_dir,
                                      on_event=progress.PlaybookProgress(console))
    if fmt != "table":
        output.emit(report.as_dict(), fmt)
    else:
        for study in report.studies:
            click.echo(f"study {study['name']}: trials {study['trials']}, best value {study['best_value']}")
    if not report.ok:
        raise TunefleetError(f"restore of {name} onto {target} lost studies: " + "; ".join(report.problems),
                             "verify the backup with tunefleet backup verify --restore, and restore another one")
    click.echo(f"restored backup {name} onto {target} (PostgreSQL {report.postgresql_version}, "
               f"{report.data_dir}); every study in its manifest came back", err=True)
    click.echo(f"storage URL: {report.server.storage_url(masked=True)}, password in {report.server.password_file}",
               err=True)


def register(cli_group: click.Group) -> None:
    """Add the backup group and the restore command to the top-level command group."""
    cli_group.add_command(backup)
    cli_group.add_command(restore)


# --- study export and import ---


def _storage_url_option(flag: str, env_flag: str, side: str) -> Callable:
    def decorate(function: Callable) -> Callable:
        function = click.option(
            env_flag, type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
            help=f"Env file (mode 0600) holding TUNEFLEET_STORAGE_URL of the {side} storage, "
                 "for a URL with a password.")(function)
        return click.option(
            flag, "url", default=None, metavar="URL",
            help=f"Storage URL of the {side}: sqlite:///PATH, or a PostgreSQL URL without password "
                 "(libpq then reads ~/.pgpass).")(function)
    return decorate


def _other_storage_url(url: str | None, env_file: Path | None, flag: str) -> str:
    if (url is None) == (env_file is None):
        raise click.UsageError(f"give exactly one of {flag} URL and {flag}-env-file FILE")
    if env_file is not None:
        return storage_config.resolve_storage_url(env_file)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise click.UsageError(f"invalid storage URL {url!r}: {exc}") from None
    if parsed.password:
        raise click.UsageError(
            f"{flag} carries a password, which every user of this machine can read in the process list; "
            f"put TUNEFLEET_STORAGE_URL=... in a 0600 file and pass {flag}-env-file FILE")
    return normalize_url(url)


_running_option = click.option(
    "--running", type=click.Choice(transfer.RUNNING_POLICIES), default="fail", show_default=True,
    help="What happens to RUNNING trials, whose workers may be dead: copied as FAIL, or skipped.")


def _report(report: transfer.TransferReport, fmt: str) -> None:
    if report.failed_running:
        click.echo(f"RUNNING trials copied as FAIL: {', '.join(map(str, report.failed_running))}", err=True)
    if report.skipped_running:
        click.echo(f"RUNNING trials skipped: {', '.join(map(str, report.skipped_running))}", err=True)
    if fmt != "table":
        output.emit(report.as_dict(), fmt)
        return
    click.echo(f"copied study '{report.study}' from {report.source} to {report.target}: {report.copied} trials "
               f"({', '.join(f'{state.lower()} {count}' for state, count in report.trials.items() if count)})")


def _copy_and_report(name: str, source_url: str, target_url: str, running: str, fmt: str) -> None:
    report = transfer.copy_study(studies.open_storage(source_url), studies.open_storage(target_url), name,
                                 source_label=mask_url(source_url), target_label=mask_url(target_url),
                                 running=running)
    _report(report, fmt)


def register_study_commands(study_group: click.Group) -> None:
    """Add `export` and `import` to the study group."""

    @study_group.command("export")
    @click.argument("name")
    @_storage_url_option("--to", "--to-env-file", "target")
    @_running_option
    @click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Env file of the source storage. Default: as for every study command.")
    @_format_option
    def study_export(name: str, url: str | None, to_env_file: Path | None, running: str, env_file: Path | None,
                     fmt: str) -> None:
        """Copy study NAME into another storage: another server, another major, or a SQLite file."""
        target_url = _other_storage_url(url, to_env_file, "--to")
        _copy_and_report(name, storage_config.resolve_storage_url(env_file), target_url, running, fmt)

    @study_group.command("import")
    @click.argument("name")
    @_storage_url_option("--from", "--from-env-file", "source")
    @_running_option
    @click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Env file of the target storage. Default: as for every study command.")
    @_format_option
    def study_import(name: str, url: str | None, from_env_file: Path | None, running: str, env_file: Path | None,
                     fmt: str) -> None:
        """Copy study NAME from another storage, such as a SQLite file, into this fleet's storage."""
        source_url = _other_storage_url(url, from_env_file, "--from")
        _copy_and_report(name, source_url, storage_config.resolve_storage_url(env_file), running, fmt)
