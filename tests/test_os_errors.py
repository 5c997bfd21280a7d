"""Every OS error is one ``error:`` line naming the path and the fix, and the previous good output survives.

Fault injection: every ``open`` for writing (Python's and ``os.open``, which ``tempfile`` uses) of a file under an
output folder raises the chosen OS error, at the first write or at a named write site; the commands run in-process
through their console entry points. A real full disk: a small tmpfs in a private mount namespace (``unshare``),
skipped where the machine does not allow one.
"""

import contextlib
import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from skinclip import cli
from skinclip.errors import describe_os_error, run_entry_point
from tests.conftest import REPO_ROOT

MANIFEST = ".skinclip-manifest.json"  # rewritten by every command that writes into a folder
FIXES = {
    errno.ENOSPC: "no space left on the device while writing {path}; free some space or write to another disk",
    errno.EROFS: "{path} is on a read-only file system; choose a writable folder",
    errno.EACCES: "permission denied: {path}; make it accessible to this user or choose another path",
}


@contextlib.contextmanager
def failing_writes(folder: Path, number: int, site: str = ""):
    """Opening for writing a file under ``folder`` whose name contains ``site`` raises OSError(``number``).

    Yields the list of paths that failed (the first is the one the error must name).
    """
    folder = os.path.abspath(folder)
    real_open, real_os_open = io.open, os.open
    failed = []

    def check(path, writing):
        if not writing or not isinstance(path, (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(folder + os.sep) and site in os.path.basename(path):
            failed.append(path)
            raise OSError(number, os.strerror(number), path)

    def patched_open(file, mode="r", *args, **kwargs):
        check(file, any(flag in mode for flag in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def patched_os_open(path, flags, *args, **kwargs):
        check(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return real_os_open(path, flags, *args, **kwargs)

    with (
        mock.patch("builtins.open", patched_open),
        mock.patch("io.open", patched_open),
        mock.patch("os.open", patched_os_open),
    ):
        yield failed


def _hashes(folder: Path) -> dict:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def _single_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# The message
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", sorted(FIXES))
def test_an_os_error_is_one_line_naming_the_path_and_the_fix(number, capsys):
    def main(argv):
        raise OSError(number, os.strerror(number), "/data/out/metrics.json")

    assert run_entry_point(main, []) == 1
    assert _single_error_line(capsys) == "error: " + FIXES[number].format(path="/data/out/metrics.json")


def test_a_name_too_long_names_the_path_and_the_longest_part():
    name = "x" * 300
    message = describe_os_error(OSError(errno.ENAMETOOLONG, "File name too long", f"/data/{name}.csv"))
    assert message.startswith(f"file name too long: /data/{name}.csv (a name of 304 bytes)")
    assert message.endswith("choose shorter names (most file systems allow 255 bytes per name)")


def test_an_os_error_without_a_path_names_the_commands_output_folder(tmp_path):
    from skinclip.output_folder import OutputFolder

    with OutputFolder(tmp_path / "out", "test"):
        inside = describe_os_error(OSError(errno.ENAMETOOLONG, "File name too long", ""))
    assert inside.startswith(f"file name too long: a file in {tmp_path / 'out'};")
    # Reported after the folder's block has ended, as run_entry_point does.
    with pytest.raises(OSError) as raised:
        with OutputFolder(tmp_path / "out", "test"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert describe_os_error(raised.value).startswith(
        f"no space left on the device while writing a file in {tmp_path / 'out'};"
    )
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")).startswith(
        "no space left on the device while writing a file (the OS did not say which)"
    )


def test_an_os_error_wrapped_by_a_library_is_recognised_by_its_text():
    # safetensors' own exception, as raised on a full disk.
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert describe_os_error(wrapped).startswith("no space left on the device while writing")
    chained = ValueError("could not save")
    chained.__cause__ = OSError(errno.EROFS, "Read-only file system", "/ro/x")
    assert describe_os_error(chained) == "/ro/x is on a read-only file system; choose a writable folder"
    assert describe_os_error(ValueError("not an OS error")) is None


def test_a_full_disk_during_a_copy_names_the_copy_not_its_source(tmp_path):
    """shutil.copyfile names its source first: the full disk is the destination's (the remote code copied into a
    checkpoint was reported as "no space ... while writing .../modeling_skinclip.py", the checkout's own file)."""
    source, destination = str(tmp_path / "modeling_skinclip.py"), "/full/out/checkpoint-1/modeling_skinclip.py"
    message = describe_os_error(OSError(errno.ENOSPC, "No space left on device", source, None, destination))
    assert message == FIXES[errno.ENOSPC].format(path=destination)
    unreadable = OSError(errno.EACCES, "Permission denied", source, None, destination)
    assert describe_os_error(unreadable) == FIXES[errno.EACCES].format(path=source)  # may be either: as raised


def test_debug_shows_the_traceback_of_an_os_error():
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/x")

    with pytest.raises(OSError):
        run_entry_point(main, ["--debug"])


# --------------------------------------------------------------------------------------------------------
# Fault injection at the write sites of each command
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory, make_config):
    from datasets_scripts.demo import build_demo_dataset
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    root = tmp_path_factory.mktemp("os-errors")
    dataset = build_demo_dataset(num_per_class=6, image_size=32, seed=0)
    dataset.save_to_disk(str(root / "data"))
    config = make_config(class_names=tuple(dataset["train"].features["label"].names))
    model = SkinClipVLModel(config, device="cpu")
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    model.save_pretrained(root / "model")
    SkinClipVLProcessor.from_pretrained(None, config=config).save_pretrained(root / "model")
    return root


def _evaluate(root, out, *options):
    argv = ["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out), "--bootstrap", "0"]
    return cli.evaluate([*argv, "--batch-size", "8", *options])


@pytest.fixture(scope="module")
def previous_evaluation(checkpoint_and_data):
    assert _evaluate(checkpoint_and_data, checkpoint_and_data / "eval") == 0
    return checkpoint_and_data / "eval"


# Every write site of an evaluation with a full disk; the other errors at the first write (the lock).
EVALUATION_FAULTS = [("", number) for number in sorted(FIXES)] + [
    (site, errno.ENOSPC) for site in ("predictions.csv", "reliability.png", "metrics.json", "metrics.md")
]


@pytest.mark.parametrize("site, number", EVALUATION_FAULTS)
def test_evaluate_fails_in_one_line_and_keeps_the_previous_evaluation(
    checkpoint_and_data, previous_evaluation, tmp_path, capsys, site, number
):
    out = tmp_path / "eval"
    shutil.copytree(previous_evaluation, out)
    before = _hashes(out)
    capsys.readouterr()
    with failing_writes(out, number, site) as failed:  # uncalibrated: every file it writes differs from before
        assert _evaluate(checkpoint_and_data, out, "--calibration-split", "") == 1
    assert _single_error_line(capsys) == "error: " + FIXES[number].format(path=failed[0])
    after = _hashes(out)
    assert set(after) == set(before)  # nothing torn, nothing left half-written beside
    target = next((name for name in before if site and name.endswith(site)), None)
    if target is not None:
        assert after[target] == before[target]  # the file whose write failed is the previous run's, whole
    # Every file is the previous evaluation's: none replaced by the failed one's before the disk filled up.
    assert {name: digest for name, digest in after.items() if name != MANIFEST} == {
        name: digest for name, digest in before.items() if name != MANIFEST
    }


def test_predict_into_a_read_only_out_is_one_line(checkpoint_and_data, tmp_path, capsys):
    from datasets import load_from_disk

    root = checkpoint_and_data
    image = tmp_path / "lesion.png"
    load_from_disk(str(root / "data"))["test"][0]["image"].save(image)
    out = tmp_path / "maps"
    with failing_writes(out, errno.EROFS) as failed:
        assert cli.predict(["--model", str(root / "model"), "--no-rationale", "--out", str(out), str(image)]) == 1
    assert _single_error_line(capsys) == "error: " + FIXES[errno.EROFS].format(path=failed[0])
    assert not out.exists()


@pytest.mark.parametrize(
    "site, number",
    [
        ("", errno.EROFS),
        ("", errno.ENOSPC),
        ("dataset_dict.json", errno.ENOSPC),
        (".skinclip-conversion", errno.ENOSPC),
    ],
)
def test_a_conversion_fails_in_one_line_and_keeps_the_previous_dataset(tmp_path, capsys, site, number):
    from datasets_scripts import demo

    argv = ["--output-dir", str(tmp_path / "data"), "--num-per-class", "5", "--image-size", "16"]
    assert run_entry_point(demo.main, argv) == 0
    before = _hashes(tmp_path)
    capsys.readouterr()
    with failing_writes(tmp_path, number, site) as failed:
        assert run_entry_point(demo.main, argv + ["--seed", "1"]) == 1
    assert _single_error_line(capsys) == "error: " + FIXES[number].format(path=failed[0])
    assert _hashes(tmp_path) == before  # the previous dataset, whole; no temporary folder left


@pytest.mark.slow
@pytest.mark.parametrize("site", ["", "validation_predictions.csv", "README.md"])
def test_train_fails_in_one_line_and_never_reports_success(checkpoint_and_data, tmp_path, capsys, site):
    root = checkpoint_and_data
    out = tmp_path / "out"
    argv = ["configs/demo.yaml", f"--output_dir={out}", f"--dataset_path={root / 'data'}", "--demo_dataset=false"]
    argv += [f"--tiny_bases_dir={tmp_path / 'bases'}", "--max_steps=1", "--save_strategy=no", "--eval_strategy=no"]
    argv += ["--test_split=null", "--disable_tqdm=true"]
    with failing_writes(out, errno.ENOSPC, site) as failed:
        assert cli.train(argv) == 1
    captured = capsys.readouterr()
    assert "Checkpoint:" not in captured.out  # the summary of a successful run
    assert "Traceback" not in captured.err
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert line == "error: " + FIXES[errno.ENOSPC].format(path=failed[0])


def _train_argv(root, out, bases):
    argv = ["configs/demo.yaml", f"--output_dir={out}", f"--dataset_path={root / 'data'}", "--demo_dataset=false"]
    argv += [f"--tiny_bases_dir={bases}", "--max_steps=1", "--save_strategy=no", "--eval_strategy=no"]
    return argv + ["--test_split=null", "--disable_tqdm=true"]


@pytest.fixture(scope="module")
def previous_training_run(checkpoint_and_data, tmp_path_factory):
    """A finished training run: its output_dir and the tiny bases it was built with."""
    root = checkpoint_and_data
    out, bases = tmp_path_factory.mktemp("previous-run") / "out", root / "train-bases"
    assert cli.train(_train_argv(root, out, bases)) == 0
    return out, bases


@pytest.mark.slow
@pytest.mark.parametrize("site", ["", "validation_predictions.csv", "README.md"])
def test_an_overwriting_train_run_that_fails_gives_the_previous_run_back(
    checkpoint_and_data, previous_training_run, tmp_path, capsys, site
):
    """--overwrite_output_dir replaces the previous run only once the new one has finished: a full disk on the
    way (at any write) is one line, and the folder holds the previous run's files again, byte for byte."""
    previous, bases = previous_training_run
    out = tmp_path / "out"
    shutil.copytree(previous, out, symlinks=True)
    before = _hashes(out)
    capsys.readouterr()
    argv = _train_argv(checkpoint_and_data, out, bases) + ["--overwrite_output_dir=true", "--seed=7"]
    with failing_writes(out, errno.ENOSPC, site) as failed:
        assert cli.train(argv) == 1
    captured = capsys.readouterr()
    assert "Checkpoint:" not in captured.out and "Traceback" not in captured.err
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert line == "error: " + FIXES[errno.ENOSPC].format(path=failed[0])
    after = _hashes(out)
    assert {name: after.get(name) for name in before if name != ".skinclip-manifest.json"} == {
        name: digest for name, digest in before.items() if name != ".skinclip-manifest.json"
    }
    assert set(after) == set(before)  # nothing of the failed run is left beside it
    # The manifest still lists the previous run: a later --overwrite_output_dir replaces it, as before.
    from skinclip.output_folder import owned_and_foreign

    assert owned_and_foreign(out) == owned_and_foreign(previous)


# --------------------------------------------------------------------------------------------------------
# A real full disk
# --------------------------------------------------------------------------------------------------------


def _private_tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && test -w /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="no private tmpfs (unshare -rm) on this machine")
def test_a_conversion_onto_a_full_tmpfs_is_one_line_and_leaves_nothing(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=96k tmpfs {mount} && "
        f"{sys.executable} -m datasets_scripts.demo --output-dir {mount}/data --num-per-class 40 --image-size 64; "
        f"code=$?; ls -A {mount}; exit $code"
    )
    result = _in_private_mount_namespace(script)
    line = _full_disk_line(result, mount)
    assert line.endswith("free some space or write to another disk")
    assert result.stdout.strip() == ""  # no torn dataset, no temporary folder left on the full disk


def _folder_kib(folder: Path) -> int:
    return sum(-(-path.stat().st_size // 4096) * 4 for path in folder.rglob("*") if path.is_file())  # 4 KiB pages


def _run_on_a_small_tmpfs(tmp_path: Path, previous: Path, free_kib: int, command: str) -> tuple:
    """Copies ``previous`` onto a tmpfs with ``free_kib`` KiB left, runs ``command`` (``{out}``: the copy) there;
    (the result, the copy's file hashes before, after). The manifest is left out: the command rewrites it."""
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "out"
    hashes = f"(cd {out} && find . -type f ! -name {MANIFEST} -print0 | sort -z | xargs -0 sha256sum)"
    script = (
        f"set -e; mount -t tmpfs -o size={_folder_kib(previous) + free_kib}k tmpfs {mount}; cp -a {previous} {out}; "
        f"{hashes} > {tmp_path / 'before.txt'}; set +e; {command.format(out=out)}; code=$?; "
        f"{hashes} > {tmp_path / 'after.txt'}; exit $code"
    )
    result = _in_private_mount_namespace(script)
    return result, (tmp_path / "before.txt").read_text(), (tmp_path / "after.txt").read_text()


def _in_private_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """``sh -c script`` as root of its own user and mount namespace (its tmpfs mounts are private), in the checkout."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        timeout=300,
    )


def _full_disk_line(result, out: Path) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: no space left on the device while writing ") and str(out) in line, line
    return line


@pytest.mark.skipif(not _private_tmpfs_works(), reason="no private tmpfs (unshare -rm) on this machine")
def test_an_evaluation_onto_a_full_tmpfs_is_one_line_and_keeps_the_previous_one(
    checkpoint_and_data, previous_evaluation, tmp_path
):
    root = checkpoint_and_data
    command = (
        f"{sys.executable} evaluate_skinclip.py --model {root / 'model'} --dataset {root / 'data'} --out {{out}} "
        "--bootstrap 0 --calibration-split ''"  # uncalibrated: every file differs from the previous evaluation's
    )
    # 8 KiB free: room for the new predictions.csv, not for the new reliability.png beside the old one. Written in
    # place, the folder held a mix of two evaluations; set aside, the previous one comes back whole.
    result, before, after = _run_on_a_small_tmpfs(tmp_path, previous_evaluation, 8, command)
    _full_disk_line(result, tmp_path / "small" / "out")
    assert "# Evaluation" not in result.stdout  # the report of a finished evaluation
    assert after == before and "predictions.csv" in before


@pytest.mark.slow
@pytest.mark.skipif(not _private_tmpfs_works(), reason="no private tmpfs (unshare -rm) on this machine")
def test_an_overwriting_train_run_onto_a_full_tmpfs_is_one_line_and_keeps_the_previous_run(
    checkpoint_and_data, previous_training_run, tmp_path
):
    previous, bases = previous_training_run
    argv = _train_argv(checkpoint_and_data, "{out}", bases) + ["--overwrite_output_dir=true", "--seed=7"]
    argv += ["--save_strategy=steps", "--save_steps=1"]  # a checkpoint too: the new run needs more than the old
    command = f"{sys.executable} train.py " + " ".join(argv)
    # 8 KiB free: deleting the previous run first made room for most of the new one, which then failed half-way
    # with the previous run gone. Set aside, the previous run comes back whole. Some writes are safetensors' (in
    # Rust), which no Python-level fault injection reaches.
    result, before, after = _run_on_a_small_tmpfs(tmp_path, previous, 8, command)
    _full_disk_line(result, tmp_path / "small" / "out")
    assert "Checkpoint:" not in result.stdout  # the summary of a successful run
    assert after == before and "model.safetensors" in before
