"""skinclip/baselines/: timm fine-tuning, zero-shot open_clip and the OOD evaluation, on train.py's data and files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from skinclip.baselines import ood, timm_finetune, zero_shot_clip
from skinclip.baselines.zero_shot_clip import class_texts
from skinclip.labels import OOD_CLASSES


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from datasets_scripts.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("baseline-data")
    build_demo_dataset(num_per_class=12, image_size=32, seed=0, output_dir=str(root / "demo"))
    before = sorted(path.relative_to(root) for path in (root / "demo").rglob("*"))
    binary = ood.binary_dataset_from(root / "demo", root / "ood", ("MEL", "BCC", "SCC"), ("validation", "test"))
    # Nothing left in the source dataset's folder (map's cache went to a temporary folder) or beside the result.
    assert sorted(path.relative_to(root) for path in (root / "demo").rglob("*")) == before
    assert sorted(path.name for path in root.iterdir()) == ["demo", "ood"]
    assert list(binary) == ["validation", "test"] and binary["test"].features["label"].names == list(OOD_CLASSES)
    return root


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_split_files(output_dir, split, dataset_path):
    """The CSV has train.py's layout and the JSON holds the metrics recomputed from that CSV."""
    from datasets import load_from_disk

    from skinclip.classification_metrics import balanced_accuracy, expected_calibration_error, macro_auroc

    part = load_from_disk(str(dataset_path))[split]
    names = part.features["label"].names
    frame = pd.read_csv(output_dir / f"{split}_predictions.csv")
    assert list(frame.columns) == ["image_id", "label", *names]
    assert list(frame["image_id"]) == list(part["image_id"])
    assert list(frame["label"]) == [names[i] for i in part["label"]]
    probs = frame[names].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    labels = np.asarray(part["label"])
    metrics = json.loads((output_dir / f"{split}_metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy(labels, probs))
    assert metrics["auroc_macro"] == pytest.approx(macro_auroc(labels, probs))
    assert metrics["ece"] == pytest.approx(expected_calibration_error(labels, probs, n_bins=15))


def _check_ood_files(output_dir, ood_path):
    from datasets import load_from_disk
    from sklearn.metrics import roc_auc_score

    part = load_from_disk(str(ood_path))["test"]
    frame = pd.read_csv(output_dir / "ood_predictions.csv")
    assert list(frame.columns) == ["image_id", "label", "benign", "malignant"]
    truth = (np.asarray(part["label"]) == part.features["label"].names.index("malignant")).astype(int)
    assert list(frame["label"]) == [("benign", "malignant")[t] for t in truth]
    metrics = json.loads((output_dir / "ood_metrics.json").read_text())
    assert metrics["auroc_macro"] == pytest.approx(roc_auc_score(truth, frame["malignant"]))
    assert metrics["num_samples"] == len(part) and metrics["num_malignant"] == truth.sum()


def test_timm_finetune_end_to_end_writes_train_py_files(demo_data, tmp_path, one_thread):
    from safetensors.torch import load_file

    from datasets_scripts.splits import subsample_indices

    out = tmp_path / "run"
    metrics = timm_finetune.main(
        [
            "configs/baselines/resnet34_isic2019.yaml",
            f"--dataset_path={demo_data / 'demo'}",
            "--model_name=test_resnet",
            "--pretrained=false",
            "--image_size=32",
            "--num_train_epochs=2",
            "--per_device_train_batch_size=4",
            "--dataloader_num_workers=0",
            "--device=cpu",
            "--bf16=false",
            "--train_fraction=0.5",
            "--learning_rate=3e-3",
            f"--ood_dataset_path={demo_data / 'ood'}",
            f"--output_dir={out}",
        ]
    )
    for split in ("validation", "test"):
        _check_split_files(out, split, demo_data / "demo")
    _check_ood_files(out, demo_data / "ood")
    assert set(metrics) == {"validation", "test", "ood"}
    info = json.loads((out / "run_info.json").read_text())
    from datasets import load_from_disk

    train = load_from_disk(str(demo_data / "demo"))["train"]
    # The same stratified 50% subsample as train.py's train_fraction (seed 42 from the config).
    assert info["train_size"] == len(subsample_indices(train["label"], 0.5, seed=42)) < len(train)
    assert info["steps"] == 2 * int(np.ceil(info["train_size"] / 4))
    weights = load_file(str(out / "model.safetensors"))
    assert sum(t.numel() for t in weights.values() if t.is_floating_point()) >= info["trainable_parameters"] > 0


def test_timm_training_changes_the_classifier(demo_data, tmp_path, one_thread):
    """A run with a learning rate of zero predicts what the random init predicts; a real run does not."""
    outputs = {}
    for lr in (0.0, 3e-3):
        out = tmp_path / f"lr{lr}"
        timm_finetune.main(
            [
                "configs/baselines/resnet34_isic2019.yaml",
                f"--dataset_path={demo_data / 'demo'}",
                "--model_name=test_resnet",
                "--pretrained=false",
                "--image_size=32",
                "--num_train_epochs=3",
                "--dataloader_num_workers=0",
                "--device=cpu",
                "--bf16=false",
                "--augment=false",
                "--select_best=false",
                f"--learning_rate={lr}",
                "--per_device_train_batch_size=8",
                f"--output_dir={out}",
            ]
        )
        outputs[lr] = pd.read_csv(out / "test_predictions.csv")[["MEL", "NV", "BCC", "BKL"]].to_numpy()
    assert np.abs(outputs[0.0] - outputs[3e-3]).max() > 1e-3


def test_zero_shot_clip_end_to_end(demo_data, tmp_path):
    out = tmp_path / "zs"
    zero_shot_clip.main(
        [
            "configs/baselines/zero_shot_clip_isic2019.yaml",
            f"--dataset_path={demo_data / 'demo'}",
            f"--tiny_bases_dir={tmp_path / 'bases'}",
            "--device=cpu",
            f"--ood_dataset_path={demo_data / 'ood'}",
            f"--output_dir={out}",
        ]
    )
    for split in ("validation", "test"):
        _check_split_files(out, split, demo_data / "demo")
    _check_ood_files(out, demo_data / "ood")
    info = json.loads((out / "run_info.json").read_text())
    assert info["trainable_parameters"] == 0
    assert info["prompts"][0][0] == "a dermoscopic image of melanoma."


def test_openai_clip_weights_get_the_quick_gelu_they_were_trained_with(monkeypatch):
    """`ViT-B-32` + tag `openai` builds QuickGELU (the plain config builds nn.GELU; open_clip only warns)."""
    import warnings

    import open_clip
    from open_clip.transformer import QuickGELU

    # Offline: open_clip resolves the tag's checkpoint path even with load_weights=False; it is never read.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *args, **kwargs: "never-read.pt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*QuickGELU mismatch.*")
        model, _ = zero_shot_clip.create_open_clip("ViT-B-32", "openai", load_weights=False)
    activations = [module.mlp.gelu for module in model.visual.transformer.resblocks]
    activations += [module.mlp.gelu for module in model.transformer.resblocks]
    assert activations and all(isinstance(act, QuickGELU) for act in activations)

    assert zero_shot_clip.needs_quick_gelu("ViT-L-14", "openai")
    assert zero_shot_clip.needs_quick_gelu("ViT-B-32", "metaclip_400m")  # open_clip marks it quick_gelu too
    assert not zero_shot_clip.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")  # trained with GELU
    assert not zero_shot_clip.needs_quick_gelu("local-dir:/some/model", "openai")  # the saved config decides
    assert not zero_shot_clip.needs_quick_gelu("ViT-L-14", None)


def test_class_texts_fill_every_template_with_every_description():
    texts = class_texts(
        ["MEL", "NV", "XYZ"],
        {"MEL": ["melanoma", "a melanoma"], "NV": "a mole", "SCC": ["scc"]},
        ["a photo of {}.", "{}!"],
    )
    assert texts == [
        ["a photo of melanoma.", "melanoma!", "a photo of a melanoma.", "a melanoma!"],
        ["a photo of a mole.", "a mole!"],
        ["a photo of XYZ.", "XYZ!"],
    ]
    with pytest.raises(ValueError, match="placeholder"):
        class_texts(["MEL"], {}, ["no placeholder"])


def test_write_ood_outputs_sums_the_malignant_classes(tmp_path):
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.05, 0.05, 0.8, 0.1]])
    metrics = ood.write_ood_outputs(tmp_path, ["a", "b", "c"], np.array([1, 0, 1]), probs, ["MEL", "NV", "BCC", "BKL"])
    frame = pd.read_csv(tmp_path / "ood_predictions.csv")
    np.testing.assert_allclose(frame["malignant"], [0.6, 0.2, 0.85])
    assert metrics["balanced_accuracy"] == 1.0


def test_binary_dataset_and_split_checks(demo_data):
    from datasets import load_from_disk

    source = load_from_disk(str(demo_data / "demo"))["test"]
    binary = ood.load_ood_split(demo_data / "ood", "test")
    names = source.features["label"].names
    assert binary.features["label"].names == ["benign", "malignant"]
    assert list(binary["label"]) == [int(names[i] in ("MEL", "BCC")) for i in source["label"]]
    assert len(ood.load_ood_split(demo_data / "ood", "all")) == len(binary) + len(
        load_from_disk(str(demo_data / "demo"))["validation"]
    )
    with pytest.raises(ValueError, match="must have labels"):
        ood.load_ood_split(demo_data / "demo", "test")
    with pytest.raises(ValueError, match="no split"):
        ood.load_ood_split(demo_data / "ood", "train")
