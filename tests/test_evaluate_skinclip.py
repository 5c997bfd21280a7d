"""evaluate_skinclip.py end to end on generated data with a tiny random model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import ClassLabel, DatasetDict

import evaluate_skinclip
import skinclip_metrics as sm
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory, make_config):
    from datasets_scripts.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("evaluate")
    dataset = build_demo_dataset(num_per_class=16, image_size=32, seed=0)
    dataset.save_to_disk(str(root / "data"))
    config = make_config(class_names=tuple(dataset["train"].features["label"].names))
    model = SkinClipVLModel(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    model.save_pretrained(root / "model")
    SkinClipVLProcessor.from_pretrained(None, config=config).save_pretrained(root / "model")
    return root, dataset


def test_evaluation_writes_every_report(checkpoint_and_data, capsys):
    root, dataset = checkpoint_and_data
    out = root / "eval"
    evaluate_skinclip.main(["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out),
                                     "--bootstrap", "50", "--save-calibration"])
    for name in ("predictions.csv", "metrics.json", "metrics.md", "reliability.png", "confusion_matrix.png",
                 "subgroups.csv", "calibration.json"):
        assert (out / name).is_file(), name
    predictions = pd.read_csv(out / "predictions.csv")
    names = dataset["test"].features["label"].names
    labels = np.array([names.index(x) for x in predictions["label"]])
    probs = predictions[names].to_numpy()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["calibrated"]["balanced_accuracy"] == pytest.approx(sm.balanced_accuracy(labels, probs))
    assert saved["calibrated"]["ece"] == pytest.approx(sm.expected_calibration_error(labels, probs), abs=1e-6)
    raw = predictions[[f"{n}_uncalibrated" for n in names]].to_numpy()
    assert saved["uncalibrated"]["nll"] == pytest.approx(sm.negative_log_likelihood(labels, raw))
    calibration = json.loads((root / "model" / "calibration.json").read_text())
    assert calibration["temperature"] == pytest.approx(saved["temperature"]) and calibration["temperature"] > 0
    assert {"coverage", "mean_set_size"} <= set(saved["conformal"])
    subgroups = pd.read_csv(out / "subgroups.csv")
    assert {"sex", "age_band", "site"} <= set(subgroups["attribute"])
    assert subgroups.groupby("attribute")["n"].sum().eq(len(labels)).all()
    assert "Temperature scaling" in capsys.readouterr().out

    # The stored temperature is applied by from_pretrained, and predict.py prints the conformal set.
    reloaded = SkinClipVLModel.from_pretrained(root / "model", device="cpu")
    assert reloaded.calibration_temperature.item() == pytest.approx(calibration["temperature"])


def test_binary_out_of_distribution_evaluation(checkpoint_and_data):
    root, dataset = checkpoint_and_data
    malignant = {"MEL", "BCC"}
    names = dataset["test"].features["label"].names

    def to_binary(split):
        labels = [int(names[label] in malignant) for label in split["label"]]
        return split.remove_columns("label").add_column("label", labels).cast_column(
            "label", ClassLabel(names=["benign", "malignant"]))

    binary = DatasetDict({"test": to_binary(dataset["test"])})
    binary.save_to_disk(str(root / "binary"))
    out = root / "ood"
    report = evaluate_skinclip.main(["--model", str(root / "model"), "--dataset", str(root / "binary"),
                                     "--out", str(out), "--bootstrap", "0"])
    ood = report["ood_binary"]
    predictions = pd.read_csv(out / "predictions.csv")
    score = sm.malignant_score(predictions[names].to_numpy(), names)
    y_true = (predictions["label"] == "malignant").astype(int).to_numpy()
    assert ood["partial_auc_above_80_tpr"] == pytest.approx(sm.partial_auc_above_tpr(y_true, score))
    assert 0.0 <= ood["partial_auc_above_80_tpr"] <= 0.2
    assert ood["malignant_classes"] == ["MEL", "BCC"]


def test_missing_split_is_named(checkpoint_and_data):
    root, _ = checkpoint_and_data
    with pytest.raises(ValueError, match="no split 'holdout'"):
        evaluate_skinclip.main(["--model", str(root / "model"), "--dataset", str(root / "data"), "--split", "holdout",
                                "--out", str(root / "x")])


def test_report_carries_bootstrap_intervals(checkpoint_and_data):
    root, _ = checkpoint_and_data
    out = root / "eval-ci"
    report = evaluate_skinclip.main(["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out),
                                     "--bootstrap", "100"])
    calibrated = report["calibrated"]
    for name in ("balanced_accuracy", "auroc_macro", "ece"):
        low, high = calibrated[f"{name}_ci"]
        assert low <= high
    assert calibrated["ci"]["n_resamples"] == 100
    assert "95% bootstrap CI of balanced_accuracy" in (out / "metrics.md").read_text()
