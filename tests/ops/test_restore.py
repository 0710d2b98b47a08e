"""Restoring a backup with the real role and a real worker: onto another prefix of this
machine, and from one loopback sshd host onto another over SFTP."""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import free_port, provision_test_server, server_account, stop_server
from ops.backups import BackupHost, BackupSite, create_backup, open_backup_host
from ops.errors import TunefleetError
from ops.paths import project_root
from ops.provision import provision_database
from ops.restore import STAGING_DIR, restore_backup
from support.sshd_hosts import write_inventory as write_ssh_inventory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_server(tunefleet_home, server_base_dir):
    provisioning = provision_test_server(server_base_dir / "restore-source", free_port())
    assert provisioning.result.ok, provisioning.result.failures
    return provisioning


def write_inventory(path: Path, source_server, target_prefix: Path, target_port: int, **target_vars) -> Path:
    path.write_text(yaml.safe_dump({"all": {"children": {
        "db": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "postgresql_port": source_server.extravars["postgresql_port"],
            "postgresql_prefix": str(source_server.prefix),
        }}},
        "spare": {"hosts": {"new-db": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "postgresql_port": target_port,
            "postgresql_prefix": str(target_prefix),
            "postgresql_start_on_boot": False,
            **target_vars,
        }}},
        "gpu": {"hosts": {}},
    }}}))
    return path


def source_backup(source_server) -> tuple[optuna.Study, dict]:
    url = source_server.server.storage_url(masked=False)
    study = optuna.create_study(study_name=f"restore-{uuid.uuid4().hex[:8]}", storage=url, direction="maximize")
    study.set_user_attr("tunefleet", {"target_trials": 6, "sampler": "random", "pruner": "none", "seed": 2})
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=4)
    site = BackupSite.user_mode(source_server.prefix, server_account())
    host = BackupHost(site)
    Path(site.backup_dir).mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["chown", server_account(), site.backup_dir], check=True)
    return study, create_backup(host)


def run_worker(storage_url: str, study_name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env_file = tmp_path / "restored.env"
    env_file.write_text(f"TUNEFLEET_STORAGE_URL={storage_url}\n")
    env_file.chmod(0o600)
    space = tmp_path / "space.yml"
    space.write_text(yaml.safe_dump({"params": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
                                     "fixed": {"steps": 1, "step_seconds": 0.01}}))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TUNEFLEET_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(project_root()), str(project_root() / "tests" / "trainer")])
    return subprocess.run(
        [sys.executable, "-m", "trainer.worker", "--study", study_name, "--env-file", str(env_file),
         "--objective", "sleepy_objective:objective", "--search-space", str(space)],
        cwd=tmp_path, env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180,
    )


def test_restore_brings_studies_back_and_worker_continues(source_server, server_base_dir, tmp_path):
    study, record = source_backup(source_server)
    target_prefix = server_base_dir / "restore-target"
    target_port = free_port()
    inventory = write_inventory(tmp_path / "fleet.yml", source_server, target_prefix, target_port)

    try:
        report = restore_backup(inventory, record["name"], "new-db", no_sudo=True)

        assert report.ok, report.problems
        assert report.postgresql_version == record["postgresql_version"]
        restored = next(entry for entry in report.studies if entry["name"] == study.study_name)
        assert restored["trials"] == {"COMPLETE": 4}
        assert restored["best_value"] == pytest.approx(study.best_value)
        assert (target_prefix / "data").stat().st_mode & 0o777 == 0o700

        assert report.server.port == target_port
        target_url = report.server.storage_url(masked=False)
        worker = run_worker(target_url, study.study_name, tmp_path)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        continued = optuna.load_study(study_name=study.study_name, storage=target_url)
        assert len(continued.get_trials(states=(TrialState.COMPLETE,))) == 6
        # The source server is untouched by the restore and the worker.
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    finally:
        stop_server(target_prefix)


def test_restore_rejects_non_empty_target(source_server, server_base_dir, tmp_path):
    _, record = source_backup(source_server)
    target_prefix = server_base_dir / f"restore-busy-{uuid.uuid4().hex[:6]}"
    (target_prefix / "data").mkdir(parents=True)
    (target_prefix / "data" / "PG_VERSION").write_text("15\n")
    inventory = write_inventory(tmp_path / "fleet.yml", source_server, target_prefix, free_port())

    with pytest.raises(TunefleetError) as caught:
        restore_backup(inventory, record["name"], "new-db", no_sudo=True)

    assert "not empty" in str(caught.value)
    assert (target_prefix / "data" / "PG_VERSION").read_text() == "15\n"
    assert not (target_prefix / "env.sh").exists()


def test_restore_rejects_other_major(source_server, server_base_dir, tmp_path):
    _, record = source_backup(source_server)
    other_major = str(int(record["postgresql_version"]) - 1)
    target_prefix = server_base_dir / f"restore-major-{uuid.uuid4().hex[:6]}"
    inventory = write_inventory(tmp_path / "fleet.yml", source_server, target_prefix, free_port(),
                                postgresql_version=other_major)

    with pytest.raises(TunefleetError) as caught:
        restore_backup(inventory, record["name"], "new-db", no_sudo=True)

    assert "same major" in str(caught.value)
    assert "tunefleet study export" in str(caught.value)
    assert not target_prefix.exists()


def test_restore_rejects_unknown_backup(source_server, server_base_dir, tmp_path):
    source_backup(source_server)
    inventory = write_inventory(tmp_path / "fleet.yml", source_server, server_base_dir / "never", free_port())

    with pytest.raises(TunefleetError) as caught:
        restore_backup(inventory, "19990101T000000Z", "new-db", no_sudo=True)

    assert "not found" in str(caught.value)


# Over SSH: the db host and the restore target are two loopback sshd hosts, each with its
# own unprivileged account, so the backup travels from one account to the other over SFTP.


@pytest.fixture(scope="module")
def ssh_fleet(tunefleet_home, ssh_host_factory, tmp_path_factory):
    """An inventory with a db host whose server was provisioned without sudo, and an empty spare host."""
    db = ssh_host_factory("restoredb", 48)
    spare = ssh_host_factory("restorespare", 49)
    inventory = write_ssh_inventory(
        tmp_path_factory.mktemp("restore-ssh") / "fleet.yml", {"db": [db], "spare": [spare], "gpu": []},
        host_vars={db.name: {"postgresql_port": free_port(), "postgresql_start_on_boot": False},
                   spare.name: {"postgresql_port": free_port(), "postgresql_start_on_boot": False}},
    )
    result, server = provision_database(inventory, no_sudo=True)
    assert result.ok, result.failures
    return inventory, db, spare, server


def ssh_source_backup(inventory: Path, server) -> tuple[optuna.Study, dict, BackupHost]:
    study = optuna.create_study(study_name=f"restore-ssh-{uuid.uuid4().hex[:8]}",
                                storage=server.storage_url(masked=False), direction="maximize")
    study.set_user_attr("tunefleet", {"target_trials": 6, "sampler": "random", "pruner": "none", "seed": 3})
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=4)
    host = open_backup_host(inventory, no_sudo=True)
    try:
        code, _, stderr = host.runner(f"mkdir -m 700 -p {shlex.quote(host.site.backup_dir)}", "")
        assert code == 0, stderr
        record = create_backup(host)
    finally:
        host.connection.close()
    return study, record, host


def with_prefix(inventory: Path, host_name: str, prefix: Path) -> Path:
    """Copy `inventory` with another prefix and port for spare host `host_name`, so it can take several restores."""
    data = yaml.safe_load(inventory.read_text())
    data["all"]["children"]["spare"]["hosts"][host_name].update(postgresql_prefix=str(prefix), postgresql_port=free_port())
    copy = inventory.with_name(f"fleet-{uuid.uuid4().hex[:6]}.yml")
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_restore_over_ssh_onto_second_host(ssh_fleet, tmp_path):
    inventory, _, spare, server = ssh_fleet
    study, record, _ = ssh_source_backup(inventory, server)

    report = restore_backup(inventory, record["name"], spare.name, no_sudo=True)

    assert report.ok, report.problems
    restored = next(entry for entry in report.studies if entry["name"] == study.study_name)
    assert restored["trials"] == {"COMPLETE": 4}
    assert restored["best_value"] == pytest.approx(study.best_value)
    prefix = spare.path_on_machine(Path(report.data_dir).parent)
    data_dir = prefix / "data"
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert data_dir.stat().st_uid == pwd.getpwnam(spare.user).pw_uid
    assert not (prefix / STAGING_DIR).exists()

    # The worker runs on this machine and reaches the restored server on the spare host's address.
    assert report.server.host == spare.address
    target_url = report.server.storage_url(masked=False)
    worker = run_worker(target_url, study.study_name, tmp_path)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    continued = optuna.load_study(study_name=study.study_name, storage=target_url)
    assert len(continued.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_restore_over_ssh_rejects_corrupted_copy(ssh_fleet):
    inventory, db, spare, server = ssh_fleet
    _, record, source = ssh_source_backup(inventory, server)
    # Damaged after verification, so only the checksums on the target can catch it.
    backup_dir = db.path_on_machine(source.site.backup_dir) / record["name"]
    archive = next(backup_dir.glob("base.tar*"))
    content = bytearray(archive.read_bytes())
    content[len(content) // 2] ^= 0xFF
    archive.write_bytes(bytes(content))
    prefix = spare.home / f"corrupt-{uuid.uuid4().hex[:6]}"

    with pytest.raises(TunefleetError) as caught:
        restore_backup(with_prefix(inventory, spare.name, prefix), record["name"], spare.name, no_sudo=True)

    assert f"{archive.name}: checksum mismatch" in str(caught.value)
    on_machine = spare.path_on_machine(prefix)
    assert not (on_machine / "data").exists() or not any((on_machine / "data").iterdir())
    assert not (on_machine / STAGING_DIR).exists()
    assert not (on_machine / "run").exists() or not any((on_machine / "run").iterdir())


def with_spare_vars(inventory: Path, host_name: str, **variables) -> Path:
    """Copy `inventory` with `variables` changed for spare host `host_name`."""
    data = yaml.safe_load(inventory.read_text())
    data["all"]["children"]["spare"]["hosts"][host_name].update(variables)
    copy = inventory.with_name(f"fleet-{uuid.uuid4().hex[:6]}.yml")
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_restore_target_closed_port_names_target(ssh_fleet):
    inventory, _, spare, server = ssh_fleet
    _, record, _ = ssh_source_backup(inventory, server)
    wrong_port = with_spare_vars(inventory, spare.name, ansible_port=free_port())

    with pytest.raises(TunefleetError) as caught:
        restore_backup(wrong_port, record["name"], spare.name, no_sudo=True)

    assert str(caught.value).startswith(f"restore target {spare.name} (")
    assert "db host" not in str(caught.value)
    assert "ansible_port" in caught.value.hint
    assert "postgresql_prefix" not in caught.value.hint


def test_restore_target_missing_key_names_file(ssh_fleet, tmp_path):
    inventory, _, spare, server = ssh_fleet
    _, record, _ = ssh_source_backup(inventory, server)
    missing_key = tmp_path / "absent_ed25519"
    no_key = with_spare_vars(inventory, spare.name, ansible_ssh_private_key_file=str(missing_key))

    with pytest.raises(TunefleetError) as caught:
        restore_backup(no_key, record["name"], spare.name, no_sudo=True)

    assert f"SSH key file {missing_key} not found" in str(caught.value)
    assert str(caught.value).startswith(f"restore target {spare.name} (")
    assert "ansible_ssh_private_key_file" in caught.value.hint
    assert "postgresql_prefix" not in caught.value.hint


# System mode: two fresh Debian hosts with sudo and without systemd, each with Debian's
# cluster layout. The target gets the packages without a cluster, then the backup's data
# directory and its /etc/postgresql/N/main.


def test_restore_system_mode_onto_second_host(tunefleet_home, fresh_debian_host, tmp_path):
    db = fresh_debian_host("restore-sys-db", 50)
    spare = fresh_debian_host("restore-sys-spare", 51)
    inventory = write_ssh_inventory(
        tmp_path / "fleet.yml", {"db": [db], "spare": [spare], "gpu": []},
        host_vars={db.name: {"postgresql_port": free_port()}, spare.name: {"postgresql_port": free_port()}},
    )
    result, server = provision_database(inventory, no_sudo=False)
    assert result.ok, result.failures
    study = optuna.create_study(study_name=f"restore-sys-{uuid.uuid4().hex[:8]}",
                                storage=server.storage_url(masked=False), direction="maximize")
    study.set_user_attr("tunefleet", {"target_trials": 6, "sampler": "random", "pruner": "none", "seed": 4})
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=4)
    source = open_backup_host(inventory, no_sudo=False)
    try:
        code, _, stderr = source.runner(
            f"sudo -n install -d -m 700 -o postgres -g postgres {shlex.quote(source.site.backup_dir)}", "")
        assert code == 0, stderr
        record = create_backup(source)
    finally:
        source.connection.close()

    report = restore_backup(inventory, record["name"], spare.name, no_sudo=False)

    assert report.ok, report.problems
    restored = next(entry for entry in report.studies if entry["name"] == study.study_name)
    assert restored["trials"] == {"COMPLETE": 4}
    major = record["postgresql_version"]
    assert report.data_dir == f"/var/lib/postgresql/{major}/main"
    data_dir = spare.path_on_machine(report.data_dir)
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (spare.path_on_machine(f"/etc/postgresql/{major}/main") / "postgresql.conf").is_file()
    assert not spare.path_on_machine(f"/var/lib/postgresql/{STAGING_DIR}").exists()

    target_url = report.server.storage_url(masked=False)
    worker = run_worker(target_url, study.study_name, tmp_path)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    continued = optuna.load_study(study_name=study.study_name, storage=target_url)
    assert len(continued.get_trials(states=(TrialState.COMPLETE,))) == 6
