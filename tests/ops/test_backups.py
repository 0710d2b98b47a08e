"""Backups on a real PostgreSQL server: create, verify, corruption, full disk, list, drill."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import free_port, provision_test_server, server_account
from support.sshd_hosts import descendant_pids
from ops.backups import BackupHost, BackupSite, create_backup, list_backups, prune_backups, verify_backup
from ops.errors import TunefleetError
from ops.paths import project_root

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def backup_server(tunefleet_home, server_base_dir):
    provisioning = provision_test_server(server_base_dir / "backup-pg", free_port())
    assert provisioning.result.ok, provisioning.result.failures
    return provisioning


@pytest.fixture(scope="module")
def backup_storage_url(backup_server) -> str:
    return backup_server.server.storage_url(masked=False)


def make_backup_dir(parent: Path) -> Path:
    """Create a backup directory that the server's account owns, as the backup role does."""
    directory = parent / f"backups-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o700)
    account = pwd.getpwnam(server_account())
    os.chown(directory, account.pw_uid, account.pw_gid)
    return directory


@pytest.fixture
def backup_host(backup_server, server_base_dir) -> BackupHost:
    backup_dir = make_backup_dir(server_base_dir)
    yield BackupHost(BackupSite.user_mode(backup_server.prefix, server_account(), backup_dir=str(backup_dir)))
    shutil.rmtree(backup_dir, ignore_errors=True)


def add_study(storage_url: str, trials: int) -> optuna.Study:
    study = optuna.create_study(study_name=f"backup-{uuid.uuid4().hex[:8]}", storage=storage_url,
                                direction="minimize")
    study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=trials)
    return study


def manifest_entry(record: dict, name: str) -> dict:
    return next(study for study in record["studies"] if study["name"] == name)


def test_create_records_good_backup(backup_host, backup_storage_url):
    study = add_study(backup_storage_url, trials=3)

    record = create_backup(backup_host)

    assert record["status"] == "good"
    assert record["postgresql_version"] >= 13
    entry = manifest_entry(record, study.study_name)
    assert entry["trials"] == {"COMPLETE": 3}
    assert entry["best_value"] == pytest.approx(study.best_value)
    directory = Path(backup_host.site.backup_dir) / record["name"]
    owner = pwd.getpwnam(server_account()).pw_uid
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.stat().st_uid == owner, path
    assert {"backup_manifest", "SHA256SUMS", "studies.json", "record.json"} <= {p.name for p in directory.iterdir()}
    assert not [p for p in Path(backup_host.site.backup_dir).iterdir() if p.name.startswith(".")]


def test_list_shows_backup_and_stale_warning(backup_host, backup_storage_url):
    record = create_backup(backup_host)

    fresh = list_backups(backup_host)
    stale = list_backups(backup_host, now="2999-01-01T00:00:00+00:00")

    assert [entry["name"] for entry in fresh["backups"]] == [record["name"]]
    assert fresh["backups"][0]["status"] == "good"
    assert fresh["backups"][0]["size_bytes"] > 0
    assert fresh["warnings"] == []
    assert len(stale["warnings"]) == 1
    assert record["name"] in stale["warnings"][0]


def test_verify_passes_fresh_backup(backup_host):
    record = create_backup(backup_host)

    assert verify_backup(backup_host, record["name"]) == {"name": record["name"], "verified": True}


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def edit_manifest(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["Files"][0]["Size"] += 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "file_pattern"),
    [
        (truncate, "base.tar.*"),
        (flip_byte, "base.tar.*"),
        (flip_byte, "pg_wal.tar.*"),
        (Path.unlink, "pg_wal.tar.*"),
        (edit_manifest, "backup_manifest"),
        (Path.unlink, "studies.json"),
    ],
    ids=["truncated-base", "flipped-base", "flipped-wal", "missing-wal", "edited-manifest", "missing-studies"],
)
def test_verify_names_damaged_file(backup_host, damage, file_pattern):
    record = create_backup(backup_host)
    directory = Path(backup_host.site.backup_dir) / record["name"]
    target = next(directory.glob(file_pattern))

    damage(target)

    with pytest.raises(TunefleetError) as caught:
        verify_backup(backup_host, record["name"])
    assert target.name in str(caught.value)
    assert "damaged" in str(caught.value)


def test_failed_verify_marks_backup_damaged(backup_host, tmp_path):
    older = create_backup(backup_host)
    newer = create_backup(backup_host)
    backup_dir = Path(backup_host.site.backup_dir)
    files_before = {path.name: path.read_bytes() for path in (backup_dir / newer["name"]).iterdir()
                    if not path.name.startswith("base.tar")}
    target = next((backup_dir / newer["name"]).glob("base.tar.*"))
    flip_byte(target)

    with pytest.raises(TunefleetError):
        verify_backup(backup_host, newer["name"])
    listed = {entry["name"]: entry for entry in list_backups(backup_host)["backups"]}
    pruned = prune_backups(backup_host, keep_daily=0, keep_weekly=1, dry_run=True)
    with pytest.raises(TunefleetError) as drill:
        verify_backup(backup_host, newer["name"], restore=True)
    with pytest.raises(TunefleetError) as unpack:
        backup_host.call("unpack", newer["name"], "--data-dir", str(tmp_path / "data"))
    files_after = {path.name: path.read_bytes() for path in (backup_dir / newer["name"]).iterdir()
                   if not path.name.startswith("base.tar")}

    assert listed[newer["name"]]["status"] == "damaged"
    assert target.name in listed[newer["name"]]["error"]
    assert listed[older["name"]]["status"] == "good"
    assert older["name"] in pruned["kept"]
    assert "marked damaged" in str(drill.value)
    assert "marked damaged" in str(unpack.value)
    assert not (tmp_path / "data").exists()
    assert files_after == files_before


def test_passing_verify_clears_damaged_mark(backup_host):
    record = create_backup(backup_host)
    target = next((Path(backup_host.site.backup_dir) / record["name"]).glob("base.tar.*"))
    flip_byte(target)
    with pytest.raises(TunefleetError):
        verify_backup(backup_host, record["name"])

    # Flipping the same byte again brings the file back as it was taken.
    flip_byte(target)
    verified = verify_backup(backup_host, record["name"])
    listed = list_backups(backup_host)

    assert verified["verified"] is True
    assert listed["backups"][0]["status"] == "good"
    assert listed["warnings"] == []


def test_prune_deletes_older_damaged_backup(backup_host):
    damaged = create_backup(backup_host)
    flip_byte(next((Path(backup_host.site.backup_dir) / damaged["name"]).glob("base.tar.*")))
    with pytest.raises(TunefleetError):
        verify_backup(backup_host, damaged["name"])
    good = create_backup(backup_host)

    pruned = prune_backups(backup_host, keep_daily=7, keep_weekly=0, dry_run=False)

    assert pruned["kept"] == [good["name"]]
    assert pruned["deleted"] == [damaged["name"]]
    assert not (Path(backup_host.site.backup_dir) / "damaged" / f"{damaged['name']}.json").exists()


def test_verify_catches_manifest_edit_behind_checksums(backup_host):
    """An edited manifest with SHA256SUMS rewritten to match still fails pg_verifybackup."""
    record = create_backup(backup_host)
    directory = Path(backup_host.site.backup_dir) / record["name"]
    manifest = directory / "backup_manifest"
    edit_manifest(manifest)
    sums = directory / "SHA256SUMS"
    lines = [line for line in sums.read_text().splitlines() if not line.endswith("  backup_manifest")]
    digest = subprocess.run(["sha256sum", str(manifest)], capture_output=True, text=True, check=True).stdout.split()[0]
    sums.write_text("\n".join([*lines, f"{digest}  backup_manifest"]) + "\n")

    with pytest.raises(TunefleetError) as caught:
        verify_backup(backup_host, record["name"])
    assert "pg_verifybackup" in str(caught.value)
    assert "manifest" in str(caught.value)


def test_verify_unknown_backup_lists_good_ones(backup_host):
    record = create_backup(backup_host)

    with pytest.raises(TunefleetError) as caught:
        verify_backup(backup_host, "20000101T000000Z")
    assert "not found" in str(caught.value)
    assert record["name"] in str(caught.value)


def test_create_in_missing_dir_fails(backup_server, server_base_dir):
    site = BackupSite.user_mode(backup_server.prefix, server_account(), backup_dir=str(server_base_dir / "absent"))

    with pytest.raises(TunefleetError) as caught:
        create_backup(BackupHost(site))
    assert "backup directory" in str(caught.value)
    assert "not found" in str(caught.value)
    assert f"mkdir -m 700 {server_base_dir / 'absent'}" in caught.value.hint
    assert not (server_base_dir / "absent").exists()


def test_create_makes_default_dir(backup_server):
    site = BackupSite.user_mode(backup_server.prefix, server_account())
    backup_dir = Path(site.backup_dir)
    shutil.rmtree(backup_dir, ignore_errors=True)
    try:
        record = create_backup(BackupHost(site))
        mode = backup_dir.stat().st_mode & 0o777
        owner = backup_dir.stat().st_uid
    finally:
        shutil.rmtree(backup_dir, ignore_errors=True)

    assert record["status"] == "good"
    assert mode == 0o700
    assert owner == pwd.getpwnam(server_account()).pw_uid


def test_list_missing_default_dir_says_create(backup_server):
    site = BackupSite.user_mode(backup_server.prefix, server_account())
    shutil.rmtree(site.backup_dir, ignore_errors=True)

    with pytest.raises(TunefleetError) as caught:
        list_backups(BackupHost(site))
    assert "no backup was taken yet" in str(caught.value)
    assert caught.value.hint == "take the first one: tunefleet backup create"


@pytest.fixture
def small_backup_dir(server_base_dir):
    """A 64 MB tmpfs: room for one backup and its verification unpack, not for much more."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = make_backup_dir(server_base_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount_point)], check=True)
    account = pwd.getpwnam(server_account())
    os.chown(mount_point, account.pw_uid, account.pw_gid)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)
    mount_point.rmdir()


def test_full_disk_leaves_no_good_entry(backup_server, small_backup_dir):
    host = BackupHost(BackupSite.user_mode(backup_server.prefix, server_account(), backup_dir=str(small_backup_dir)))
    earlier = create_backup(host)
    free = shutil.disk_usage(small_backup_dir).free
    filler = small_backup_dir / "filler"
    filler.write_bytes(b"\0" * (free - 1024 * 1024))

    with pytest.raises(TunefleetError) as caught:
        create_backup(host)
    filler.unlink()

    assert "No space left on device" in str(caught.value) or "could not write" in str(caught.value)
    listed = list_backups(host)["backups"]
    assert [entry["name"] for entry in listed if entry["status"] == "good"] == [earlier["name"]]
    assert [entry["status"] for entry in listed] == ["good", "failed"]
    assert {p.name for p in small_backup_dir.iterdir()} == {earlier["name"], "records"}
    assert verify_backup(host, earlier["name"])["verified"] is True


SLEEPY_OBJECTIVE = "sleepy_objective:objective"


def start_worker(study_name: str, env_file: Path, space: Path, log_path: Path) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TUNEFLEET_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(project_root()), str(project_root() / "tests" / "trainer")])
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.worker", "--study", study_name, "--env-file", str(env_file),
         "--objective", SLEEPY_OBJECTIVE, "--search-space", str(space), "--heartbeat-interval", "2"],
        cwd=log_path.parent, env=environment, stdin=subprocess.DEVNULL,
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
    )


def test_backup_during_writes_restores_complete_trials(backup_host, backup_storage_url, tmp_path):
    study = optuna.create_study(study_name=f"busy-{uuid.uuid4().hex[:8]}", storage=backup_storage_url,
                                direction="maximize")
    study.set_user_attr("tunefleet", {"target_trials": 400, "sampler": "random", "pruner": "none", "seed": 1})
    env_file = tmp_path / "storage.env"
    env_file.write_text(f"TUNEFLEET_STORAGE_URL={backup_storage_url}\n")
    env_file.chmod(0o600)
    space = tmp_path / "space.yml"
    space.write_text(yaml.safe_dump({"params": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
                                     "fixed": {"steps": 2, "step_seconds": 0.05}}))
    workers = [start_worker(study.study_name, env_file, space, tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 5:
            assert time.monotonic() < deadline, (tmp_path / "worker-0.log").read_text()[-2000:]
            time.sleep(0.5)
        complete_before = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

        record = create_backup(backup_host)
        complete_after = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)

    assert complete_after > complete_before, "the workers stopped writing during the backup"
    drill = verify_backup(backup_host, record["name"], restore=True)["drill"]
    restored = next(entry for entry in drill["studies"] if entry["name"] == study.study_name)
    assert restored["trials"]["COMPLETE"] >= complete_before
    assert restored["trials"]["COMPLETE"] >= manifest_entry(record, study.study_name)["trials"]["COMPLETE"]
    assert restored["trials"]["COMPLETE"] <= complete_after


def test_drill_removes_scratch_server(backup_host, backup_storage_url):
    study = add_study(backup_storage_url, trials=2)
    record = create_backup(backup_host)

    drill = verify_backup(backup_host, record["name"], restore=True)["drill"]

    assert manifest_entry(drill, study.study_name)["trials"] == {"COMPLETE": 2}
    assert [p.name for p in Path(backup_host.site.backup_dir).iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", drill["port"]), timeout=5).close()


@pytest.fixture(scope="module")
def postgresql12_server(tunefleet_home, server_base_dir, postgresql12_archive):
    provisioning = provision_test_server(server_base_dir / "backup-pg12", free_port(),
                                         postgresql_binary_archive=str(postgresql12_archive))
    assert provisioning.result.ok, provisioning.result.failures
    return provisioning


def postgresql12_host(postgresql12_server, backup_server, backup_dir: Path) -> BackupHost:
    """Back up the PostgreSQL 12 server with the client tools of the PostgreSQL 15 installation.

    The PostgreSQL 12 archive carries only initdb, pg_ctl and postgres, and pg_basebackup
    and psql of a newer major read older servers.
    """
    prefix = postgresql12_server.prefix
    server_bin_dir = next(prefix.glob("binaries/*/bin"))
    site = BackupSite(
        backup_dir=str(backup_dir), account=server_account(), env_script=f"{backup_server.prefix}/env.sh",
        server_bin_dir=str(server_bin_dir),
        environment={"PGHOST": str(prefix / "run"), "PGPORT": str(postgresql12_server.extravars["postgresql_port"])},
    )
    return BackupHost(site)


def test_postgresql12_backup_round_trips(postgresql12_server, backup_server, server_base_dir):
    storage_url = postgresql12_server.server.storage_url(masked=False)
    study = add_study(storage_url, trials=3)
    host = postgresql12_host(postgresql12_server, backup_server, make_backup_dir(server_base_dir))

    record = create_backup(host)
    drill = verify_backup(host, record["name"], restore=True)["drill"]

    assert record["postgresql_version"] == 12
    assert record["compression"] == "gzip"
    directory = Path(host.site.backup_dir) / record["name"]
    assert (directory / "data.sha256").is_file()
    assert not (directory / "backup_manifest").exists()
    assert manifest_entry(record, study.study_name)["trials"] == {"COMPLETE": 3}
    assert manifest_entry(drill, study.study_name)["trials"] == {"COMPLETE": 3}


def test_postgresql12_verify_names_changed_data_file(postgresql12_server, backup_server, server_base_dir):
    """An edited data.sha256 with SHA256SUMS rewritten to match still fails, naming the data file."""
    host = postgresql12_host(postgresql12_server, backup_server, make_backup_dir(server_base_dir))
    record = create_backup(host)
    directory = Path(host.site.backup_dir) / record["name"]
    checksums = json.loads((directory / "data.sha256").read_text())
    checksums["PG_VERSION"] = "0" * 64
    (directory / "data.sha256").write_text(json.dumps(checksums))
    sums = directory / "SHA256SUMS"
    digest = subprocess.run(["sha256sum", str(directory / "data.sha256")], capture_output=True, text=True,
                            check=True).stdout.split()[0]
    lines = [line for line in sums.read_text().splitlines() if not line.endswith("  data.sha256")]
    sums.write_text("\n".join([*lines, f"{digest}  data.sha256"]) + "\n")

    with pytest.raises(TunefleetError) as caught:
        verify_backup(host, record["name"])
    assert "PG_VERSION" in str(caught.value)


@pytest.fixture
def cli_group():
    """The top-level command group with the backup and study commands registered, as ops.cli wires them."""
    import click

    from ops.backup_cli import register, register_study_commands
    from ops.cli import TunefleetGroup

    @click.group(cls=TunefleetGroup)
    def tunefleet() -> None:
        pass

    @tunefleet.group()
    def study() -> None:
        pass

    register(tunefleet)
    register_study_commands(study)
    return tunefleet


@pytest.fixture
def local_inventory(backup_server, tmp_path) -> Path:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "db": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "postgresql_port": backup_server.extravars["postgresql_port"],
            "postgresql_prefix": str(backup_server.prefix),
        }}},
        "gpu": {"hosts": {}},
    }}}))
    return inventory


def invoke(cli_group, *arguments: str):
    from click.testing import CliRunner

    return CliRunner().invoke(cli_group, list(arguments), catch_exceptions=False)


def test_cli_create_list_verify_prune(cli_group, local_inventory, backup_server, server_base_dir):
    backup_dir = str(make_backup_dir(server_base_dir))
    site = ["-i", str(local_inventory), "--no-sudo", "--backup-dir", backup_dir]

    created = invoke(cli_group, "backup", "create", *site, "--format", "json")
    listed = invoke(cli_group, "backup", "list", *site, "--format", "json")
    name = json.loads(created.stdout)["name"]
    verified = invoke(cli_group, "backup", "verify", name, *site)
    pruned = invoke(cli_group, "backup", "prune", *site, "--keep-daily", "1", "--keep-weekly", "0", "--dry-run")
    keep_none = invoke(cli_group, "backup", "prune", *site, "--keep-daily", "0", "--keep-weekly", "0")
    missing = invoke(cli_group, "backup", "verify", "19990101T000000Z", *site)

    assert created.exit_code == 0, created.output
    assert [entry["name"] for entry in json.loads(listed.stdout)["backups"]] == [name]
    assert verified.exit_code == 0, verified.output
    assert f"backup {name}: verified" in verified.stdout
    assert pruned.exit_code == 0, pruned.output
    assert "would delete: nothing" in pruned.stdout
    assert keep_none.exit_code == 1
    assert "both 0" in keep_none.stderr
    assert missing.exit_code == 1
    assert "not found" in missing.stderr


def test_cli_export_rejects_password_in_url(cli_group, tmp_path):
    result = invoke(cli_group, "study", "export", "any", "--to", "postgresql://optuna:secret@127.0.0.1/optuna")

    assert result.exit_code == 2
    assert "--to-env-file" in result.stderr
    assert "secret" not in result.stderr


def test_cli_export_to_sqlite(cli_group, backup_storage_url, tmp_path):
    study = add_study(backup_storage_url, trials=2)
    study.ask()
    env_file = tmp_path / "storage.env"
    env_file.write_text(f"TUNEFLEET_STORAGE_URL={backup_storage_url}\n")
    env_file.chmod(0o600)
    target = tmp_path / "offline.db"

    result = invoke(cli_group, "study", "export", study.study_name, "--to", f"sqlite:///{target}",
                    "--env-file", str(env_file))

    assert result.exit_code == 0, result.output
    assert "RUNNING trials copied as FAIL: 2" in result.stderr
    assert "3 trials" in result.stdout
    assert len(optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{target}").trials) == 3


def crontab_of(account: str) -> str:
    return subprocess.run(["crontab", "-l", "-u", account], capture_output=True, text=True, check=False).stdout


def as_account(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["su", server_account(), "-s", "/bin/sh", "-c", script], capture_output=True, text=True,
                          check=False, timeout=300)


def test_schedule_installs_cron_job_that_records_failure(cli_group, local_inventory, backup_server,
                                                         server_base_dir):
    if os.geteuid() != 0:
        pytest.skip("the test reads another account's crontab")
    backup_dir = server_base_dir / f"nightly-{uuid.uuid4().hex[:6]}"
    site = ["-i", str(local_inventory), "--no-sudo", "--backup-dir", str(backup_dir)]
    host = BackupHost(BackupSite.user_mode(backup_server.prefix, server_account(), backup_dir=str(backup_dir)))
    wrapper = backup_dir / ".tunefleet" / "nightly.sh"

    first = invoke(cli_group, "backup", "schedule", *site, "--scheduler", "cron", "--hour", "3", "--minute", "7")
    second = invoke(cli_group, "backup", "schedule", *site, "--scheduler", "cron", "--hour", "3", "--minute", "7")
    try:
        assert first.exit_code == 0, first.output
        assert second.exit_code == 0, second.output
        assert "0 change(s)" in second.stderr
        entry = [line for line in crontab_of(server_account()).splitlines() if str(wrapper) in line]
        assert entry == [f"7 3 * * * {wrapper}"]
        assert backup_dir.stat().st_mode & 0o777 == 0o700

        good_night = as_account(str(wrapper))
        assert good_night.returncode == 0, (backup_dir / ".tunefleet" / "nightly.log").read_text()
        as_account(f". '{backup_server.prefix}/env.sh' && pg_ctl stop --wait --mode=fast")
        try:
            failed_night = as_account(str(wrapper))
        finally:
            as_account(f"'{backup_server.prefix}/start.sh'")

        assert failed_night.returncode == 1
        listed = list_backups(host)
        assert [entry["status"] for entry in listed["backups"]] == ["good", "failed"]
        assert "psql failed" in listed["backups"][1]["error"]
        assert "nightly backup failed" in (backup_dir / ".tunefleet" / "nightly.log").read_text()
    finally:
        crontab = "".join(line + "\n" for line in crontab_of(server_account()).splitlines()
                          if str(wrapper) not in line and "tunefleet backup" not in line)
        subprocess.run(["crontab", "-u", server_account(), "-"], input=crontab, text=True, check=False)


def fake_partial(backup_dir: Path, name: str) -> tuple[Path, Path]:
    """Create .partial-<name> with a file and its lock file, owned by the server's account."""
    account = pwd.getpwnam(server_account())
    directory = backup_dir / f".partial-{name}"
    directory.mkdir(mode=0o700)
    (directory / "base.tar.gz").write_bytes(b"half a base backup")
    lock = backup_dir / f".partial-{name}.lock"
    lock.write_text("999999\n")
    for path in (directory, directory / "base.tar.gz", lock):
        os.chown(path, account.pw_uid, account.pw_gid)
    return directory, lock


def test_create_removes_only_unlocked_partials(backup_host):
    backup_dir = Path(backup_host.site.backup_dir)
    stale, stale_lock = fake_partial(backup_dir, "20200101T000000Z")
    live, live_lock = fake_partial(backup_dir, "20200101T000100Z")

    # The test holds this lock the way a backup that is still running would.
    with open(live_lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        record = create_backup(backup_host)

    assert record["status"] == "good"
    assert record["removed_partials"] == ["20200101T000000Z"]
    assert not stale.exists()
    assert not stale_lock.exists()
    assert (live / "base.tar.gz").read_bytes() == b"half a base backup"
    assert live_lock.exists()
    listed = {entry["name"]: entry for entry in list_backups(backup_host)["backups"]}
    assert listed["20200101T000000Z"]["status"] == "failed"
    assert "interrupted" in listed["20200101T000000Z"]["error"]
    assert listed["20200101T000000Z"]["started_at"] == "2020-01-01T00:00:00+00:00"
    assert "20200101T000100Z" not in listed
    assert verify_backup(backup_host, record["name"])["verified"] is True


def kill_process_tree(root: int) -> None:
    """SIGKILL `root` and its descendants, stopping each first so that none forks in between.

    Killing the process group is not enough, because su starts the command in a new session.
    """
    stopped: list[int] = []
    while pids := [pid for pid in [root, *descendant_pids(root)] if pid not in stopped]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_create_after_killed_backup_removes_partial(backup_host, backup_storage_url):
    add_study(backup_storage_url, trials=2)
    backup_dir = Path(backup_host.site.backup_dir)
    command = backup_host._command(("create",))
    killed = subprocess.Popen(["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(backup_dir.glob(".partial-*/base.tar*")) and time.monotonic() < deadline:
            assert killed.poll() is None, "the backup finished before the test could kill it"
            time.sleep(0.01)
    finally:
        # The script and pg_basebackup go at once, as when the machine loses power.
        kill_process_tree(killed.pid)
        killed.wait(timeout=30)
    leftovers = [path for path in backup_dir.glob(".partial-*") if path.is_dir()]
    assert len(leftovers) == 1
    killed_name = leftovers[0].name.removeprefix(".partial-")

    record = create_backup(backup_host)

    assert record["status"] == "good"
    assert record["removed_partials"] == [killed_name]
    assert list(backup_dir.glob(".partial-*")) == []
    assert list(backup_dir.glob(".scratch-*")) == []
    statuses = {entry["name"]: entry["status"] for entry in list_backups(backup_host)["backups"]}
    assert statuses == {killed_name: "failed", record["name"]: "good"}
    assert verify_backup(backup_host, record["name"], restore=True)["verified"] is True


def test_interrupted_create_removes_partial_at_once(local_inventory, backup_server, server_base_dir,
                                                   backup_storage_url):
    add_study(backup_storage_url, trials=2)
    backup_dir = make_backup_dir(server_base_dir)
    tunefleet = Path(sys.executable).with_name("tunefleet")
    interrupted = subprocess.Popen(
        [str(tunefleet), "backup", "create", "-i", str(local_inventory), "--no-sudo", "--backup-dir", str(backup_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not list(backup_dir.glob(".partial-*/base.tar*")) and time.monotonic() < deadline:
        assert interrupted.poll() is None, "the backup finished before the test could interrupt it"
        time.sleep(0.01)

    # The SIGINT of a Ctrl-C in the terminal.
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=90)

    assert interrupted.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: backup interrupted; ")
    assert "Aborted!" not in stderr
    assert not list(backup_dir.glob(".partial-*"))
    records = [json.loads(path.read_text()) for path in (backup_dir / "records").glob("*.json")]
    assert [record["status"] for record in records] == ["failed"]
    assert records[0]["error"].startswith("interrupted: SIGTERM arrived")
