"""``tunefleet study`` against the real PostgreSQL that the playbook installed."""

from __future__ import annotations

import json
import socket
import uuid

import optuna
import pytest
import yaml
from click.testing import CliRunner

from ops.cli import cli


@pytest.fixture
def env_file(tmp_path, storage_url):
    path = tmp_path / "storage.env"
    path.write_text(f"TUNEFLEET_STORAGE_URL={storage_url}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def runner(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNEFLEET_STORAGE_URL", raising=False)
    monkeypatch.delenv("TUNEFLEET_ENV_FILE", raising=False)
    monkeypatch.setenv("TUNEFLEET_HOME", str(tmp_path / "home"))
    return CliRunner()


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _invoke(runner, *args):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def test_create_then_list_shows_target(runner, env_file):
    name = _name()
    created = _invoke(runner, "study", "create", name, "--trials", "7", "--env-file", str(env_file))
    assert created.exit_code == 0, created.output

    listed = _invoke(runner, "study", "list", "--format", "json", "--env-file", str(env_file))
    assert listed.exit_code == 0, listed.output
    records = {record["name"]: record for record in json.loads(listed.stdout)}
    assert records[name]["target_trials"] == 7
    assert records[name]["trials"]["COMPLETE"] == 0


def test_create_twice_is_one_line_error(runner, env_file):
    name = _name()
    _invoke(runner, "study", "create", name, "--trials", "3", "--env-file", str(env_file))
    again = _invoke(runner, "study", "create", name, "--trials", "3", "--env-file", str(env_file))
    assert again.exit_code == 1
    assert again.stderr.count("\n") == 1
    assert f"study '{name}' already exists" in again.stderr


def test_show_unknown_study_fails(runner, env_file):
    result = _invoke(runner, "study", "show", "no-such-study", "--env-file", str(env_file))
    assert result.exit_code == 1
    assert "study 'no-such-study' not found" in result.stderr
    assert "tunefleet study create no-such-study" in result.stderr


def test_best_without_completed_trial_fails(runner, env_file):
    name = _name()
    _invoke(runner, "study", "create", name, "--trials", "3", "--env-file", str(env_file))
    result = _invoke(runner, "study", "best", name, "--env-file", str(env_file))
    assert result.exit_code == 1
    assert "has no completed trial yet" in result.stderr


def test_best_writes_yaml_and_json(runner, env_file, storage_url, tmp_path):
    name = _name()
    _invoke(runner, "study", "create", name, "--trials", "3", "--env-file", str(env_file))
    study = optuna.load_study(study_name=name, storage=storage_url)
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=3)

    yaml_path = tmp_path / "best.yaml"
    result = _invoke(runner, "study", "best", name, "--output", str(yaml_path), "--env-file", str(env_file))
    assert result.exit_code == 0, result.output
    document = yaml.safe_load(yaml_path.read_text())
    assert document["params"] == study.best_params
    assert document["trial"] == study.best_trial.number

    as_json = _invoke(runner, "study", "best", name, "--env-file", str(env_file))
    assert json.loads(as_json.stdout)["value"] == pytest.approx(study.best_value)


def test_show_table_and_yaml(runner, env_file, storage_url):
    name = _name()
    _invoke(runner, "study", "create", name, "--trials", "2", "--env-file", str(env_file))
    study = optuna.load_study(study_name=name, storage=storage_url)
    study.optimize(lambda trial: trial.suggest_int("n", 1, 5), n_trials=2)

    table = _invoke(runner, "study", "show", name, "--env-file", str(env_file))
    assert table.exit_code == 0, table.output
    assert name in table.stdout

    as_yaml = yaml.safe_load(_invoke(runner, "study", "show", name, "--format", "yaml",
                                     "--env-file", str(env_file)).stdout)
    assert as_yaml["trials"]["COMPLETE"] == 2
    assert [trial["number"] for trial in as_yaml["trial_list"]] == [0, 1]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_storage_is_masked_one_line(runner, tmp_path):
    secret = "not-a-real-password-7f3a"
    path = tmp_path / "bad.env"
    path.write_text(f"TUNEFLEET_STORAGE_URL=postgresql+psycopg2://optuna:{secret}@127.0.0.1:{_closed_port()}/optuna\n")
    path.chmod(0o600)
    result = _invoke(runner, "study", "list", "--env-file", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot connect to the storage at")
    assert result.stderr.count("\n") == 1
    assert secret not in result.output


def test_env_file_readable_by_others_rejected(runner, env_file):
    env_file.chmod(0o644)
    result = _invoke(runner, "study", "list", "--env-file", str(env_file))
    assert result.exit_code == 1
    assert "chmod 600" in result.stderr


def test_unknown_format_is_usage_error(runner, env_file):
    result = _invoke(runner, "study", "list", "--format", "xml", "--env-file", str(env_file))
    assert result.exit_code == 2


def test_bare_postgresql_url_uses_psycopg2(runner, storage_url, monkeypatch):
    bare = storage_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    monkeypatch.setenv("TUNEFLEET_STORAGE_URL", bare)
    result = _invoke(runner, "study", "list", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_unsupported_driver_is_one_line(runner, monkeypatch):
    monkeypatch.setenv("TUNEFLEET_STORAGE_URL", "nosuchdb+nodriver://u:secret-x9@127.0.0.1/db")
    result = _invoke(runner, "study", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: invalid storage URL")
    assert "secret-x9" not in result.output


def test_silent_server_times_out(runner, monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("TUNEFLEET_STORAGE_URL", f"postgresql+psycopg2://u:p@127.0.0.1:{port}/db")
        result = _invoke(runner, "study", "list")
    assert result.exit_code == 1
    assert "timeout" in result.stderr


def test_empty_study_name_rejected(runner, env_file):
    result = _invoke(runner, "study", "create", " ", "--trials", "2", "--env-file", str(env_file))
    assert result.exit_code == 1
    assert "invalid study name" in result.stderr


def test_best_unknown_suffix_is_usage_error(runner, env_file, tmp_path):
    result = _invoke(runner, "study", "best", "any", "--output", str(tmp_path / "best.txt"),
                     "--env-file", str(env_file))
    assert result.exit_code == 2
    assert not (tmp_path / "best.txt").exists()


def test_workers_start_unknown_study_contacts_no_host(runner, env_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFLEET_ENV_FILE", str(env_file))
    # 127.0.0.254:9 has no sshd; a contacted host would fail with a connection error instead.
    inventory = tmp_path / "fleet.yml"
    inventory.write_text(json.dumps({"all": {"children": {"gpu": {"hosts": {
        "gpu1": {"ansible_host": "127.0.0.254", "ansible_port": 9}}}}}}))
    result = _invoke(runner, "workers", "start", "no-such-study", "-i", str(inventory))
    assert result.exit_code == 1
    assert "study 'no-such-study' not found" in result.stderr
    assert "127.0.0.254" not in result.output
