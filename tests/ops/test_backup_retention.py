"""Retention and listing of the backup script, on backup directories built from record files."""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.backups import BACKUP_SCRIPT


def load_script():
    spec = importlib.util.spec_from_file_location("tunefleet_backup", BACKUP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()
START = datetime.datetime(2026, 11, 2, 2, 0, tzinfo=datetime.timezone.utc)  # a Monday


def add_backup(backup_dir: Path, name: str, started_at: datetime.datetime, status: str = "good") -> None:
    """Write a record, and for a good backup its directory, as `create` leaves them."""
    (backup_dir / "records").mkdir(exist_ok=True)
    record = {"name": name, "started_at": started_at.isoformat(), "status": status}
    (backup_dir / "records" / f"{name}.json").write_text(json.dumps(record))
    if status == "good":
        (backup_dir / name).mkdir()
        (backup_dir / name / "base.tar.zst").write_bytes(b"x")


def run_script(backup_dir: Path, *arguments: str) -> dict:
    completed = subprocess.run([sys.executable, str(BACKUP_SCRIPT), "--backup-dir", str(backup_dir), *arguments],
                               capture_output=True, text=True, check=False)
    return json.loads(completed.stdout)


def nightly(backup_dir: Path, nights: int, *, failed: set[int] = frozenset()) -> list[str]:
    names = []
    for night in range(nights):
        name = f"night-{night:02d}"
        add_backup(backup_dir, name, START + datetime.timedelta(days=night), "failed" if night in failed else "good")
        names.append(name)
    return names


def test_prune_keeps_daily_and_weekly(tmp_path):
    names = nightly(tmp_path, 21)  # three ISO weeks, Monday to Sunday

    result = run_script(tmp_path, "prune", "--keep-daily", "3", "--keep-weekly", "3")

    # Three newest nights, plus the Sundays that end the two earlier weeks.
    assert sorted(result["kept"]) == sorted([names[20], names[19], names[18], names[13], names[6]])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "records") == sorted(result["kept"])
    assert sorted(p.stem for p in (tmp_path / "records").iterdir()) == sorted(result["kept"])


def test_prune_dry_run_deletes_nothing(tmp_path):
    names = nightly(tmp_path, 5)

    result = run_script(tmp_path, "prune", "--keep-daily", "1", "--keep-weekly", "0", "--dry-run")

    assert result["dry_run"] is True
    assert result["deleted"] == names[:4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "records") == names


def test_prune_orders_by_time_not_name(tmp_path):
    # Names sort the other way round from the backup times.
    add_backup(tmp_path, "b-older-name", START + datetime.timedelta(days=2))
    add_backup(tmp_path, "z-newest-name", START)

    result = run_script(tmp_path, "prune", "--keep-daily", "1", "--keep-weekly", "0")

    assert result["kept"] == ["b-older-name"]
    assert result["deleted"] == ["z-newest-name"]


def test_prune_never_counts_failed(tmp_path):
    names = nightly(tmp_path, 5, failed={3, 4})

    result = run_script(tmp_path, "prune", "--keep-daily", "2", "--keep-weekly", "0")

    # Failed nights are newer than the newest good backup, so their records stay visible.
    assert sorted(result["kept"]) == sorted([names[1], names[2], names[3], names[4]])
    assert result["deleted"] == [names[0]]


@pytest.mark.parametrize(("keep_daily", "keep_weekly"), [(0, 0), (0, 1), (1, 0), (2, 5)])
def test_prune_keeps_newest_good(tmp_path, keep_daily, keep_weekly):
    names = nightly(tmp_path, 10, failed={9})

    result = run_script(tmp_path, "prune", "--keep-daily", str(keep_daily), "--keep-weekly", str(keep_weekly))

    assert names[8] in result["kept"]
    assert (tmp_path / names[8]).is_dir()


def test_prune_removes_failed_older_than_newest_good(tmp_path):
    names = nightly(tmp_path, 4, failed={1})

    result = run_script(tmp_path, "prune", "--keep-daily", "7", "--keep-weekly", "0")

    assert result["deleted"] == [names[1]]
    assert not (tmp_path / "records" / f"{names[1]}.json").exists()


def test_list_marks_missing_directory(tmp_path):
    names = nightly(tmp_path, 2)
    (tmp_path / names[1] / "base.tar.zst").unlink()
    (tmp_path / names[1]).rmdir()

    listed = run_script(tmp_path, "list", "--now", (START + datetime.timedelta(days=1, hours=1)).isoformat())

    assert [entry["status"] for entry in listed["backups"]] == ["good", "missing"]
    assert listed["warnings"] == []


def test_list_warns_after_26_hours(tmp_path):
    nightly(tmp_path, 1)

    within = run_script(tmp_path, "list", "--now", (START + datetime.timedelta(hours=25, minutes=59)).isoformat())
    beyond = run_script(tmp_path, "list", "--now", (START + datetime.timedelta(hours=26, minutes=1)).isoformat())

    assert within["warnings"] == []
    assert len(beyond["warnings"]) == 1
    assert "26 hours old" in beyond["warnings"][0]


def test_list_warns_without_good_backup(tmp_path):
    nightly(tmp_path, 2, failed={0, 1})

    listed = run_script(tmp_path, "list")

    assert [entry["status"] for entry in listed["backups"]] == ["failed", "failed"]
    assert listed["warnings"] == ["no good backup exists"]


def test_plan_prune_ignores_unreadable_record(tmp_path):
    names = nightly(tmp_path, 2)
    (tmp_path / "records" / "broken.json").write_text("{not json")

    kept, deleted = script.plan_prune(script.read_records(tmp_path), keep_daily=1, keep_weekly=0)

    assert "broken" in [record["name"] for record in kept]
    assert [record["name"] for record in deleted] == [names[0]]


def test_prune_skips_damaged_newest_backup(tmp_path):
    names = nightly(tmp_path, 3)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / f"{names[2]}.json").write_text(json.dumps({"name": names[2], "error": "base.tar.zst"}))

    result = run_script(tmp_path, "prune", "--keep-daily", "1", "--keep-weekly", "0")
    listed = run_script(tmp_path, "list", "--now", (START + datetime.timedelta(days=2)).isoformat())

    # The damaged night is newer than the newest good one, so it stays visible.
    assert result["kept"] == [names[1], names[2]]
    assert result["deleted"] == [names[0]]
    assert [entry["status"] for entry in listed["backups"]] == ["good", "damaged"]
    assert listed["backups"][1]["error"] == "base.tar.zst"
