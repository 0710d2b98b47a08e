"""Restoring a backup onto another server prefix of this machine with the real role and a real worker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import free_port, provision_test_server, server_account, stop_server
from ops.backups import BackupHost, BackupSite, create_backup
from ops.errors import TunefleetError
from ops.paths import project_root
from ops.restore import restore_backup

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
