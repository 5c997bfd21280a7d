"""train.py end to end on configs/demo.yaml; the output directory reloads and reproduces its predictions."""

import json
import subprocess
import sys

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
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == [] and header["license"] == "apache-2.0"  # tiny local bases, generated data
    (result,) = header["model-index"][0]["results"]
    balanced = next(m["value"] for m in result["metrics"] if m["type"] == "balanced_accuracy")
    assert result["dataset"]["split"] == "test" and balanced == round(metrics["balanced_accuracy"], 4)
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


def test_overwrite_output_dir_replaces_the_previous_run_and_keeps_other_files(demo_run, tmp_path):
    """No checkpoint of the previous run survives to mix with the new run's; a foreign file is untouched."""
    from skinclip import training

    root, _ = demo_run
    out = tmp_path / "out"
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / "trainer_state.json").write_text('{"global_step": 99}')
    (out / "model.safetensors").write_bytes(b"previous weights")
    (out / "validation_metrics.json").write_text('{"balanced_accuracy": 0.123456}')
    (out / "notes.txt").write_text("my notes")
    training.main(
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
            "--overwrite_output_dir",
        ]
    )
    checkpoints = sorted(path.name for path in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoints != ["checkpoint-99"], checkpoints
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "model.safetensors").read_bytes() != b"previous weights"
    assert json.loads((out / "validation_metrics.json").read_text())["balanced_accuracy"] != 0.123456


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
