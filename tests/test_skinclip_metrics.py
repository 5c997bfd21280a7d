"""Metrics against their references: isic-challenge-scoring, torchmetrics, scikit-learn, hand computations."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import skinclip_metrics as sm

ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def _random_predictions(n=400, classes=8, seed=0, sharpness=2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += sharpness  # informative but imperfect
    return labels, sm.apply_temperature(logits), logits


def test_balanced_accuracy_and_auroc_agree_with_isic_challenge_scoring():
    metrics = pytest.importorskip("isic_challenge_scoring.metrics")
    labels, probs, _ = _random_predictions()
    truth = pd.DataFrame(np.eye(8)[labels], columns=ISIC_CLASSES)
    prediction = pd.DataFrame(probs, columns=ISIC_CLASSES)
    weights = pd.Series(np.ones(len(labels)))
    official_bacc = metrics.balanced_multiclass_accuracy(truth, prediction, weights)
    assert sm.balanced_accuracy(labels, probs) == pytest.approx(official_bacc, abs=1e-12)
    official_aucs = [metrics.auc(truth[c], prediction[c], weights) for c in ISIC_CLASSES]
    assert sm.per_class_auroc(labels, probs) == pytest.approx(official_aucs, abs=1e-12)
    assert sm.macro_auroc(labels, probs) == pytest.approx(np.mean(official_aucs), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_agrees_with_torchmetrics(seed):
    from torchmetrics.classification import MulticlassCalibrationError

    labels, probs, _ = _random_predictions(n=1000, classes=5, seed=seed)
    # Edge confidences: exactly 1.0, exactly on bin edges, and ties.
    probs[:5] = np.eye(5)[labels[:5]]
    probs[5] = [0.2, 0.2, 0.2, 0.2, 0.2]
    probs[6] = [0.6, 0.1, 0.1, 0.1, 0.1]
    reference = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")(
        torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)
    ).item()
    assert sm.expected_calibration_error(labels, probs, n_bins=15) == pytest.approx(reference, abs=1e-6)


def test_brier_and_nll_by_hand():
    labels = np.array([0, 1])
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert sm.brier_score(labels, probs) == pytest.approx(((0.2**2 + 0.2**2) + (0.4**2 + 0.4**2)) / 2)
    assert sm.negative_log_likelihood(labels, probs) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_absent_class_warns_and_gives_defined_result():
    labels, probs, _ = _random_predictions(n=300, classes=4)
    keep = labels != 2
    with pytest.warns(UserWarning, match=r"\[2\]"):
        bacc = sm.balanced_accuracy(labels[keep], probs[keep])
    with pytest.warns(UserWarning, match=r"\[2\]"):
        auroc = sm.macro_auroc(labels[keep], probs[keep])
    assert 0 <= bacc <= 1 and 0 <= auroc <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sm.classification_metrics(labels[keep], probs[keep], ["A", "B", "C", "D"])
    assert math.isnan(report["per_class"]["C"]["auroc"]) and report["per_class"]["C"]["support"] == 0
    expected = np.mean([r for r in sm.per_class_auroc(labels[keep], probs[keep]) if not math.isnan(r)])
    assert report["auroc_macro"] == pytest.approx(expected)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    labels, _, logits = _random_predictions(n=4000, classes=5, seed=3, sharpness=1.5)
    overconfident = logits * 5
    validation, test = slice(0, 2000), slice(2000, None)
    temperature = sm.fit_temperature(overconfident[validation], labels[validation])
    assert 3.0 < temperature < 7.0  # recovers roughly the factor of 5
    before = sm.expected_calibration_error(labels[test], sm.apply_temperature(overconfident[test]))
    after = sm.expected_calibration_error(labels[test], sm.apply_temperature(overconfident[test], temperature))
    assert after < before / 3


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_conformal_sets_reach_target_coverage(method):
    # Exchangeable data: calibration and test drawn from one distribution. Tolerance 0.02 on 5,000 points
    # (the binomial standard error at 90% is 0.004).
    labels, probs, _ = _random_predictions(n=7000, classes=6, seed=4, sharpness=1.0)
    predictor = sm.SplitConformal(method=method, coverage=0.9).fit(probs[:2000], labels[:2000])
    sets = predictor.predict_sets(probs[2000:])
    report = sm.conformal_report(sets, labels[2000:])
    assert report["coverage"] >= 0.9 - 0.02
    assert all(len(s) >= 1 for s in sets)
    # A more accurate model needs smaller sets for the same coverage.
    sharp_labels, sharp_probs, _ = _random_predictions(n=7000, classes=6, seed=4, sharpness=3.0)
    sharp = sm.SplitConformal(method=method, coverage=0.9).fit(sharp_probs[:2000], sharp_labels[:2000])
    sharp_report = sm.conformal_report(sharp.predict_sets(sharp_probs[2000:]), sharp_labels[2000:])
    assert sharp_report["mean_set_size"] < report["mean_set_size"]


def test_prediction_set_text():
    assert sm.format_prediction_set([0, 1], ["MEL", "NV", "BCC"], 0.9) == "MEL or NV (90% coverage)"


def test_partial_auc_hand_example_and_perfect_scorer():
    assert sm.partial_auc_above_tpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.2)
    assert sm.partial_auc_above_tpr([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    # Positives at 0.9 and 0.3, negatives at 0.5 and 0.1: TPR is 0.5 until half the negatives are passed,
    # so the region above 80% TPR only starts at FPR 0.5: area = (1 - 0.5) * (1 - 0.8) = 0.1.
    assert sm.partial_auc_above_tpr([1, 0, 1, 0], [0.9, 0.5, 0.3, 0.1]) == pytest.approx(0.1)


def test_isic2019_submission_frame():
    names = ["NV", "MEL", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    probs = np.eye(8)[[0, 1]]
    frame = sm.isic2019_submission_frame(["ISIC_1", "ISIC_2"], probs, names)
    assert list(frame.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert list(frame["image"]) == ["ISIC_1", "ISIC_2"]
    assert frame.loc[0, "NV"] == 1.0 and frame.loc[1, "MEL"] == 1.0 and (frame["UNK"] == 0).all()
    with pytest.raises(ValueError, match=r"no class\(es\) \['SCC'\]"):
        sm.isic2019_submission_frame(["a"], np.ones((1, 7)) / 7, names[:7])


def test_malignant_score_sums_malignant_classes():
    probs = np.array([[0.1, 0.5, 0.2, 0.2]])
    assert sm.malignant_score(probs, ["MEL", "NV", "BCC", "AK"])[0] == pytest.approx(0.3)


def test_subgroup_table_counts_and_gap():
    labels, probs, _ = _random_predictions(n=200, classes=3, seed=5)
    sex = np.array(["male", "female", None, "unknown"] * 50, dtype=object)
    ages = [sm.age_band(a) for a in np.tile([25, 55, np.nan, 71], 50)]
    table = sm.subgroup_table(labels, probs, {"sex": sex, "age_band": ages}, ["A", "B", "C"])
    counts = dict(zip(zip(table["attribute"], table["group"]), table["n"]))
    assert counts[("sex", "male")] == 50 and counts[("sex", "unknown")] == 100
    assert counts[("age_band", "20-39")] == 50 and counts[("age_band", "unknown")] == 50
    gaps = sm.largest_gap(table, "balanced_accuracy")
    assert set(gaps) == {"sex", "age_band"} and gaps["sex"]["gap"] >= 0


def test_plots_are_written(tmp_path):
    labels, probs, _ = _random_predictions(n=100, classes=3)
    sm.plot_reliability_diagram(labels, probs, tmp_path / "r.png")
    sm.plot_confusion_matrix(labels, probs, ["A", "B", "C"], tmp_path / "c.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000


def test_bootstrap_interval_contains_point_estimate():
    labels, probs, _ = _random_predictions(n=300)
    low, high = sm.bootstrap_ci(labels, probs, sm.balanced_accuracy, n_resamples=200)
    assert low < sm.balanced_accuracy(labels, probs) < high
