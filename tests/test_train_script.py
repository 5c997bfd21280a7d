"""train.py end to end on configs/demo.yaml; the output directory reloads and reproduces its predictions."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-run")
    command = [
        sys.executable, "train.py", "configs/demo.yaml",
        f"--output_dir={root / 'out'}", f"--dataset_path={root / 'data'}", f"--tiny_bases_dir={root / 'bases'}",
        "--num_train_epochs=3", "--save_strategy=no", "--disable_tqdm=true",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result


def test_demo_writes_checkpoint_metrics_and_card(demo_run):
    root, result = demo_run
    out = root / "out"
    for name in ("config.json", "model.safetensors", "lora/adapter_config.json", "modeling_skinclip.py",
                 "configuration_skinclip.py", "tokenizer/tokenizer_config.json",
                 "image_processor/preprocessor_config.json", "README.md", "test_metrics.json",
                 "validation_metrics.json", "test_predictions.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"balanced_accuracy", "auroc_macro", "ece", "loss"} <= set(metrics)
    card = (out / "README.md").read_text()
    assert "SkinCLIP-VL checkpoint" in card and "MEL" in card
    for term in ("loss_focal", "loss_align", "loss_cal", "loss_gen"):
        assert term in result.stdout + result.stderr


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
    command = [sys.executable, "train.py", "configs/demo.yaml", f"--output_dir={out}",
               f"--dataset_path={tmp_path / 'data'}", f"--tiny_bases_dir={tmp_path / 'bases'}", "--num_train_epochs=2",
               "--save_strategy=no", "--augment=false", "--cache_vision_features=true", "--disable_tqdm=true"]
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

    refused = subprocess.run(command[:-3] + ["--augment=true", "--cache_vision_features=true"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "cache_vision_features needs augment: false" in refused.stderr
