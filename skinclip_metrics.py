"""Evaluation metrics for skin-lesion classifiers: discrimination, calibration, conformal sets, subgroups.

Inputs are NumPy-like: ``labels`` int `(n,)`, ``probs`` float `(n, C)` with rows summing to 1. Library code
does the job where one exists (scikit-learn); ECE and split-conformal prediction are written here because no
dependency of the project provides them, and ECE is tested against torchmetrics'
``MulticlassCalibrationError(n_bins=15, norm="l1")``. B-ACC and AUROC are tested against the official
``isic-challenge-scoring`` package.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np

ISIC2019_SUBMISSION_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
MALIGNANT_CLASSES = ("MEL", "BCC", "SCC")  # AK is pre-malignant; SLICE-3D labels it benign (target 0)


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (num_samples, num_classes), got shape {probs.shape}")
    if len(labels) != len(probs):
        raise ValueError(f"{len(labels)} labels but {len(probs)} probability rows")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be in [0, {probs.shape[1] - 1}], got [{labels.min()}, {labels.max()}]")
    return labels, probs


def _absent_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    return sorted(set(range(num_classes)) - set(labels.tolist()))


def _warn_absent(labels: np.ndarray, num_classes: int, what: str) -> None:
    absent = _absent_classes(labels, num_classes)
    if absent:
        warnings.warn(f"{what}: class index(es) {absent} have no samples in this split and are left out", stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# Discrimination
# --------------------------------------------------------------------------------------------------------


def per_class_recall(labels, probs) -> list[float]:
    """Recall of each class on argmax predictions; nan for a class with no samples."""
    labels, probs = _check(labels, probs)
    predictions = probs.argmax(1)
    return [float(np.mean(predictions[labels == k] == k)) if np.any(labels == k) else math.nan
            for k in range(probs.shape[1])]


def balanced_accuracy(labels, probs) -> float:
    """Mean per-class recall over the classes present (scikit-learn's `balanced_accuracy_score` on argmax)."""
    from sklearn.metrics import balanced_accuracy_score

    labels, probs = _check(labels, probs)
    _warn_absent(labels, probs.shape[1], "balanced accuracy")
    with warnings.catch_warnings():
        # sklearn warns when predictions name classes absent from the labels; that is expected here.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, probs.argmax(1)))


def per_class_auroc(labels, probs) -> list[float]:
    """One-vs-rest AUROC of each class; nan where the class has no positive or no negative sample."""
    from sklearn.metrics import roc_auc_score

    labels, probs = _check(labels, probs)
    values = []
    for k in range(probs.shape[1]):
        positives = labels == k
        values.append(float(roc_auc_score(positives, probs[:, k])) if 0 < positives.sum() < len(labels) else math.nan)
    return values


def macro_auroc(labels, probs) -> float:
    """Macro one-vs-rest AUROC over the classes present (equals scikit-learn's `multi_class="ovr"` when all are).

    Binary problems use the positive-class score, as `roc_auc_score` does. nan when fewer than two classes
    are present.
    """
    from sklearn.metrics import roc_auc_score

    labels, probs = _check(labels, probs)
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1])) if len(set(labels.tolist())) == 2 else math.nan
    _warn_absent(labels, probs.shape[1], "macro AUROC")
    values = [v for v in per_class_auroc(labels, probs) if not math.isnan(v)]
    return float(np.mean(values)) if len(values) >= 2 else math.nan


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width bins, L1: ``sum_b |acc_b - conf_b| * n_b / n``.

    Bins are left-closed, ``[b_i, b_{i+1})``, with confidence 1.0 in a bin of its own, exactly as torchmetrics
    bins (float32 confidences and edges), so both give the same number.
    """
    labels, probs = _check(labels, probs)
    if len(labels) == 0:
        return math.nan
    confidences = probs.max(1).astype(np.float32)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    bins = np.searchsorted(edges, confidences, side="right") - 1
    counts = np.bincount(bins, minlength=n_bins + 1)
    confidence_sum = np.bincount(bins, weights=confidences.astype(np.float64), minlength=n_bins + 1)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins + 1)
    filled = counts > 0
    gaps = np.abs(correct_sum[filled] / counts[filled] - confidence_sum[filled] / counts[filled])
    return float(np.sum(gaps * counts[filled] / len(labels)))


def brier_score(labels, probs) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - y_ik)^2`` (0 best, 2 worst)."""
    labels, probs = _check(labels, probs)
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def negative_log_likelihood(labels, probs, eps: float = 1e-12) -> float:
    labels, probs = _check(labels, probs)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))


def apply_temperature(logits, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Post-hoc temperature scaling (Guo et al. 2017): the T minimising validation NLL.

    A bounded 1-D search over log T: NLL is smooth and unimodal in log T, and bounds keep a degenerate
    validation set (all correct, say) from driving T to 0.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one validation sample")

    def nll(log_t: float) -> float:
        return negative_log_likelihood(labels, apply_temperature(logits, math.exp(log_t)))

    result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


# --------------------------------------------------------------------------------------------------------
# Summaries and confidence intervals
# --------------------------------------------------------------------------------------------------------


def classification_metrics(labels, probs, class_names: Sequence[str]) -> dict:
    """Every headline metric of a classifier on one split, and per-class AUROC, recall and support."""
    labels, probs = _check(labels, probs)
    if len(class_names) != probs.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} probability columns")
    aurocs, recalls = per_class_auroc(labels, probs), per_class_recall(labels, probs)
    support = np.bincount(labels, minlength=probs.shape[1])
    return {
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "auroc_macro": macro_auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs, n_bins=15),
        "brier": brier_score(labels, probs),
        "nll": negative_log_likelihood(labels, probs),
        "accuracy": float(np.mean(probs.argmax(1) == labels)) if len(labels) else math.nan,
        "num_samples": int(len(labels)),
        "per_class": {
            name: {"auroc": aurocs[k], "recall": recalls[k], "support": int(support[k])}
            for k, name in enumerate(class_names)
        },
    }


def bootstrap_ci(labels, probs, metric_fn: Callable, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs)``; resamples where it is undefined are skipped."""
    labels, probs = _check(labels, probs)
    rng = np.random.default_rng(seed)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_resamples):
            index = rng.integers(0, len(labels), len(labels))
            try:
                value = metric_fn(labels[index], probs[index])
            except ValueError:
                continue
            if value is not None and not math.isnan(value):
                values.append(value)
    if not values:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------------
# Conformal prediction
# --------------------------------------------------------------------------------------------------------


class SplitConformal:
    """Split-conformal prediction sets (Angelopoulos & Bates 2021).

    ``method``: ``"lac"`` (score 1 - p_y; smallest sets), ``"aps"`` (cumulative sorted mass up to the true
    class; adaptive set sizes) or ``"raps"`` (APS plus ``raps_lambda`` per rank beyond ``raps_k_reg``; smaller,
    more stable sets). Non-randomised: coverage is at least the target, slightly conservative. Sets are
    never empty (the top class is always in).
    """

    def __init__(self, method: str = "aps", coverage: float = 0.9, raps_lambda: float = 0.01, raps_k_reg: int = 1,
                 seed: int = 0):
        if method not in ("lac", "aps", "raps"):
            raise ValueError(f"method={method!r}; choose 'lac', 'aps' or 'raps'")
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage}")
        self.method, self.coverage = method, coverage
        self.raps_lambda, self.raps_k_reg, self.seed = raps_lambda, raps_k_reg, seed
        self.qhat: float | None = None

    def _scores_all(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per class: (conformity score if it were the label, score with its own mass removed)."""
        if self.method == "lac":
            score = 1.0 - probs
            return score, score
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=1)
        cumulative = np.cumsum(sorted_probs, axis=1)
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(probs.shape[1])[None].repeat(len(probs), 0), axis=1)
        score = np.take_along_axis(cumulative, ranks, axis=1)  # mass of classes ranked at or above
        if self.method == "raps":
            score = score + self.raps_lambda * np.maximum(ranks + 1 - self.raps_k_reg, 0)
        return score, score - probs

    def fit(self, probs, labels) -> "SplitConformal":
        labels, probs = _check(labels, probs)
        n = len(labels)
        if n == 0:
            raise ValueError("conformal calibration needs at least one sample")
        scores, _ = self._scores_all(probs)
        true_scores = scores[np.arange(n), labels]
        level = min(1.0, math.ceil((n + 1) * self.coverage) / n)
        self.qhat = float(np.quantile(true_scores, level, method="higher"))
        return self

    def predict_sets(self, probs) -> list[list[int]]:
        if self.qhat is None:
            raise RuntimeError("call fit() on calibration data first")
        probs = np.asarray(probs, dtype=np.float64)
        scores, before = self._scores_all(probs)
        # LAC: a class is in when its score is within qhat. APS/RAPS: the smallest prefix of the ranked
        # classes that reaches qhat, i.e. every class whose mass *before* it is still below qhat.
        members = scores <= self.qhat if self.method == "lac" else before < self.qhat
        members[np.arange(len(probs)), probs.argmax(1)] = True
        return [np.flatnonzero(row)[np.argsort(-probs[i, np.flatnonzero(row)], kind="stable")].tolist()
                for i, row in enumerate(members)]


def conformal_report(sets: Sequence[Sequence[int]], labels) -> dict:
    labels = np.asarray(labels).astype(int)
    covered = [int(label) in set(members) for members, label in zip(sets, labels)]
    return {"coverage": float(np.mean(covered)) if len(covered) else math.nan,
            "mean_set_size": float(np.mean([len(s) for s in sets])) if len(sets) else math.nan}


def format_prediction_set(set_indices: Sequence[int], class_names: Sequence[str], coverage: float) -> str:
    """E.g. ``"MEL or NV (90% coverage)"``."""
    return f"{' or '.join(class_names[i] for i in set_indices)} ({coverage:.0%} coverage)"


# --------------------------------------------------------------------------------------------------------
# ISIC challenge formats and scores
# --------------------------------------------------------------------------------------------------------


def isic2019_submission_frame(image_ids: Sequence[str], probs, class_names: Sequence[str]):
    """The ISIC 2019 task-3 submission table: ``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``.

    Columns are matched by class name; a model without an UNK class gets UNK = 0.
    """
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float64)
    missing = [c for c in ISIC2019_SUBMISSION_COLUMNS if c != "UNK" and c not in class_names]
    if missing:
        raise ValueError(f"the model has no class(es) {missing} required by the ISIC 2019 submission format")
    if len(image_ids) != len(probs):
        raise ValueError(f"{len(image_ids)} image ids but {len(probs)} probability rows")
    frame = pd.DataFrame({"image": list(image_ids)})
    for column in ISIC2019_SUBMISSION_COLUMNS:
        frame[column] = probs[:, list(class_names).index(column)] if column in class_names else 0.0
    return frame


def write_isic2019_submission(path, image_ids, probs, class_names) -> None:
    isic2019_submission_frame(image_ids, probs, class_names).to_csv(path, index=False)


def malignant_score(probs, class_names: Sequence[str], malignant: Sequence[str] = MALIGNANT_CLASSES) -> np.ndarray:
    """Probability of a malignant diagnosis: the sum over the malignant classes the model has."""
    indices = [i for i, name in enumerate(class_names) if name in set(malignant)]
    if not indices:
        raise ValueError(f"none of the malignant classes {list(malignant)} is among {list(class_names)}")
    return np.asarray(probs, dtype=np.float64)[:, indices].sum(axis=1)


def partial_auc_above_tpr(y_true, scores, min_tpr: float = 0.80) -> float:
    """ISIC 2024 (Kaggle) score: area of the ROC curve above ``min_tpr`` true-positive rate, in [0, 1 - min_tpr].

    As the official metric: labels are flipped and scores negated so that the region of high sensitivity
    becomes a low-FPR region, whose partial area under the ROC curve is integrated with a point
    interpolated at ``max_fpr = 1 - min_tpr`` (no McClish standardisation).
    """
    from sklearn.metrics import auc, roc_curve

    y_true = np.asarray(y_true).astype(int)
    if len(set(y_true.tolist())) != 2:
        raise ValueError("partial AUC needs both classes in y_true")
    max_fpr = 1.0 - min_tpr
    fpr, tpr, _ = roc_curve(np.abs(y_true - 1), -np.asarray(scores, dtype=np.float64))
    stop = np.searchsorted(fpr, max_fpr, "right")
    tpr = np.append(tpr[:stop], np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1]))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(auc(fpr, tpr))


# --------------------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------------------


def age_band(age, width: int = 20) -> str:
    """``55 → "40-59"``; blank or non-numeric → ``"unknown"``."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if math.isnan(value) or value < 0:
        return "unknown"
    low = int(value // width) * width
    return f"{low}-{low + width - 1}"


def _group_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "unknown"):
        return "unknown"
    return str(value)


def subgroup_table(labels, probs, groups: dict[str, Sequence], class_names: Sequence[str], min_count: int = 1):
    """B-ACC, macro AUROC and ECE per value of each metadata attribute, with the sample count of each group."""
    import pandas as pd

    labels, probs = _check(labels, probs)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small groups lack classes: their metrics are defined over what is there
        for attribute, values in groups.items():
            if len(values) != len(labels):
                raise ValueError(f"subgroup {attribute!r} has {len(values)} values for {len(labels)} samples")
            keys = np.array([_group_value(v) for v in values])
            for group in sorted(set(keys.tolist())):
                mask = keys == group
                if mask.sum() < min_count:
                    continue
                rows.append({
                    "attribute": attribute,
                    "group": group,
                    "n": int(mask.sum()),
                    "balanced_accuracy": balanced_accuracy(labels[mask], probs[mask]),
                    "auroc_macro": macro_auroc(labels[mask], probs[mask]),
                    "ece": expected_calibration_error(labels[mask], probs[mask]),
                })
    return pd.DataFrame(rows, columns=["attribute", "group", "n", "balanced_accuracy", "auroc_macro", "ece"])


def largest_gap(table, metric: str) -> dict[str, dict]:
    """Per attribute, the best and worst known group on ``metric`` and their gap (the flagged disparity)."""
    gaps = {}
    for attribute, part in table.groupby("attribute"):
        known = part[(part["group"] != "unknown") & part[metric].notna()]
        if len(known) < 2:
            continue
        higher_is_better = metric != "ece"
        ordered = known.sort_values(metric, ascending=not higher_is_better)
        best, worst = ordered.iloc[0], ordered.iloc[-1]
        gaps[attribute] = {"gap": float(abs(best[metric] - worst[metric])), "best": str(best["group"]),
                           "worst": str(worst["group"]), "best_n": int(best["n"]), "worst_n": int(worst["n"])}
    return gaps


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def metrics_markdown_table(metrics: dict, class_names: Sequence[str]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key in ("balanced_accuracy", "auroc_macro", "ece", "brier", "nll", "accuracy"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += ["", "| class | support | recall | AUROC |", "|---|---|---|---|"]
    for name in class_names:
        entry = metrics.get("per_class", {}).get(name, {})
        lines.append(f"| {name} | {entry.get('support', 0)} | {entry.get('recall', math.nan):.4f} | "
                     f"{entry.get('auroc', math.nan):.4f} |")
    return "\n".join(lines)


def plot_reliability_diagram(labels, probs, path, n_bins: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, probs = _check(labels, probs)
    confidences = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidences, side="right") - 1, 0, n_bins - 1)
    accuracy = [correct[bins == b].mean() if np.any(bins == b) else np.nan for b in range(n_bins)]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.bar(edges[:-1], accuracy, width=1 / n_bins, align="edge", edgecolor="black", label="accuracy")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title=f"ECE = {expected_calibration_error(labels, probs, n_bins):.3f}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_confusion_matrix(labels, probs, class_names: Sequence[str], path, normalize: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    labels, probs = _check(labels, probs)
    matrix = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(class_names)))).astype(float)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set(xlabel="predicted", ylabel="true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            axis.text(j, i, f"{matrix[i, j]:.2f}" if normalize else int(matrix[i, j]), ha="center", va="center",
                      color="white" if matrix[i, j] > 0.5 * matrix.max() else "black", fontsize=8)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
