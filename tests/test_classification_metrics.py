"""Metrics against their references: isic-challenge-scoring, torchmetrics, scikit-learn, hand computations."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from skinclip import classification_metrics as sm
from skinclip.labels import ISIC2019_CLASSES as ISIC_CLASSES


def _random_predictions(n=400, classes=8, seed=0, sharpness=2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += sharpness  # informative but imperfect
    return labels, sm.apply_temperature(logits), logits


# ---------------------------------------------------------------------------------------------------------
# Discrimination: the official ISIC scorer as reference
# ---------------------------------------------------------------------------------------------------------


def test_balanced_accuracy_and_auroc_agree_with_isic_challenge_scoring():
    metrics = pytest.importorskip("isic_challenge_scoring.metrics")
    labels, probs, _ = _random_predictions()
    assert set(labels.tolist()) == set(range(8))
    truth = pd.DataFrame(np.eye(8)[labels], columns=ISIC_CLASSES)
    prediction = pd.DataFrame(probs, columns=ISIC_CLASSES)
    weights = pd.Series(np.ones(len(labels)))
    official_bacc = metrics.balanced_multiclass_accuracy(truth, prediction, weights)
    assert sm.balanced_accuracy(labels, probs) == pytest.approx(official_bacc, abs=1e-12)
    official_aucs = [metrics.auc(truth[c], prediction[c], weights) for c in ISIC_CLASSES]
    assert sm.per_class_auroc(labels, probs) == pytest.approx(official_aucs, abs=1e-12)
    assert sm.macro_auroc(labels, probs) == pytest.approx(np.mean(official_aucs), abs=1e-12)


def test_submission_frame_scored_by_the_official_classification_score():
    # The official aggregation path (ClassificationScore) on our submission table. Its file loader uses
    # DataFrame.applymap, gone in pandas 3, so the frames are passed directly. A 9-class model with UNK
    # samples in the truth: the official scorer averages over every truth column, UNK included, and fails
    # if a column has no positive.
    classification = pytest.importorskip("isic_challenge_scoring.classification")
    columns = list(sm.ISIC2019_SUBMISSION_COLUMNS)
    model_order = ["NV", "MEL", "BKL", "BCC", "UNK", "AK", "SCC", "VASC", "DF"]  # not the CSV order
    labels, probs, _ = _random_predictions(n=500, classes=9, seed=7)
    images = [f"ISIC_{i:07d}" for i in range(len(labels))]
    submission = sm.isic2019_submission_frame(images, probs, model_order).set_index("image")
    truth_names = np.array(model_order)[labels]
    truth = pd.DataFrame({c: (truth_names == c).astype(float) for c in columns}, index=images)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=images)
    score = classification.ClassificationScore(
        truth, submission, weights, classification.ClassificationMetric.BALANCED_ACCURACY
    )
    assert sm.balanced_accuracy(labels, probs) == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-12)
    assert sm.macro_auroc(labels, probs) == pytest.approx(score.macro_average["auc"], abs=1e-12)


def test_absent_class_warns_and_gives_defined_result():
    labels, probs, _ = _random_predictions(n=300, classes=4)
    keep = labels != 2
    with pytest.warns(UserWarning, match=r"\[2\]"):
        bacc = sm.balanced_accuracy(labels[keep], probs[keep])
    with pytest.warns(UserWarning, match=r"\[2\]"):
        auroc = sm.macro_auroc(labels[keep], probs[keep])
    assert 0 <= bacc <= 1 and 0 <= auroc <= 1
    recalls = sm.per_class_recall(labels[keep], probs[keep])
    assert math.isnan(recalls[2]) and bacc == pytest.approx(np.nanmean(recalls))
    with pytest.warns(UserWarning, match=r"\['C'\]") as caught:
        report = sm.classification_metrics(labels[keep], probs[keep], ["A", "B", "C", "D"])
    assert len(caught) == 1  # said once, by name
    assert math.isnan(report["per_class"]["C"]["auroc"]) and report["per_class"]["C"]["support"] == 0
    expected = np.mean([r for r in sm.per_class_auroc(labels[keep], probs[keep]) if not math.isnan(r)])
    assert report["auroc_macro"] == pytest.approx(expected)
    # One class left: AUROC is undefined, not an error.
    with pytest.warns(UserWarning):
        assert math.isnan(sm.macro_auroc(np.zeros(5, int), probs[:5]))


def test_classification_metrics_keys():
    labels, probs, _ = _random_predictions(n=100, classes=3)
    report = sm.classification_metrics(labels, probs, ["A", "B", "C"])
    assert set(report) == {
        "balanced_accuracy",
        "auroc_macro",
        "ece",
        "brier",
        "nll",
        "accuracy",
        "num_samples",
        "per_class",
    }
    assert report["num_samples"] == 100 and sum(c["support"] for c in report["per_class"].values()) == 100
    assert report["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    with pytest.raises(ValueError, match="2 class names for 3"):
        sm.classification_metrics(labels, probs, ["A", "B"])


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


def _torchmetrics_ece(labels, probs, n_bins):
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return metric(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_agrees_with_torchmetrics_on_random_data(seed):
    labels, probs, _ = _random_predictions(n=1000, classes=5, seed=seed)
    # Edge confidences: exactly 1.0, exactly on bin edges, and ties.
    probs[:5] = np.eye(5)[labels[:5]]
    probs[5] = [0.2, 0.2, 0.2, 0.2, 0.2]
    probs[6] = [0.6, 0.1, 0.1, 0.1, 0.1]
    reference = _torchmetrics_ece(labels, probs, 15)
    assert sm.expected_calibration_error(labels, probs, n_bins=15) == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("n_bins", [15, 10, 7])
def test_ece_agrees_with_torchmetrics_on_bin_edges(n_bins):
    # Confidences exactly on torch's float32 edges, among neighbours just above and below, and the vote
    # fractions of a 3- or 5-NN classifier. np.linspace edges put some of these in the next bin (an ulp
    # apart from torch.linspace) and missed torchmetrics by ~2e-3.
    rng = np.random.default_rng(n_bins)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()
    votes = np.array([1 / 3, 2 / 3, 0.4, 0.6, 0.8, 1.0], dtype=np.float32)
    confidences = np.concatenate(
        [np.repeat(edges[edges >= 0.25], 20), np.repeat(votes, 20), rng.uniform(0.25, 1, 1000)]
    ).astype(np.float32)
    classes = 4
    probs = np.empty((len(confidences), classes), np.float32)
    probs[:, 0] = confidences
    probs[:, 1:] = ((1 - confidences) / (classes - 1))[:, None]
    labels = rng.integers(0, 2, len(confidences))
    assert sm.expected_calibration_error(labels, probs, n_bins) == pytest.approx(
        _torchmetrics_ece(labels, probs, n_bins), abs=1e-6
    )


def test_brier_and_nll_by_hand():
    labels = np.array([0, 1])
    probs = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert sm.brier_score(labels, probs) == pytest.approx(((0.2**2 + 0.2**2) + (0.4**2 + 0.4**2)) / 2)
    assert sm.negative_log_likelihood(labels, probs) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert math.isfinite(sm.negative_log_likelihood([0], [[0.0, 1.0]]))  # clipped, not inf


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    labels, _, logits = _random_predictions(n=4000, classes=5, seed=3, sharpness=1.5)
    overconfident = logits * 5
    validation, test = slice(0, 2000), slice(2000, None)
    temperature = sm.fit_temperature(overconfident[validation], labels[validation])
    assert 3.0 < temperature < 7.0  # recovers roughly the factor of 5
    before = sm.expected_calibration_error(labels[test], sm.apply_temperature(overconfident[test]))
    after = sm.expected_calibration_error(labels[test], sm.apply_temperature(overconfident[test], temperature))
    assert after < before / 3
    assert sm.negative_log_likelihood(
        labels[test], sm.apply_temperature(overconfident[test], temperature)
    ) < sm.negative_log_likelihood(labels[test], sm.apply_temperature(overconfident[test]))


def test_fit_temperature_matches_a_grid_search_on_exact_nll():
    from scipy.special import log_softmax

    labels, _, logits = _random_predictions(n=500, classes=4, seed=11, sharpness=1.0)
    logits = logits * 8  # confident mistakes with p_y far below any clipping eps
    grid = np.exp(np.linspace(np.log(0.5), np.log(20), 2001))
    nll = [-log_softmax(logits / t, axis=1)[np.arange(500), labels].mean() for t in grid]
    assert sm.fit_temperature(logits, labels) == pytest.approx(grid[int(np.argmin(nll))], rel=3e-3)


def test_fit_temperature_is_robust():
    # All correct: NLL falls as T -> 0; the bound keeps T finite and positive.
    separable = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    assert 0.05 <= sm.fit_temperature(separable, [0, 1] * 10) < 0.06
    with pytest.raises(ValueError, match="nan"):
        sm.fit_temperature(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(ValueError, match="at least one"):
        sm.fit_temperature(np.zeros((0, 3)), [])


# ---------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric",
    [
        "balanced_accuracy",
        "macro_auroc",
        "expected_calibration_error",
        "brier_score",
        "negative_log_likelihood",
        "accuracy",
    ],
)
def test_vectorised_bootstrap_equals_the_plain_loop(metric):
    # A rare class (2 of 60) makes some resamples lack it; AUROC/B-ACC must average over the same classes.
    labels, probs, _ = _random_predictions(n=60, classes=4, seed=8)
    labels[labels == 3] = 0
    labels[:2] = 3
    metric_fn = getattr(sm, metric)
    fast, fast_skipped = sm.bootstrap_distribution(labels, probs, metric_fn, n_resamples=150, seed=1)
    slow, slow_skipped = sm.bootstrap_distribution(
        labels, probs, lambda labels_, probs_: metric_fn(labels_, probs_), n_resamples=150, seed=1
    )
    assert fast_skipped == slow_skipped and fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_interval_and_skipped_resamples():
    labels, probs, _ = _random_predictions(n=300)
    low, high = sm.bootstrap_ci(labels, probs, sm.balanced_accuracy, n_resamples=200)
    assert low < sm.balanced_accuracy(labels, probs) < high
    # One positive in ten: P(resample has none) = 0.9**10 = 0.35, where AUROC is undefined.
    binary_labels = np.array([1] + [0] * 9)
    binary_probs = np.stack([1 - np.linspace(0, 1, 10), np.linspace(0, 1, 10)], 1)
    with pytest.warns(UserWarning, match=r"\d+ of 400 resamples skipped"):
        sm.bootstrap_ci(binary_labels, binary_probs, sm.macro_auroc, n_resamples=400)
    _, skipped = sm.bootstrap_distribution(binary_labels, binary_probs, sm.macro_auroc, n_resamples=400)
    assert 0.25 * 400 < skipped < 0.45 * 400


def test_classification_metrics_with_ci_and_markdown():
    labels, probs, _ = _random_predictions(n=200, classes=3)
    report = sm.classification_metrics_with_ci(labels, probs, ["A", "B", "C"], n_resamples=100)
    for key in sm.CI_METRICS:
        low, high = report[f"{key}_ci"]
        assert low <= report[key] <= high, key
    assert report["ci"]["skipped"]["auroc_macro"] == 0
    table = sm.metrics_markdown_table(report, ["A", "B", "C"])
    low, high = report["balanced_accuracy_ci"]
    assert f"| balanced_accuracy | {report['balanced_accuracy']:.4f} [{low:.4f}, {high:.4f}] |" in table
    assert "| A |" in table and "| num_samples | 200 |" in table


# ---------------------------------------------------------------------------------------------------------
# Conformal prediction
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,randomized", [("lac", False), ("aps", False), ("raps", False), ("aps", True), ("raps", True)]
)
def test_conformal_sets_reach_target_coverage(method, randomized):
    # Exchangeable data: calibration and test drawn from one distribution. Tolerance 0.02 on 5,000 points
    # (the binomial standard error at 90% is 0.004).
    labels, probs, _ = _random_predictions(n=7000, classes=6, seed=4, sharpness=1.0)
    predictor = sm.SplitConformal(method=method, coverage=0.9, randomized=randomized)
    sets = predictor.fit(probs[:2000], labels[:2000]).predict_sets(probs[2000:])
    report = sm.conformal_report(sets, labels[2000:])
    assert report["coverage"] >= 0.9 - 0.02
    if randomized:  # randomised scores make coverage close to exact rather than conservative
        assert report["coverage"] <= 0.9 + 0.02
    assert all(len(s) >= 1 for s in sets)
    assert all(probs[2000 + i, s].tolist() == sorted(probs[2000 + i, s], reverse=True) for i, s in enumerate(sets))
    # A more accurate model needs smaller sets for the same coverage.
    sharp_labels, sharp_probs, _ = _random_predictions(n=7000, classes=6, seed=4, sharpness=3.0)
    sharp = sm.SplitConformal(method=method, coverage=0.9, randomized=randomized)
    sharp.fit(sharp_probs[:2000], sharp_labels[:2000])
    sharp_report = sm.conformal_report(sharp.predict_sets(sharp_probs[2000:]), sharp_labels[2000:])
    assert sharp_report["coverage"] >= 0.9 - 0.02
    assert sharp_report["mean_set_size"] < report["mean_set_size"]


def test_conformal_threshold_round_trips_and_validates():
    labels, probs, _ = _random_predictions(n=500, classes=4, seed=6)
    fitted = sm.SplitConformal(method="raps", coverage=0.8).fit(probs[:300], labels[:300])
    restored = sm.SplitConformal(method="raps", coverage=0.8)
    restored.qhat = fitted.qhat  # how predict.py rebuilds it from calibration.json
    assert restored.predict_sets(probs[300:]) == fitted.predict_sets(probs[300:])
    with pytest.raises(RuntimeError, match="fit"):
        sm.SplitConformal().predict_sets(probs)
    with pytest.raises(ValueError, match="method"):
        sm.SplitConformal(method="topk")
    with pytest.raises(ValueError, match="randomized"):
        sm.SplitConformal(method="lac", randomized=True)


def test_prediction_set_text():
    assert sm.format_prediction_set([0, 1], ["MEL", "NV", "BCC"], 0.9) == "MEL or NV (90% coverage)"
    assert sm.format_prediction_set([2], ["MEL", "NV", "BCC"], 0.95) == "BCC (95% coverage)"


# ---------------------------------------------------------------------------------------------------------
# ISIC formats and scores
# ---------------------------------------------------------------------------------------------------------


def test_partial_auc_hand_examples_and_perfect_scorer():
    assert sm.partial_auc_above_tpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.2)
    assert sm.partial_auc_above_tpr([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    # Positives at 0.9 and 0.3, negatives at 0.5 and 0.1: TPR is 0.5 until half the negatives are passed,
    # so the region above 80% TPR only starts at FPR 0.5: area = (1 - 0.5) * (1 - 0.8) = 0.1.
    assert sm.partial_auc_above_tpr([1, 0, 1, 0], [0.9, 0.5, 0.3, 0.1]) == pytest.approx(0.1)
    # A tie crossing 80% TPR (needs the interpolated point): positives 0.9, 0.8, 0.7, 0.5, 0.5, negatives 0.5,
    # 0.1. ROC (0,0) -> (0,0.6) -> (0.5,1) -> (1,1); TPR = 0.6 + 0.8 FPR passes 0.8 at FPR 0.25, so the area
    # above 0.8 is the triangle 0.5 * 0.25 * 0.2 plus the rectangle 0.5 * 0.2 = 0.125.
    assert sm.partial_auc_above_tpr([1, 1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.5, 0.5, 0.5, 0.1]) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="both"):
        sm.partial_auc_above_tpr([1, 1], [0.2, 0.3])


def test_partial_auc_equals_direct_integration():
    # The Kaggle metric's other published form: integrate the flipped ROC up to max_fpr with an
    # interpolated end point (no McClish round trip).
    from sklearn.metrics import auc, roc_curve

    rng = np.random.default_rng(9)
    for min_tpr in (0.8, 0.5):
        y_true = rng.integers(0, 2, 400)
        scores = np.round(rng.normal(size=400) + y_true, 1)  # rounded: many ties
        fpr, tpr, _ = roc_curve(1 - y_true, -scores)
        max_fpr = 1 - min_tpr
        stop = np.searchsorted(fpr, max_fpr, "right")
        tpr_end = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
        direct = auc(np.append(fpr[:stop], max_fpr), np.append(tpr[:stop], tpr_end))
        assert sm.partial_auc_above_tpr(y_true, scores, min_tpr) == pytest.approx(direct, abs=1e-12)


def test_isic2019_submission_frame(tmp_path):
    names = ["NV", "MEL", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    probs = np.eye(8)[[0, 1, 7]]
    images = ["ISIC_9", "ISIC_1", "ISIC_5"]  # unsorted: order must be kept
    frame = sm.isic2019_submission_frame(images, probs, names)
    assert list(frame.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert list(frame["image"]) == images
    assert frame.loc[0, "NV"] == 1.0 and frame.loc[1, "MEL"] == 1.0 and frame.loc[2, "SCC"] == 1.0
    assert (frame["UNK"] == 0.0).all()
    sm.write_isic2019_submission(tmp_path / "submission.csv", images, probs, names)
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK" and lines[1].startswith("ISIC_9,0.0,1.0,")
    with pytest.raises(ValueError, match=r"no class\(es\) \['SCC'\]"):
        sm.isic2019_submission_frame(["a"], np.ones((1, 7)) / 7, names[:7])


def test_malignant_score_sums_malignant_classes():
    probs = np.array([[0.1, 0.5, 0.2, 0.2]])
    assert sm.malignant_score(probs, ["MEL", "NV", "BCC", "AK"])[0] == pytest.approx(0.3)
    assert sm.malignant_score(probs, ["MEL", "NV", "BCC", "AK"], malignant=("MEL", "BCC", "SCC", "AK"))[
        0
    ] == pytest.approx(0.5)


def test_malignant_score_of_an_isic2019_model():
    """MEL + BCC + SCC on the converters' ISIC 2019 order; AK only when asked (SLICE-3D labels it benign)."""
    from skinclip.labels import MALIGNANT_CLASSES

    probs = np.array([[0.1, 0.2, 0.3, 0.05, 0.05, 0.1, 0.1, 0.1]])
    assert sm.malignant_score(probs, ISIC_CLASSES)[0] == pytest.approx(0.5)
    assert sm.malignant_score(probs, ISIC_CLASSES, malignant=(*MALIGNANT_CLASSES, "AK"))[0] == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------------------
# Subgroups and reports
# ---------------------------------------------------------------------------------------------------------


def test_subgroup_table_counts_and_gap():
    labels, probs, _ = _random_predictions(n=200, classes=3, seed=5)
    sex = np.array(["male", "female", None, "unknown"] * 50, dtype=object)
    ages = [sm.age_band(a) for a in np.tile([25, 55, np.nan, 71], 50)]
    site = pd.Series(["back", pd.NA, "face", np.float32("nan"), "nan"] * 40)
    table = sm.subgroup_table(labels, probs, {"sex": sex, "age_band": ages, "site": site}, ["A", "B", "C"])
    assert list(table.columns) == ["attribute", "group", "n", "balanced_accuracy", "auroc_macro", "ece"]
    counts = dict(zip(zip(table["attribute"], table["group"]), table["n"]))
    assert counts == {
        ("sex", "female"): 50,
        ("sex", "male"): 50,
        ("sex", "unknown"): 100,
        ("age_band", "20-39"): 50,
        ("age_band", "40-59"): 50,
        ("age_band", "60-79"): 50,
        ("age_band", "unknown"): 50,
        ("site", "back"): 40,
        ("site", "face"): 40,
        ("site", "unknown"): 120,
    }
    male = sex == "male"
    row = table[(table["attribute"] == "sex") & (table["group"] == "male")].iloc[0]
    assert row["balanced_accuracy"] == pytest.approx(sm.balanced_accuracy(labels[male], probs[male]))
    gaps = sm.largest_gap(table, "balanced_accuracy")
    assert set(gaps) == {"sex", "age_band", "site"} and "unknown" not in (gaps["sex"]["best"], gaps["sex"]["worst"])
    ece = table[table["attribute"] == "age_band"].set_index("group")["ece"].drop("unknown")
    assert sm.largest_gap(table, "ece")["age_band"]["best"] == ece.idxmin()  # lower ECE is better
    assert len(sm.subgroup_table(labels, probs, {"sex": sex}, ["A", "B", "C"], min_count=60)) == 1


def test_age_band():
    assert [sm.age_band(a) for a in (0, 19.9, 55, "55", None, "", -1)] == [
        "0-19",
        "0-19",
        "40-59",
        "40-59",
        "unknown",
        "unknown",
        "unknown",
    ]


def test_plots_are_written(tmp_path):
    labels, probs, _ = _random_predictions(n=100, classes=3)
    probs[0] = np.eye(3)[labels[0]]  # confidence 1.0 goes in the top bar
    sm.plot_reliability_diagram(labels, probs, tmp_path / "r.png")
    sm.plot_confusion_matrix(labels, probs, ["A", "B", "C"], tmp_path / "c.png")
    for name in ("r.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headline_metrics_are_the_three_paper_numbers():
    labels, probs, _ = _random_predictions()
    assert sm.headline_metrics(labels, probs) == {
        "balanced_accuracy": sm.balanced_accuracy(labels, probs),
        "auroc_macro": sm.macro_auroc(labels, probs),
        "ece": sm.expected_calibration_error(labels, probs, n_bins=15),
    }


def test_ood_metrics_by_malignant_score():
    truth = np.array([0, 0, 1, 1])
    perfect = sm.ood_metrics(truth, np.array([0.1, 0.2, 0.8, 0.9]))
    assert perfect["balanced_accuracy"] == 1.0 and perfect["auroc_macro"] == 1.0
    assert perfect["ece"] == pytest.approx(0.15)  # confidences 0.9, 0.8, 0.8, 0.9, all correct
    assert perfect["pauc_above_tpr_0.8"] == pytest.approx(0.2) and perfect["num_malignant"] == 2
    assert perfect["num_samples"] == 4 and set(perfect["per_class"]) == {"benign", "malignant"}
    inverted = sm.ood_metrics(truth, np.array([0.9, 0.8, 0.2, 0.1]))
    assert inverted["balanced_accuracy"] == 0.0 and inverted["auroc_macro"] == 0.0
    with pytest.raises(ValueError, match="both benign and malignant"):
        sm.ood_metrics(np.array([1, 1]), np.array([0.3, 0.6]))
