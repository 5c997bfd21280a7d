"""skinclip.output_folder: the lock, the manifest, no write through a symlink, atomic writes."""

import json
import os
import subprocess
import sys

import pytest

from skinclip import output_folder
from skinclip.errors import UserError
from skinclip.output_folder import LOCK_NAME, MANIFEST_NAME, OutputFolder
from tests.conftest import REPO_ROOT

HOLD_LOCK = """
import sys, time
from skinclip.output_folder import OutputFolder
with OutputFolder(sys.argv[1], "holder.py"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_command_is_refused_naming_the_live_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            with OutputFolder(tmp_path / "out", "train.py"):
                pytest.fail("a second command got the lock")
        message = str(refused.value)
        assert f"in use by pid {holder.pid} on " in message and "(holder.py, started " in message
        assert str(tmp_path / "out" / LOCK_NAME) in message
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released on exit
    with OutputFolder(tmp_path / "out", "train.py"):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": os.uname().nodename, "command": "train.py", "started": "earlier"})
    )
    with OutputFolder(tmp_path, "evaluate"):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "evaluate"
    assert f"was left by pid {pid} on" in capsys.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "other-node", "command": "train.py"}))
    with pytest.raises(UserError, match="in use by pid 1 on other-node"):
        with OutputFolder(tmp_path, "train.py"):
            pass
    assert (tmp_path / LOCK_NAME).exists()


def test_the_manifest_lists_what_the_command_wrote_and_tells_a_users_files_apart(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("mine, before the run")
    with OutputFolder(tmp_path, "train.py") as folder:
        (tmp_path / "checkpoint-2").mkdir()
        (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"w")
        (tmp_path / "runs" / "Dec02_host").mkdir()
        (tmp_path / "runs" / "Dec02_host" / "events").write_bytes(b"e")
        folder.record()
        (tmp_path / "model.safetensors").write_bytes(b"final")
    listed = output_folder.read_manifest(tmp_path)
    assert sorted(listed) == ["checkpoint-2/model.safetensors", "model.safetensors", "runs/Dec02_host/events"]
    # A user's files put beside the run's, and into its folders, after the run.
    (tmp_path / "runs" / "other_experiment").mkdir()
    (tmp_path / "runs" / "other_experiment" / "events").write_text("theirs")
    (tmp_path / "checkpoint-2" / "my_notes.txt").write_text("theirs")
    owned, foreign = output_folder.owned_and_foreign(tmp_path)
    assert owned == sorted(listed)
    assert foreign == ["checkpoint-2/my_notes.txt", "notes.txt", "runs/other_experiment/events"]


def test_a_listed_file_replaced_by_a_symlink_is_not_owned(tmp_path):
    with OutputFolder(tmp_path, "train.py"):
        (tmp_path / "config.json").write_text("{}")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    outside.write_text("precious")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to(outside)
    owned, foreign = output_folder.owned_and_foreign(tmp_path)
    assert owned == [] and foreign == ["config.json"]
    assert output_folder.symlinks_in_the_way(tmp_path) == [f"config.json -> {outside}"]


def test_a_manifest_that_is_not_one_is_a_user_error(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"files": {"a": "big"}}')
    with pytest.raises(UserError, match=f"{MANIFEST_NAME} is not a valid SkinCLIP-VL manifest"):
        output_folder.read_manifest(tmp_path)


def test_a_manifest_never_points_outside_its_folder(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"files": {"../x": [1, 2], "/etc/passwd": [1, 2], "a": [1, 2]}}))
    assert list(output_folder.read_manifest(tmp_path)) == ["a"]


def test_a_folder_the_command_created_is_removed_if_it_wrote_nothing(tmp_path):
    with pytest.raises(UserError):
        with OutputFolder(tmp_path / "new", "train.py"):
            raise UserError("bad data")
    assert not (tmp_path / "new").exists()


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    output_folder.atomic_write_text(target, "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        output_folder.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").symlink_to(outside)
    output_folder.atomic_write_text(tmp_path / "out" / "metrics.json", "{}")
    assert outside.read_text() == "precious"
    assert not (tmp_path / "out" / "metrics.json").is_symlink()


def test_atomic_writes_get_the_mode_an_ordinary_open_gives(tmp_path):
    """mkstemp makes 0600 files; a metrics file or heatmap a user shares must get 0666 & ~umask like open()."""
    previous = os.umask(0o022)
    try:
        output_folder.atomic_write_text(tmp_path / "metrics.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("metrics.json", "plain.json")}
    assert modes == {"metrics.json": 0o644, "plain.json": 0o644}
