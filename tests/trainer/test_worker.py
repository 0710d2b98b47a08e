"""Worker processes against the real PostgreSQL: targets, crashes, signals, errors."""

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from trainer import storage as storage_module
from worker_testing import read_log, running_trial_of, wait_for, worker_environment

SLEEPY = "sleepy_objective:objective"


def finished_trials(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def test_two_workers_stop_at_target(make_study, env_file, sleepy_space, start_worker, tmp_path):
    study = make_study(target_trials=8)
    space = sleepy_space(steps=2, step_seconds=0.05)
    workers = [start_worker("--study", study.study_name, "--env-file", str(env_file),
                            "--objective", SLEEPY, "--search-space", str(space)) for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, read_log(worker)

    trials = study.get_trials(deepcopy=False)
    numbers = [trial.number for trial in trials]
    assert len(numbers) == len(set(numbers))
    assert len(finished_trials(study)) == 8
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    assert {trial.user_attrs["worker"].rsplit(":", 1)[1] for trial in trials} <= {str(w.pid) for w in workers}
    for trial in trials:
        checkpoint = trial.user_attrs["checkpoint"]
        assert os.path.isabs(checkpoint)
        assert os.path.exists(checkpoint)
        assert checkpoint.endswith(f"trial-{trial.number}.pt")


def test_three_workers_hit_large_target_exactly(make_study, env_file, sleepy_space, start_worker):
    # Most of these trials start without the trial-count lock, and only the last few take it.
    study = make_study(target_trials=60, sampler="random")
    space = sleepy_space(steps=1, step_seconds=0.0)
    workers = [start_worker("--study", study.study_name, "--env-file", str(env_file),
                            "--objective", SLEEPY, "--search-space", str(space)) for _ in range(3)]
    for worker in workers:
        assert worker.wait(timeout=180) == 0, read_log(worker)

    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 60
    assert len(states) == 60


def test_worker_on_finished_study_runs_nothing(make_study, env_file, sleepy_space, start_worker):
    study = make_study(target_trials=1)
    study.add_trial(optuna.create_trial(params={"x": 0.5}, value=0.5,
                                        distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file),
                          "--objective", SLEEPY, "--search-space", str(sleepy_space()))
    assert worker.wait(timeout=60) == 0
    assert len(study.get_trials(deepcopy=False)) == 1
    assert "target reached (1/1 trials finished)" in read_log(worker)


def test_killed_worker_trial_is_retried(make_study, env_file, sleepy_space, start_worker):
    study = make_study(target_trials=3)
    space = sleepy_space(steps=8, step_seconds=0.5)
    heartbeat = ["--heartbeat-interval", "1", "--grace-period", "2"]
    common = ["--study", study.study_name, "--env-file", str(env_file), "--objective", SLEEPY,
              "--search-space", str(space), *heartbeat]
    victim = start_worker(*common)
    killed = wait_for(lambda: running_trial_of(study, victim.pid), timeout=60, message="a running trial")
    victim.kill()
    victim.wait()
    survivor = start_worker(*common)
    assert survivor.wait(timeout=120) == 0, read_log(survivor)

    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert len(finished_trials(study)) == 3


def test_sigterm_leaves_no_running_trial(make_study, env_file, sleepy_space, start_worker):
    study = make_study(target_trials=5)
    space = sleepy_space(steps=100, step_seconds=0.5)
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file),
                          "--objective", SLEEPY, "--search-space", str(space))
    interrupted = wait_for(lambda: running_trial_of(study, worker.pid), timeout=60, message="a running trial")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, read_log(worker)

    trials = study.get_trials(deepcopy=False)
    states = [trial.state for trial in trials]
    assert TrialState.RUNNING not in states
    assert trials[interrupted.number].state == TrialState.FAIL
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1
    assert queued[0].params == interrupted.params
    assert "stopped by SIGTERM" in read_log(worker)


def test_failing_objective_stops_after_limit(make_study, env_file, sleepy_space, start_worker):
    study = make_study(target_trials=50)
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file),
                          "--objective", SLEEPY, "--search-space", str(sleepy_space(steps=1, step_seconds=0)),
                          "--max-consecutive-failures", "3",
                          env=worker_environment(SLEEPY_OBJECTIVE_FAIL="1"))
    assert worker.wait(timeout=60) == 1
    log = read_log(worker)
    assert "failing as SLEEPY_OBJECTIVE_FAIL asks" in log
    assert "the last 3 trials of this worker failed" in log
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL] * 3


def run_worker(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "trainer.worker", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result, expected: str):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_unknown_study_is_one_line_error(env_file, tmp_path):
    result = run_worker(["--study", "no-such-study", "--env-file", str(env_file)], worker_environment(), tmp_path)
    assert_one_line_error(result, "study 'no-such-study' not found at the storage; "
                                  "create it with: tunefleet study create no-such-study")


def test_study_without_settings_is_one_line_error(storage_url, env_file, tmp_path):
    study = optuna.create_study(storage=storage_url)
    result = run_worker(["--study", study.study_name, "--env-file", str(env_file)], worker_environment(), tmp_path)
    assert_one_line_error(result, f"create it with: tunefleet study create {study.study_name}")


def test_bad_url_is_one_line_error(tmp_path):
    env = worker_environment(TUNEFLEET_STORAGE_URL="postgresql+psycopg2://optuna:hunter2-secret@127.0.0.1:1/optuna")
    result = run_worker(["--study", "any"], env, tmp_path)
    assert_one_line_error(result, "cannot connect to the storage at "
                                  "postgresql+psycopg2://optuna:***@127.0.0.1:1/optuna: ")
    assert "hunter2-secret" not in result.stderr


def test_bad_objective_is_one_line_error(env_file, sleepy_space, tmp_path):
    args = ["--study", "any", "--env-file", str(env_file), "--search-space", str(sleepy_space())]
    result = run_worker([*args, "--objective", "no_such_package.module:objective"], worker_environment(), tmp_path)
    assert_one_line_error(result, "cannot import objective module 'no_such_package.module'")
    assert "No module named 'no_such_package'" in result.stderr

    result = run_worker([*args, "--objective", "sleepy_objective:absent"], worker_environment(), tmp_path)
    assert_one_line_error(result, "module 'sleepy_objective' has no function 'absent'")


def test_malformed_search_space_is_one_line_error(env_file, tmp_path):
    space = tmp_path / "space.yml"
    space.write_text("params:\n  x: {type: float, low: 3, high: 1}\n")
    result = run_worker(["--study", "any", "--env-file", str(env_file), "--objective", SLEEPY,
                         "--search-space", str(space)], worker_environment(), tmp_path)
    assert_one_line_error(result, f"{space}: parameter 'x': low (3.0) is greater than high (1.0)")


def test_readable_env_file_is_rejected(env_file, tmp_path):
    env_file.chmod(0o644)
    result = run_worker(["--study", "any", "--env-file", str(env_file)], worker_environment(), tmp_path)
    assert_one_line_error(result, f"run: chmod 600 {env_file}")


def test_usage_error_exits_2(tmp_path):
    result = run_worker(["--study", "any", "--objective", "no-colon"], worker_environment(), tmp_path)
    assert result.returncode == 2


def test_password_not_in_log_or_argv(make_study, env_file, sleepy_space, start_worker, storage_url):
    password = make_url(storage_url).password
    assert password
    study = make_study(target_trials=2)
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file), "--objective", SLEEPY,
                          "--search-space", str(sleepy_space(steps=4, step_seconds=0.2)), "--log-level", "DEBUG")
    wait_for(lambda: running_trial_of(study, worker.pid), timeout=60, message="a running trial")
    argv = open(f"/proc/{worker.pid}/cmdline", "rb").read().decode()
    ps_output = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert worker.wait(timeout=60) == 0

    log = read_log(worker)
    assert "optuna:***@" in log
    assert password not in log
    assert password not in argv
    assert password not in ps_output


def test_stale_watch_fails_trial_without_heartbeat(make_study, storage_url):
    study = make_study(target_trials=3)
    rdb = storage_module.open_storage(storage_url)
    study_id = rdb.get_study_id_from_name(study.study_name)
    orphan = study.ask()  # A worker killed before its first heartbeat leaves this.
    orphan.suggest_float("x", 0.0, 1.0)
    beating = study.ask()
    rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(study_id, beating.number))
    now = [100.0]
    watch = storage_module.StaleTrialWatch(rdb, study_id, grace_seconds=5,
                                           retry=RetryHeartbeatStaleTrialCallback(), clock=lambda: now[0])

    assert watch.fail_stale(study) == []
    now[0] += 4.9
    assert watch.fail_stale(study) == []
    now[0] += 0.1
    assert watch.fail_stale(study) == [orphan.number]
    assert watch.fail_stale(study) == []

    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[beating.number].state == TrialState.RUNNING
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert [(t.state, t.params) for t in retries] == [(TrialState.WAITING, orphan.params)]


def test_stale_watch_fails_trial_with_late_heartbeat(make_study, storage_url):
    study = make_study(target_trials=3)
    rdb = storage_module.open_storage(storage_url)
    study_id = rdb.get_study_id_from_name(study.study_name)
    late, fresh = study.ask(), study.ask()
    for trial in (late, fresh):
        rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    time.sleep(2.5)
    rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(study_id, fresh.number))
    watch = storage_module.StaleTrialWatch(rdb, study_id, grace_seconds=2, retry=None)

    assert watch.fail_stale(study) == [late.number]
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.RUNNING]


def test_count_trials_sees_connected_workers(make_study, storage_url):
    study = make_study(target_trials=3)
    study.ask()
    names = [storage_module.WORKER_APPLICATION_PREFIX + suffix for suffix in ("a", "b")]
    storages = [storage_module.open_storage(storage_url, application_name=name) for name in names]
    study_id = storages[0].get_study_id_from_name(study.study_name)

    counts = storage_module.count_trials(storages[1], study_id)
    assert counts.states["RUNNING"] == 1
    assert counts.open_slots(3) == 2
    assert counts.workers >= 2


def test_worker_retries_heartbeatless_trial(make_study, env_file, sleepy_space, start_worker):
    study = make_study(target_trials=2)
    orphan = study.ask()
    orphan.suggest_float("x", 0.0, 1.0)
    worker = start_worker("--study", study.study_name, "--env-file", str(env_file), "--objective", SLEEPY,
                          "--search-space", str(sleepy_space(steps=1, step_seconds=0.01)),
                          "--heartbeat-interval", "1", "--grace-period", "2")
    assert worker.wait(timeout=90) == 0, read_log(worker)

    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert [(t.state, t.params) for t in retries] == [(TrialState.COMPLETE, orphan.params)]
    assert len(finished_trials(study)) == 2
    assert f"trial {orphan.number} had no heartbeat for 2s; marked FAIL" in read_log(worker)
