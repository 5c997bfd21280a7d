"""A run killed with SIGKILL resumes from its last complete checkpoint and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT


def _command(root, output_dir, *extra):
    return [
        sys.executable,
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={output_dir}",
        f"--dataset_path={root / 'data'}",
        f"--tiny_bases_dir={root / 'bases'}",
        "--num_train_epochs=5",
        "--save_strategy=steps",
        "--save_steps=3",
        "--save_total_limit=3",
        "--eval_strategy=no",
        "--augment=true",
        "--disable_tqdm=true",
        "--test_split=null",
        *extra,
    ]


def _final_step(output_dir):
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["global_step"]


@pytest.mark.slow  # runs train.py three times
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    result = subprocess.run(
        _command(tmp_path, uninterrupted), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(tmp_path, killed), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-3" / "checkpoint_complete.json").is_file():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()  # it did not get to the end

    # A checkpoint torn by a kill mid-save: newest by number, but without its completion marker.
    torn = killed / "checkpoint-999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    resumed = subprocess.run(
        _command(tmp_path, killed, "--resume_from_checkpoint=true"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-999" not in resumed.stderr.split("Loading model from")[-1][:300]

    assert _final_step(killed.parent / "killed") == _final_step(uninterrupted)
    expected, actual = load_file(uninterrupted / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_an_incomplete_checkpoint_is_refused(tmp_path, make_config):
    from trainer_cfa import CFATrainer, CFATrainingArguments, latest_complete_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "checkpoint_complete.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    trainer = CFATrainer.__new__(CFATrainer)
    trainer.args = CFATrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(
        ValueError, match=r"checkpoint-4 is not a complete checkpoint.*newest complete one is .*checkpoint-2"
    ):
        trainer.train(str(tmp_path / "checkpoint-4"))


def test_old_checkpoints_are_rotated_out_only_once_the_new_one_is_complete(tmp_path, colour_trainer, monkeypatch):
    import shutil

    from trainer_cfa import latest_complete_checkpoint

    trainer, _ = colour_trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    deleted, original_rmtree = [], shutil.rmtree

    def checked_rmtree(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith("checkpoint-"):
            # A kill right now must still leave a complete checkpoint other than the one going away.
            newest = latest_complete_checkpoint(tmp_path)
            assert newest is not None and os.path.basename(newest) != os.path.basename(str(path)), (path, newest)
            deleted.append(os.path.basename(str(path)))
        return original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", checked_rmtree)
    trainer.train()
    assert deleted == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    assert trainer.args.save_total_limit == 1  # restored after each save


def test_a_stale_marker_does_not_vouch_for_a_checkpoint_being_rewritten(tmp_path, colour_trainer):
    from trainer_cfa import CHECKPOINT_COMPLETE_MARKER, latest_complete_checkpoint

    # An earlier run in the same output_dir left a complete checkpoint-2.
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / CHECKPOINT_COMPLETE_MARKER).write_text('{"global_step": 2}')
    trainer, _ = colour_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)

    def killed_mid_save(*args, **kwargs):  # the model is written, the optimizer state is not
        raise KeyboardInterrupt("killed")

    trainer._save_optimizer_and_scheduler = killed_mid_save
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()  # the new run did start writing it
    assert latest_complete_checkpoint(tmp_path) is None
