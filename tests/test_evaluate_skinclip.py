"""evaluate_skinclip.py end to end on generated data with a tiny random model."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import ClassLabel, DatasetDict

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip import classification_metrics as sm
from skinclip import evaluation, validation
from skinclip.errors import UserError
from skinclip.inference import split_logits


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
    evaluation.main(
        [
            "--model",
            str(root / "model"),
            "--dataset",
            str(root / "data"),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--save-calibration",
        ]
    )
    for name in (
        "predictions.csv",
        "metrics.json",
        "metrics.md",
        "reliability.png",
        "confusion_matrix.png",
        "subgroups.csv",
        "calibration.json",
    ):
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
    # Default evaluation stays classification only: no rationale is generated.
    assert "rationale_agreement" not in saved and not (out / "rationales.csv").exists()

    # The stored temperature is applied by from_pretrained, and predict.py prints the conformal set.
    reloaded = SkinClipVLModel.from_pretrained(root / "model", device="cpu")
    assert reloaded.calibration_temperature.item() == pytest.approx(calibration["temperature"])


def test_binary_out_of_distribution_evaluation(checkpoint_and_data):
    root, dataset = checkpoint_and_data
    malignant = {"MEL", "BCC"}
    names = dataset["test"].features["label"].names

    def to_binary(split):
        labels = [int(names[label] in malignant) for label in split["label"]]
        return (
            split.remove_columns("label")
            .add_column("label", labels)
            .cast_column("label", ClassLabel(names=["benign", "malignant"]))
        )

    binary = DatasetDict({"test": to_binary(dataset["test"])})
    binary.save_to_disk(str(root / "binary"))
    out = root / "ood"
    report = evaluation.main(
        ["--model", str(root / "model"), "--dataset", str(root / "binary"), "--out", str(out), "--bootstrap", "0"]
    )
    ood = report["ood_binary"]
    predictions = pd.read_csv(out / "predictions.csv")
    score = sm.malignant_score(predictions[names].to_numpy(), names)
    y_true = (predictions["label"] == "malignant").astype(int).to_numpy()
    assert ood["pauc_above_tpr_0.8"] == pytest.approx(sm.partial_auc_above_tpr(y_true, score))
    assert 0.0 <= ood["pauc_above_tpr_0.8"] <= 0.2
    assert ood["num_malignant"] == y_true.sum() and set(ood["per_class"]) == {"benign", "malignant"}
    assert ood["malignant_classes"] == ["MEL", "BCC"]


def test_a_subset_split_needs_its_positive_class_named_and_the_report_states_it(checkpoint_and_data, capsys):
    """MEL vs NV: which is positive was guessed ('mel' in a word list), and the score summed MEL, BCC and SCC."""
    root, dataset = checkpoint_and_data
    names = dataset["test"].features["label"].names
    kept = dataset["test"].filter(lambda row: names[row["label"]] in ("MEL", "NV"))
    subset = kept.map(lambda row: {"label": ["MEL", "NV"].index(names[row["label"]])}).cast_column(
        "label", ClassLabel(names=["MEL", "NV"])
    )
    DatasetDict({"test": subset}).save_to_disk(str(root / "subset"))
    argv = ["--model", str(root / "model"), "--dataset", str(root / "subset"), "--out", str(root / "subset-eval")]
    with pytest.raises(
        UserError, match=r"which of the split's classes \['MEL', 'NV'\] is the positive .*--positive-class"
    ):
        evaluation.main(argv + ["--bootstrap", "0"])
    assert not (root / "subset-eval").exists()
    report = evaluation.main(argv + ["--bootstrap", "0", "--positive-class", "MEL"])
    ood = report["ood_binary"]
    assert ood["positive_class"] == "MEL" and ood["positive_class_from"] == "--positive-class"
    assert ood["malignant_classes"] == ["MEL"] and ood["malignant_classes_from"] == "the split's positive class"
    predictions = pd.read_csv(root / "subset-eval" / "predictions.csv")
    y_true = (predictions["label"] == "MEL").astype(int).to_numpy()
    assert ood["num_malignant"] == y_true.sum()
    assert ood["pauc_above_tpr_0.8"] == pytest.approx(sm.partial_auc_above_tpr(y_true, predictions["MEL"].to_numpy()))
    assert "positive class 'MEL' (from --positive-class); malignant score = sum of P(MEL)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "names, option, expected",
    [
        (["benign", "malignant"], None, ("malignant", "the split's label names")),
        (["1", "0"], None, ("1", "the split's label names")),
        (["Negative", "Positive"], None, ("Positive", "the split's label names")),
        (["low", "high"], "high", ("high", "--positive-class")),
    ],
)
def test_the_positive_class_comes_from_the_labels_or_the_option(names, option, expected):
    assert validation.binary_positive_class(names, ["MEL", "NV", "BCC"], option) == expected


@pytest.mark.parametrize("names", [["low", "high"], ["malignant", "positive"], ["MEL", "NV"]])
def test_an_ambiguous_positive_class_is_refused(names):
    with pytest.raises(UserError, match="pass --positive-class NAME"):
        validation.binary_positive_class(names, ["MEL", "NV", "BCC"], None)


def test_calibrating_on_the_scored_split_is_refused(checkpoint_and_data):
    root, _ = checkpoint_and_data
    argv = ["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(root / "same")]
    with pytest.raises(UserError, match="--calibration-split 'test' is the split being scored"):
        evaluation.main(argv + ["--split", "test", "--calibration-split", "test"])


def test_missing_split_is_named(checkpoint_and_data):
    root, _ = checkpoint_and_data
    with pytest.raises(ValueError, match="no split 'holdout'"):
        evaluation.main(
            [
                "--model",
                str(root / "model"),
                "--dataset",
                str(root / "data"),
                "--split",
                "holdout",
                "--out",
                str(root / "x"),
            ]
        )


def test_report_carries_bootstrap_intervals(checkpoint_and_data):
    root, _ = checkpoint_and_data
    out = root / "eval-ci"
    report = evaluation.main(
        ["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out), "--bootstrap", "100"]
    )
    calibrated = report["calibrated"]
    for name in ("balanced_accuracy", "auroc_macro", "ece"):
        low, high = calibrated[f"{name}_ci"]
        assert low <= high
    assert calibrated["ci"]["n_resamples"] == 100
    assert "95% bootstrap CI of balanced_accuracy" in (out / "metrics.md").read_text()


# --------------------------------------------------------------------------------------------------------
# User errors and what evaluation may write
# --------------------------------------------------------------------------------------------------------


def _folder_bytes(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _saved(root, name, dataset):
    dataset.save_to_disk(str(root / name))
    return str(root / name)


def test_out_in_a_checkpoint_folder_is_refused_and_the_checkpoint_is_untouched(checkpoint_and_data):
    """Its calibration.json would have calibrated the checkpoint without --save-calibration."""
    from skinclip.errors import UserError

    root, _ = checkpoint_and_data
    before = _folder_bytes(root / "model")
    with pytest.raises(UserError, match="--out .* is a checkpoint folder"):
        evaluation.main(
            [
                "--model",
                str(root / "model"),
                "--dataset",
                str(root / "data"),
                "--out",
                str(root / "model"),
                "--bootstrap",
                "0",
            ]
        )
    assert _folder_bytes(root / "model") == before


def test_calibration_reaches_the_checkpoint_only_with_save_calibration(checkpoint_and_data, tmp_path):
    import shutil

    root, _ = checkpoint_and_data
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    (model / "calibration.json").unlink(missing_ok=True)
    evaluation.main(
        ["--model", str(model), "--dataset", str(root / "data"), "--out", str(tmp_path / "eval"), "--bootstrap", "0"]
    )
    assert (tmp_path / "eval" / "calibration.json").is_file()
    assert not (model / "calibration.json").exists()


def test_a_temperature_at_its_search_bound_is_warned_about(checkpoint_and_data):
    """A calibration split the model always gets right drives T to the lower bound: a warning, not a number
    silently stored as the calibration."""
    root, dataset = checkpoint_and_data
    model = SkinClipVLModel.from_pretrained(root / "model", device="cpu")
    model.calibration_temperature.fill_(1.0)
    processor = SkinClipVLProcessor.from_pretrained(root / "model")
    predicted = split_logits(model, processor, dataset["validation"], progress=False).argmax(1)
    always_right = (
        dataset["validation"]
        .remove_columns("label")
        .add_column("label", predicted.tolist())
        .cast_column("label", dataset["validation"].features["label"])
    )
    data = _saved(root, "always-right", DatasetDict({"test": dataset["test"], "validation": always_right}))
    with pytest.warns(UserWarning, match=r"sits at its search bound 0.05"):
        report = evaluation.main(
            ["--model", str(root / "model"), "--dataset", data, "--out", str(root / "eval-bound"), "--bootstrap", "0"]
        )
    assert report["temperature"] == pytest.approx(0.05, rel=1e-3)
    saved = json.loads((root / "eval-bound" / "metrics.json").read_text())
    assert "search bound" in saved["temperature_warning"]
    assert evaluation.temperature_bound_warning(1.3, "validation") is None


def test_an_empty_split_fails_with_one_line_before_anything_is_written(checkpoint_and_data):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    root, dataset = checkpoint_and_data
    data = _saved(
        root, "empty-test", DatasetDict({"test": dataset["test"].select([]), "validation": dataset["validation"]})
    )
    out = root / "eval-empty"
    result = subprocess.run(
        [sys.executable, "evaluate_skinclip.py", "--model", str(root / "model"), "--dataset", data, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data} split 'test' is empty"] and "Traceback" not in result.stderr
    assert not out.exists()


def test_an_empty_calibration_split_in_memory_is_refused_before_anything_is_written(checkpoint_and_data):
    from skinclip.errors import UserError

    root, dataset = checkpoint_and_data
    model = SkinClipVLModel.from_pretrained(root / "model", device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(root / "model")
    splits = DatasetDict({"test": dataset["test"], "validation": dataset["validation"].select([])})
    out = root / "eval-empty-calibration"
    with pytest.raises(UserError, match="calibration split 'validation'.*|split 'validation' is empty"):
        evaluation.evaluate(model, processor, splits, "test", out, progress=False, n_bootstrap=0)
    assert not out.exists()


def test_classes_in_another_order_than_the_model_are_refused(checkpoint_and_data):
    from skinclip.errors import UserError

    root, dataset = checkpoint_and_data
    names = dataset["test"].features["label"].names
    reordered = dataset["test"].cast_column("label", ClassLabel(names=list(reversed(names))))
    data = _saved(root, "reordered", DatasetDict({"test": reordered}))
    with pytest.raises(UserError, match=r"split 'test' lists the classes .* in another order than the model's"):
        evaluation.main(["--model", str(root / "model"), "--dataset", data, "--out", str(root / "eval-order")])
    assert not (root / "eval-order").exists()


def test_metrics_json_is_strict_json_with_null_for_undefined_metrics(checkpoint_and_data):
    """With a single class in the split, AUROC is undefined: null, never a bare NaN."""
    root, dataset = checkpoint_and_data
    one_class = dataset["test"].filter(lambda row: row["label"] == 0)
    data = _saved(root, "one-class", DatasetDict({"test": one_class}))
    evaluation.main(
        [
            "--model",
            str(root / "model"),
            "--dataset",
            data,
            "--out",
            str(root / "eval-one"),
            "--bootstrap",
            "0",
            "--calibration-split",
            "",
        ]
    )

    def reject(constant):
        raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

    saved = json.loads((root / "eval-one" / "metrics.json").read_text(), parse_constant=reject)
    assert saved["calibrated"]["auroc_macro"] is None


def test_a_corrupt_or_nonfinite_checkpoint_is_named(checkpoint_and_data, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from skinclip.errors import UserError

    root, _ = checkpoint_and_data
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    tensors = load_file(model / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, model / "model.safetensors")
    arguments = ["--model", str(model), "--dataset", str(root / "data"), "--out", str(tmp_path / "eval")]
    with pytest.raises(UserError, match=rf"model.safetensors\): trained tensor {name} holds NaN or inf"):
        evaluation.main(arguments)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"model/model.safetensors:? (is )?not a readable safetensors file"):
        evaluation.main(arguments)


def test_rationales_option_reports_agreement_with_the_top_class(checkpoint_and_data, monkeypatch):
    from datasets_scripts.isic2019 import class_report

    root, dataset = checkpoint_and_data
    names = dataset["test"].features["label"].names
    # A random decoder writes noise: each row's rationale is fixed to a real report, by row order, so the
    # counts are known: row i names names[i % 4], one row names nothing.
    texts = [class_report(names[i % len(names)]) for i in range(5)] + ["Dermoscopy typically shows a network."]
    decoded = iter([texts[:4], texts[4:]])
    monkeypatch.setattr(SkinClipVLProcessor, "decode", lambda self, ids: next(decoded))
    out = root / "eval-rationales"
    argv = ["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out)]
    options = ["--bootstrap", "0", "--rationales", "6", "--max-new-tokens", "2", "--batch-size", "4"]
    report = evaluation.main([*argv, *options])
    table = pd.read_csv(out / "rationales.csv")
    assert table["rationale"].tolist() == texts
    assert table["rationale_names"].tolist() == [names[i % 4] for i in range(5)] + ["none"]
    top = pd.read_csv(out / "predictions.csv")[names].to_numpy()[:6].argmax(1)
    assert table["top_class"].tolist() == [names[i] for i in top]
    agree = sum(named == names[i] for named, i in zip(table["rationale_names"], top))
    expected = {"rows": 6, "agree": agree, "disagree": 5 - agree, "none": 1, "ambiguous": 0, "rate": agree / 6}
    saved = json.loads((out / "metrics.json").read_text())
    counts = {**expected, "max_new_tokens": 2, "conditioning": "none"}
    assert saved["rationale_agreement_counts"] == report["rationale_agreement_counts"] == counts
    assert saved["rationale_agreement"] == report["rationale_agreement"] == agree / 6  # the rate, as train.py's
    assert "Rationale agreement with the top class (6 rows" in (out / "metrics.md").read_text()
    with pytest.raises(SystemExit) as refused:  # a usage error of argparse (validation.cli_number), exit 2
        evaluation.main([*argv, "--rationales", "-1"])
    assert refused.value.code == 2


def _overflowing_checkpoint(root, folder):
    """A copy of the checkpoint whose class head is finite but so large that its logits overflow to inf/NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "model", folder)
    tensors = load_file(folder / "model.safetensors")
    [head] = [name for name in tensors if name.startswith("classifier.") and name.endswith("weight")]
    tensors[head] = tensors[head].sign() * 3e38  # finite weights; their products with features are not
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_overflowing_logits_are_one_line_and_leave_no_torn_predictions(checkpoint_and_data, tmp_path, capsys):
    from skinclip import cli

    root, _ = checkpoint_and_data
    model = _overflowing_checkpoint(root, tmp_path / "overflowing")
    out = tmp_path / "eval"
    arguments = ["--model", str(model), "--dataset", str(root / "data"), "--bootstrap", "0", "--out", str(out)]
    capsys.readouterr()
    assert cli.evaluate(arguments) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert str(model) in line and "non-finite" in line and "'test'" in line
    assert not out.exists()  # no predictions.csv with empty probabilities, nothing else either
    # Over a previous good evaluation: its files survive as they were.
    good = ["--model", str(root / "model"), "--dataset", str(root / "data"), "--bootstrap", "0", "--out", str(out)]
    assert cli.evaluate(good) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert cli.evaluate(arguments) == 1
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after.keys() == before.keys() and all(after[name] == before[name] for name in before if name[0] != ".")


def test_an_evaluation_replaces_only_a_previous_evaluation_in_out(checkpoint_and_data, tmp_path):
    """A previous evaluation's files are replaced whole (a stale rationales.csv is gone); other files the
    project wrote into --out (predict.py's heatmaps) and a user's own files stay."""
    from skinclip.output_folder import OutputFolder

    root, _ = checkpoint_and_data
    out = tmp_path / "eval"
    with OutputFolder(out, "evaluate_skinclip.py"):
        (out / "rationales.csv").write_text("image_id,label,top_class,rationale_names,rationale\n")
    with OutputFolder(out, "predict.py"):
        (out / "ISIC_0000000_focal_attention.png").write_bytes(b"a heatmap")
    (out / "notes.txt").write_text("mine")
    evaluation.main(
        ["--model", str(root / "model"), "--dataset", str(root / "data"), "--out", str(out), "--bootstrap", "0"]
    )
    assert not (out / "rationales.csv").exists() and (out / "predictions.csv").is_file()
    assert (out / "ISIC_0000000_focal_attention.png").read_bytes() == b"a heatmap"
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".skinclip-previous-run").exists()
