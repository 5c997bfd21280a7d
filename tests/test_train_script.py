"""train.py end to end on configs/demo.yaml; the output directory reloads and reproduces its predictions."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # every test here runs train.py in a subprocess


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-run")
    command = [
        sys.executable,
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={root / 'out'}",
        f"--dataset_path={root / 'data'}",
        f"--tiny_bases_dir={root / 'bases'}",
        "--num_train_epochs=3",
        "--save_strategy=no",
        "--disable_tqdm=true",
        "--final_rationale_rows=3",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result


def test_demo_writes_checkpoint_metrics_and_card(demo_run):
    root, result = demo_run
    out = root / "out"
    for name in (
        "config.json",
        "model.safetensors",
        "lora/adapter_config.json",
        "modeling_skinclip.py",
        "configuration_skinclip.py",
        "tokenizer/tokenizer_config.json",
        "image_processor/preprocessor_config.json",
        "README.md",
        "test_metrics.json",
        "validation_metrics.json",
        "test_predictions.csv",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"balanced_accuracy", "auroc_macro", "ece", "loss"} <= set(metrics)
    # final_rationale_rows: the first 3 test rows' rationales, read against the class head's top class.
    counts = metrics["rationale_agreement_counts"]
    assert counts["rows"] == 3 and metrics["rationale_agreement"] == counts["agree"] / 3
    assert len(pd.read_csv(out / "rationales.csv")) == 3
    # The folder shared on the Hub holds no pickle: the run's arguments are JSON (Trainer's training_args.bin
    # is replaced), weights are safetensors.
    assert json.loads((out / "training_args.json").read_text())["num_train_epochs"] == 3
    assert not [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    card = (out / "README.md").read_text()
    assert "SkinCLIP-VL checkpoint" in card and "MEL" in card
    # configs/demo.yaml sets include_bases: the tiny bases are inside, and nothing names a path of this machine.
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_config"]["model_name_or_path"] == "bases/decoder" and (out / "bases" / "vision").is_dir()
    assert str(root) not in card and str(root) not in (out / "config.json").read_text()
    arguments = json.loads((out / "training_args.json").read_text())
    assert str(root) not in json.dumps(arguments) and arguments["output_dir"] == out.name
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == [] and header["license"] == "apache-2.0"  # tiny local bases, generated data
    (indexed,) = header["model-index"][0]["results"]
    balanced = next(m["value"] for m in indexed["metrics"] if m["type"] == "balanced_accuracy")
    assert indexed["dataset"]["split"] == "test" and balanced == round(metrics["balanced_accuracy"], 4)
    for term in ("loss_focal", "loss_align", "loss_cal", "loss_gen"):
        assert term in result.stdout + result.stderr
    # The run ends with where the checkpoint is, the test metrics, and the command to run next.
    summary = result.stdout[result.stdout.index("Checkpoint: ") :]
    assert f"Checkpoint: {out}" in summary
    assert f"balanced_accuracy {metrics['balanced_accuracy']:.4f}" in summary and "test_metrics.json" in summary
    assert f"Next: python predict.py --model {out} <image>" in summary


def _folder_bytes(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_new_run_into_a_finished_run_is_refused_and_changes_nothing(demo_run):
    """The same command again used to overwrite the model, metrics and card and rotate checkpoints away."""
    root, _ = demo_run
    before = _folder_bytes(root / "out")
    command = [
        sys.executable,
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={root / 'out'}",
        f"--dataset_path={root / 'data'}",
        f"--tiny_bases_dir={root / 'bases'}",
        "--num_train_epochs=1",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert _error_lines(result.stderr) == [
        f"error: output_dir {root / 'out'} already holds a finished run; choose another output_dir, or pass "
        "--overwrite_output_dir=true to replace the run's outputs (other files are kept)"
    ]
    assert "Traceback" not in result.stderr
    assert _folder_bytes(root / "out") == before


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [
        sys.executable,
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={tmp_path / 'out'}",
        f"--dataset_path={tmp_path / 'data'}",
        f"--tiny_bases_dir={tmp_path / 'bases'}",
        "--lambda_cal=-5",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == ["error: lambda_cal must be >= 0, got -5"]
    assert not any(tmp_path.iterdir())  # refused before data, bases or outputs were made
    debug = subprocess.run(command + ["--debug"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert (
        debug.returncode != 0 and "Traceback" in debug.stderr and "UserError: lambda_cal must be >= 0" in debug.stderr
    )


def _hashes(root, leave_out=()):
    """sha256 of every file under ``root`` (symlinks not followed), but those in ``leave_out``."""
    found = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path not in leave_out and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _train_into(out, root, *overrides):
    from skinclip import cli

    return cli.train(
        [
            "configs/demo.yaml",
            f"--output_dir={out}",
            f"--dataset_path={root / 'data'}",
            f"--tiny_bases_dir={root / 'bases'}",
            "--num_train_epochs=1",
            "--save_strategy=epoch",
            "--eval_strategy=no",
            "--test_split=null",
            "--disable_tqdm=true",
            *overrides,
        ]
    )


def test_overwrite_output_dir_deletes_exactly_the_previous_runs_files(demo_run, tmp_path, capsys):
    """No file of the previous run survives to mix with the new run's; every file it did not write is untouched
    (a user's runs/other_experiment/ used to be deleted with runs/, by its name)."""
    from skinclip.output_folder import MANIFEST_NAME, read_manifest

    root, _ = demo_run
    out = tmp_path / "out"
    assert _train_into(out, root) == 0
    first = read_manifest(out)
    assert "model.safetensors" in first and any(name.startswith("checkpoint-") for name in first)
    (out / "notes.txt").write_text("my notes")
    (out / "runs" / "other_experiment").mkdir(parents=True)
    (out / "runs" / "other_experiment" / "events.out").write_bytes(b"someone else's run")
    before = _hashes(tmp_path, leave_out={out / name for name in first} | {out / MANIFEST_NAME})
    assert _train_into(out, root, "--overwrite_output_dir", "--seed=1") == 0
    second = read_manifest(out)
    assert _hashes(tmp_path, leave_out={out / name for name in second} | {out / MANIFEST_NAME}) == before
    assert set(second) == set(first)  # same files, rewritten by the new run; nothing of the first run left over
    # Every output was rewritten, except the bases copied into the checkpoint (include_bases): hard links to the
    # same unchanged files where the disk allows.
    assert all(second[name] != first[name] for name in first if not name.startswith("bases/"))
    assert (out / "notes.txt").read_text() == "my notes"


def _hold_lock(folder):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom skinclip.output_folder import OutputFolder\n"
            "with OutputFolder(sys.argv[1], 'train.py'):\n    print('held', flush=True); sys.stdin.readline()",
            str(folder),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_being_written_is_refused_naming_the_first(demo_run, tmp_path):
    """Two train.py runs into one output_dir both exited 0, the second replacing the first's model and card."""
    root, _ = demo_run
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = _hashes(tmp_path)
        command = [sys.executable, "train.py", "configs/demo.yaml", f"--output_dir={out}"]
        command += [f"--dataset_path={root / 'data'}", f"--tiny_bases_dir={root / 'bases'}", "--num_train_epochs=1"]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        after = _hashes(tmp_path)
    finally:
        holder.communicate("\n", timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = _error_lines(result.stderr)
    assert line.startswith(f"error: output folder {out} is in use by pid {holder.pid} on ")
    assert "(train.py, started" in line
    assert after == before


@pytest.mark.parametrize("link", ["checkpoint-5", "tokenizer", "runs"])
def test_a_symlink_in_output_dir_is_refused_and_nothing_outside_changes(demo_run, tmp_path, link):
    """--overwrite_output_dir wrote the new run's checkpoint (or tokenizer) through a symlink to another folder."""
    root, _ = demo_run
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "trainer_state.json").write_text("precious")
    (elsewhere / "tokenizer.json").write_text("precious")
    out.mkdir()
    (out / link).symlink_to(elsewhere)
    before = _hashes(tmp_path)
    command = [sys.executable, "train.py", "configs/demo.yaml", f"--output_dir={out}", "--overwrite_output_dir"]
    command += [f"--dataset_path={root / 'data'}", f"--tiny_bases_dir={root / 'bases'}", "--num_train_epochs=1"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == [
        f"error: {out} holds symlinks that this command would write through, to files outside the folder: "
        f"{link} -> {elsewhere}; remove them or choose another folder"
    ]
    assert _hashes(tmp_path) == before


def test_demo_output_reloads_and_reproduces_test_predictions(demo_run):
    from datasets import load_from_disk
    from transformers import AutoModel

    from modeling_skinclip import SkinClipVLProcessor

    root, _ = demo_run
    out = root / "out"
    model = AutoModel.from_pretrained(out, trust_remote_code=True, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(out)
    test = load_from_disk(str(root / "data"))["test"]
    saved = pd.read_csv(out / "test_predictions.csv")
    assert list(saved["image_id"]) == list(test["image_id"])
    names = model.config.class_names
    with torch.no_grad():
        probs = model.predict(**processor(test["image"], test["metadata_text"])).probs.numpy()
    np.testing.assert_allclose(probs, saved[names].to_numpy(), atol=1e-5)


def test_cached_clip_features_train_and_match_the_image_path(tmp_path):
    """`cache_vision_features: true` trains from fp16 CLIP tokens; its predictions match running the tower."""
    from datasets import load_from_disk

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    out = tmp_path / "out"
    command = [
        sys.executable,
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={out}",
        f"--dataset_path={tmp_path / 'data'}",
        f"--tiny_bases_dir={tmp_path / 'bases'}",
        "--num_train_epochs=2",
        "--save_strategy=no",
        "--augment=false",
        "--cache_vision_features=true",
        "--disable_tqdm=true",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The features are stored beside the dataset, once: datasets' map cache is not left inside the dataset's folder.
    assert not list((tmp_path / "data").rglob("cache-*.arrow")), list((tmp_path / "data").rglob("cache-*.arrow"))
    stores = (tmp_path / "data-vision-features").glob("*/*")
    assert sorted(path.name.split("-")[0] for path in stores) == ["test", "train", "validation"]
    model = SkinClipVLModel.from_pretrained(out, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(out)
    test = load_from_disk(str(tmp_path / "data"))["test"]
    names = model.config.class_names
    saved = pd.read_csv(out / "test_predictions.csv")[names].to_numpy()
    with torch.no_grad():
        from_images = model.predict(**processor(test["image"], test["metadata_text"])).probs.numpy()
    np.testing.assert_allclose(from_images, saved, atol=2e-3)  # fp16 cache vs fp32 tower

    refused = subprocess.run(
        command[:-3] + ["--augment=true", "--cache_vision_features=true"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode != 0 and "cache_vision_features needs augment: false" in refused.stderr
