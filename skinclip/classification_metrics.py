"""Evaluation metrics for skin-lesion classifiers: discrimination, calibration, conformal sets, subgroups.

Inputs are NumPy-like: ``labels`` int `(n,)`, ``probs`` float `(n, C)` with rows summing to 1; outputs are plain
Python numbers, lists, dicts or pandas frames. Library code does the job where one exists (scikit-learn);
ECE, the vectorised bootstrap and split-conformal prediction are written here because no dependency of the
project provides them. The tests hold each number to its reference: B-ACC and AUROC to the official
``isic-challenge-scoring`` package, ECE to torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")``,
the bootstrap fast paths to the plain loop, pAUC to hand computations.

Classes absent from an evaluated split are left out of the class averages with a warning naming them; a
metric that is undefined (fewer than two classes for AUROC) is nan, never an exception.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from skinclip.labels import ISIC2019_SUBMISSION_COLUMNS, MALIGNANT_CLASSES, OOD_CLASSES
from skinclip.output_folder import atomic_write_bytes, atomic_write_text

SUBGROUP_COLUMNS = ("attribute", "group", "n", "balanced_accuracy", "auroc_macro", "ece")
UNKNOWN_GROUP = "unknown"
_RESAMPLE_BLOCK = 2_000_000  # bootstrap indices drawn per block (resamples x samples), bounding memory


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


def accuracy(labels, probs) -> float:
    """Top-1 accuracy; nan on an empty split."""
    labels, probs = _check(labels, probs)
    return float(np.mean(probs.argmax(1) == labels)) if len(labels) else math.nan


def per_class_recall(labels, probs) -> list[float]:
    """Recall of each class on argmax predictions; nan for a class with no samples."""
    labels, probs = _check(labels, probs)
    predictions = probs.argmax(1)
    return [
        float(np.mean(predictions[labels == k] == k)) if np.any(labels == k) else math.nan
        for k in range(probs.shape[1])
    ]


def balanced_accuracy(labels, probs) -> float:
    """Mean per-class recall over the classes present (scikit-learn's `balanced_accuracy_score` on argmax).

    Ties in a row go to the first class (NumPy's argmax); isic-challenge-scoring counts a tied row as wrong.
    """
    from sklearn.metrics import balanced_accuracy_score

    labels, probs = _check(labels, probs)
    if len(labels) == 0:
        return math.nan
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
    _warn_absent(labels, probs.shape[1], "macro AUROC")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1])) if len(set(labels.tolist())) == 2 else math.nan
    values = [v for v in per_class_auroc(labels, probs) if not math.isnan(v)]
    return float(np.mean(values)) if len(values) >= 2 else math.nan


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


def _calibration_bin_edges(n_bins: int) -> np.ndarray:
    # torch.linspace in float32 is not np.linspace rounded to float32: its halves are computed from each end
    # and its SIMD path accumulates differently (CPU-dependent), so 6 of the 16 default edges differ by an ulp
    # and a confidence lying exactly on an edge (0.6 from a 5-NN vote, say) changes bin. torchmetrics bins
    # with torch.linspace; taking the edges from torch itself is the only way to match it bit for bit.
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency of the project
        return np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()


def _calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int):
    """Per sample: bin index in [0, n_bins] (1.0 alone in the last), top-label confidence, correctness."""
    confidences = probs.max(1).astype(np.float32)
    bins = np.searchsorted(_calibration_bin_edges(n_bins), confidences, side="right") - 1
    return bins, confidences.astype(np.float64), (probs.argmax(1) == labels).astype(np.float64)


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width bins, L1: ``sum_b |acc_b - conf_b| * n_b / n``.

    Binned exactly as torchmetrics' ``MulticlassCalibrationError(norm="l1")``: float32 confidences, left-closed
    bins ``[b_i, b_{i+1})`` on torch's float32 edges, and confidence 1.0 in a bin of its own.
    """
    labels, probs = _check(labels, probs)
    if len(labels) == 0:
        return math.nan
    bins, confidences, correct = _calibration_bins(labels, probs, n_bins)
    confidence_sum = np.bincount(bins, weights=confidences, minlength=n_bins + 1)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins + 1)
    # |acc_b - conf_b| * n_b / n == |correct_b - confidence_b| / n
    return float(np.sum(np.abs(correct_sum - confidence_sum)) / len(labels))


def brier_score(labels, probs) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - y_ik)^2`` (0 best, 2 worst)."""
    labels, probs = _check(labels, probs)
    return float(np.mean(_brier_per_sample(labels, probs))) if len(labels) else math.nan


def _brier_per_sample(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return np.sum((probs - np.eye(probs.shape[1])[labels]) ** 2, axis=1)


def negative_log_likelihood(labels, probs, eps: float = 1e-12) -> float:
    """Mean ``-log p_y``, with p clipped to ``eps`` so one confident mistake gives a large, finite value."""
    labels, probs = _check(labels, probs)
    return float(np.mean(_nll_per_sample(labels, probs, eps))) if len(labels) else math.nan


def _nll_per_sample(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))


def apply_temperature(logits, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Post-hoc temperature scaling (Guo et al. 2017): the T minimising validation NLL.

    A bounded 1-D search over log T: NLL is convex in 1/T, hence unimodal in log T, and the bounds keep a
    degenerate validation set (all correct, say) from driving T to 0.
    """
    from scipy.optimize import minimize_scalar

    labels, logits = _check(labels, logits)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one validation sample")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("fit_temperature: logits contain nan or +inf")

    rows, top = np.arange(len(labels)), logits.argmax(1)

    def nll(log_t: float) -> float:
        # -log softmax_y = (z_max - z_y) + log1p(sum of the other exp(z_k - z_max)), exact at both ends:
        # -log(clip(p)) goes flat where confident mistakes have p_y < eps (pulling T down on the very
        # over-confident models this is for), and logsumexp rounds 1 + e^-40 to 1 for confident hits.
        scaled = logits / math.exp(log_t)
        shifted = scaled - scaled[rows, top][:, None]
        others = np.exp(shifted)
        others[rows, top] = 0.0
        return float(np.mean(np.log1p(others.sum(1)) - shifted[rows, labels]))

    result = minimize_scalar(
        nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(result.x))


# --------------------------------------------------------------------------------------------------------
# Summaries and confidence intervals
# --------------------------------------------------------------------------------------------------------


def headline_metrics(labels, probs) -> dict[str, float]:
    """The paper's three numbers: B-ACC, macro one-vs-rest AUROC and 15-bin ECE.

    The keys of every ``<split>_metrics.json`` (train.py, the baselines) and of the Trainer's evaluation logs.
    """
    return {
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "auroc_macro": macro_auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs, n_bins=15),
    }


def classification_metrics(labels, probs, class_names: Sequence[str]) -> dict:
    """Every headline metric of a classifier on one split, and per-class AUROC, recall and support.

    Keys: balanced_accuracy, auroc_macro, ece, brier, nll, accuracy, num_samples, per_class (class name ->
    {"auroc", "recall", "support"}). One warning names the classes absent from the split.
    """
    labels, probs = _check(labels, probs)
    if len(class_names) != probs.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} probability columns")
    absent = [class_names[k] for k in _absent_classes(labels, probs.shape[1])]
    if absent:
        warnings.warn(
            f"class(es) {absent} have no samples in this split: balanced accuracy and macro AUROC "
            f"average over the {probs.shape[1] - len(absent)} present",
            stacklevel=2,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # said once above, with names
        bacc, auroc = balanced_accuracy(labels, probs), macro_auroc(labels, probs)
    aurocs, recalls = per_class_auroc(labels, probs), per_class_recall(labels, probs)
    support = np.bincount(labels, minlength=probs.shape[1])
    return {
        "balanced_accuracy": bacc,
        "auroc_macro": auroc,
        "ece": expected_calibration_error(labels, probs, n_bins=15),
        "brier": brier_score(labels, probs),
        "nll": negative_log_likelihood(labels, probs),
        "accuracy": accuracy(labels, probs),
        "num_samples": int(len(labels)),
        "per_class": {
            name: {"auroc": aurocs[k], "recall": recalls[k], "support": int(support[k])}
            for k, name in enumerate(class_names)
        },
    }


def _resample_indices(rng: np.random.Generator, n: int, n_resamples: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples as blocks of index rows `(block, n)`, the same stream for every metric."""
    block = max(1, _RESAMPLE_BLOCK // max(n, 1))
    for start in range(0, n_resamples, block):
        yield rng.integers(0, n, (min(block, n_resamples - start), n))


# A bootstrap resample is the original sample with integer weights (how often each row was drawn), so the
# metrics below become matrix products over a block of weight rows instead of one Python call per resample.
# Each `_weighted_*` takes (labels, probs) and returns a function of weights `(block, n)` -> values `(block,)`,
# nan where the metric is undefined on that resample.


def _weighted_mean_of(per_sample: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda weights: weights @ per_sample / weights.sum(1)


def _weighted_balanced_accuracy(labels: np.ndarray, probs: np.ndarray):
    one_hot = np.eye(probs.shape[1])[labels]
    hits = one_hot * (probs.argmax(1) == labels)[:, None]

    def evaluate(weights: np.ndarray) -> np.ndarray:
        support = weights @ one_hot
        recall = np.divide(weights @ hits, support, out=np.full_like(support, np.nan), where=support > 0)
        return np.nanmean(recall, axis=1)

    return evaluate


def _weighted_macro_auroc(labels: np.ndarray, probs: np.ndarray):
    # AUROC is the Mann-Whitney statistic with ties counted half (what sklearn's trapezoidal AUC equals):
    # per tie group of scores, positives beat the negative weight strictly below plus half of the tied.
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    prepared = []
    for k in classes:
        order = np.argsort(probs[:, k], kind="stable")
        scores = probs[order, k]
        group_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        positive = (labels[order] == k).astype(np.float64)
        prepared.append((order, group_starts, positive))

    def evaluate(weights: np.ndarray) -> np.ndarray:
        aurocs = np.full((len(weights), len(prepared)), np.nan)
        for j, (order, group_starts, positive) in enumerate(prepared):
            ordered = weights[:, order]
            pos = np.add.reduceat(ordered * positive, group_starts, axis=1)
            neg = np.add.reduceat(ordered * (1.0 - positive), group_starts, axis=1)
            below = np.cumsum(neg, axis=1) - neg
            pos_total, neg_total = pos.sum(1), neg.sum(1)
            defined = (pos_total > 0) & (neg_total > 0)
            wins = np.sum(pos * (below + 0.5 * neg), axis=1)
            aurocs[defined, j] = wins[defined] / (pos_total[defined] * neg_total[defined])
        if len(prepared) == 1:
            return aurocs[:, 0]
        enough = np.sum(~np.isnan(aurocs), axis=1) >= 2
        return np.where(enough, np.nanmean(np.where(enough[:, None], aurocs, 0.0), axis=1), np.nan)

    return evaluate


def _weighted_ece(labels: np.ndarray, probs: np.ndarray):
    bins, confidences, correct = _calibration_bins(labels, probs, 15)
    one_hot = np.eye(16)[bins]
    gap_per_bin = one_hot * (correct - confidences)[:, None]
    return lambda weights: np.sum(np.abs(weights @ gap_per_bin), axis=1) / weights.sum(1)


_VECTORISED_BOOTSTRAP = {
    balanced_accuracy: _weighted_balanced_accuracy,
    macro_auroc: _weighted_macro_auroc,
    expected_calibration_error: _weighted_ece,  # only with its default n_bins=15
    brier_score: lambda labels, probs: _weighted_mean_of(_brier_per_sample(labels, probs)),
    negative_log_likelihood: lambda labels, probs: _weighted_mean_of(_nll_per_sample(labels, probs)),
    accuracy: lambda labels, probs: _weighted_mean_of((probs.argmax(1) == labels).astype(np.float64)),
}


def bootstrap_distribution(
    labels, probs, metric_fn: Callable, n_resamples: int = 1000, seed: int = 0
) -> tuple[np.ndarray, int]:
    """``metric_fn`` on ``n_resamples`` resamples (with replacement): (defined values, number skipped).

    A resample is skipped when the metric is undefined on it (nan, or a ValueError such as one class only).
    The metrics of this module are computed for a whole block of resamples at once; any other callable
    ``metric_fn(labels, probs) -> float`` is called once per resample on the same resamples.
    """
    labels, probs = _check(labels, probs)
    if len(labels) == 0:
        return np.empty(0), n_resamples
    rng = np.random.default_rng(seed)
    try:
        vectorised = _VECTORISED_BOOTSTRAP.get(metric_fn)
    except TypeError:  # an unhashable callable object: not one of ours
        vectorised = None
    evaluate = vectorised(labels, probs) if vectorised else None
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # absent-class warnings on every small resample say nothing new
        for indices in _resample_indices(rng, len(labels), n_resamples):
            if evaluate is not None:
                rows = np.arange(len(indices))[:, None] * len(labels)
                weights = np.bincount((indices + rows).ravel(), minlength=len(indices) * len(labels))
                values.extend(evaluate(weights.reshape(len(indices), len(labels)).astype(np.float64)).tolist())
                continue
            for index in indices:
                try:
                    value = metric_fn(labels[index], probs[index])
                except ValueError:
                    value = math.nan
                values.append(math.nan if value is None else float(value))
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return defined, int(len(values) - len(defined))


def bootstrap_ci(
    labels, probs, metric_fn: Callable, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs)``.

    Resamples where the metric is undefined are skipped; a warning gives their count. (nan, nan) when none
    is defined.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values, skipped = bootstrap_distribution(labels, probs, metric_fn, n_resamples, seed)
    if skipped:
        name = getattr(metric_fn, "__name__", "metric")
        warnings.warn(
            f"bootstrap of {name}: {skipped} of {n_resamples} resamples skipped (metric undefined)", stacklevel=2
        )
    if len(values) == 0:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


CI_METRICS = {
    "balanced_accuracy": balanced_accuracy,
    "auroc_macro": macro_auroc,
    "ece": expected_calibration_error,
    "brier": brier_score,
    "nll": negative_log_likelihood,
    "accuracy": accuracy,
}


def classification_metrics_with_ci(
    labels,
    probs,
    class_names: Sequence[str],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] = tuple(CI_METRICS),
) -> dict:
    """`classification_metrics` plus ``"<metric>_ci": [low, high]`` for each of ``metrics``.

    Also ``"ci": {"confidence", "n_resamples", "skipped": {metric: count}}`` so a reader knows how many
    resamples an interval rests on.
    """
    report = classification_metrics(labels, probs, class_names)
    skipped = {}
    for key in metrics:
        if key not in CI_METRICS:
            raise ValueError(f"no bootstrap interval for {key!r}; choose from {sorted(CI_METRICS)}")
        values, skipped[key] = bootstrap_distribution(labels, probs, CI_METRICS[key], n_resamples, seed)
        tail = (1 - confidence) / 2 * 100
        report[f"{key}_ci"] = (
            [float(v) for v in np.percentile(values, [tail, 100 - tail])] if len(values) else [math.nan, math.nan]
        )
    report["ci"] = {"confidence": confidence, "n_resamples": n_resamples, "skipped": skipped}
    return report


# --------------------------------------------------------------------------------------------------------
# Conformal prediction
# --------------------------------------------------------------------------------------------------------


class SplitConformal:
    """Split-conformal prediction sets (Angelopoulos & Bates 2021; APS: Romano et al. 2020; RAPS:
    Angelopoulos et al. 2021).

    ``method``: ``"lac"`` (score 1 - p_y; smallest sets), ``"aps"`` (sorted mass up to the true class;
    adaptive set sizes) or ``"raps"`` (APS plus ``raps_lambda`` per rank beyond ``raps_k_reg``; smaller,
    more stable sets). With ``randomized=False`` a set takes the ranked classes up to and including the one
    whose mass crosses ``qhat`` (coverage at least the target, a little conservative); with
    ``randomized=True`` (APS/RAPS) the crossing class is kept with the randomised-score rule, which brings
    coverage close to exactly the target. Sets are never empty: the top class is always in.

    ``qhat`` (the calibrated score threshold) is all a fitted predictor needs, so it can be stored and set
    back on a fresh instance.
    """

    def __init__(
        self,
        method: str = "aps",
        coverage: float = 0.9,
        raps_lambda: float = 0.01,
        raps_k_reg: int = 1,
        randomized: bool = False,
        seed: int = 0,
    ):
        if method not in ("lac", "aps", "raps"):
            raise ValueError(f"method={method!r}; choose 'lac', 'aps' or 'raps'")
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage}")
        if randomized and method == "lac":
            raise ValueError("randomized=True applies to 'aps' and 'raps'; LAC scores are not cumulative")
        if raps_lambda < 0 or raps_k_reg < 0:
            raise ValueError(f"raps_lambda and raps_k_reg must be >= 0, got {raps_lambda}, {raps_k_reg}")
        self.method, self.coverage, self.randomized, self.seed = method, coverage, randomized, seed
        self.raps_lambda, self.raps_k_reg = raps_lambda, raps_k_reg
        self.qhat: float | None = None
        # One stream per predictor: successive predict_sets calls draw fresh uniforms, as the guarantee needs.
        self._rng = np.random.default_rng(seed)

    def _class_scores(self, probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """`(n, C)`: the conformity score each class would have as the label.

        APS/RAPS: mass of the classes ranked above it plus ``u`` times its own mass (u = 1 when not randomised),
        plus the RAPS penalty ``lambda * (rank - k_reg)^+`` with ranks from 1.
        """
        if self.method == "lac":
            return 1.0 - probs
        order = np.argsort(-probs, axis=1, kind="stable")
        ranks = np.argsort(order, axis=1, kind="stable")  # 0-based rank of each class
        cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        mass_above = np.take_along_axis(cumulative, ranks, axis=1) - probs
        scores = mass_above + uniforms[:, None] * probs
        if self.method == "raps":
            scores = scores + self.raps_lambda * np.maximum(ranks + 1 - self.raps_k_reg, 0)
        return scores

    def _uniforms(self, n: int) -> np.ndarray:
        return self._rng.uniform(size=n) if self.randomized else np.ones(n)

    def fit(self, probs, labels) -> SplitConformal:
        """Calibrate ``qhat`` on held-out (probs, labels) exchangeable with the data sets will be made for."""
        labels, probs = _check(labels, probs)
        n = len(labels)
        if n == 0:
            raise ValueError("conformal calibration needs at least one sample")
        self._rng = np.random.default_rng(self.seed)
        true_scores = self._class_scores(probs, self._uniforms(n))[np.arange(n), labels]
        # The ceil((n+1)(1-alpha))/n empirical quantile gives coverage >= 1 - alpha in finite samples.
        level = min(1.0, math.ceil((n + 1) * self.coverage) / n)
        self.qhat = float(np.quantile(true_scores, level, method="higher"))
        return self

    def predict_sets(self, probs) -> list[list[int]]:
        """Class indices of each row's prediction set, most probable first."""
        if self.qhat is None:
            raise RuntimeError("call fit() on calibration data first (or set qhat)")
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2:
            raise ValueError(f"probs must be (num_samples, num_classes), got shape {probs.shape}")
        if self.method == "lac" or self.randomized:
            members = self._class_scores(probs, self._uniforms(len(probs))) <= self.qhat
        else:
            # Every class whose score *before* its own mass (u = 0) is still below qhat: the ranked prefix up
            # to and including the class that crosses qhat.
            members = self._class_scores(probs, np.zeros(len(probs))) < self.qhat
        members[np.arange(len(probs)), probs.argmax(1)] = True
        return [
            np.flatnonzero(row)[np.argsort(-probs[i, np.flatnonzero(row)], kind="stable")].tolist()
            for i, row in enumerate(members)
        ]


def conformal_report(sets: Sequence[Sequence[int]], labels) -> dict:
    """Empirical coverage (fraction of sets holding the label) and mean set size."""
    labels = np.asarray(labels).astype(int)
    if len(sets) != len(labels):
        raise ValueError(f"{len(sets)} sets but {len(labels)} labels")
    covered = [int(label) in set(members) for members, label in zip(sets, labels)]
    return {
        "coverage": float(np.mean(covered)) if len(covered) else math.nan,
        "mean_set_size": float(np.mean([len(s) for s in sets])) if len(sets) else math.nan,
    }


def format_prediction_set(set_indices: Sequence[int], class_names: Sequence[str], coverage: float) -> str:
    """E.g. ``"MEL or NV (90% coverage)"``."""
    return f"{' or '.join(class_names[i] for i in set_indices)} ({coverage:.0%} coverage)"


# --------------------------------------------------------------------------------------------------------
# ISIC challenge formats and scores
# --------------------------------------------------------------------------------------------------------


def isic2019_submission_frame(image_ids: Sequence[str], probs, class_names: Sequence[str]):
    """The ISIC 2019 task-3 submission table: ``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``, rows in input order.

    Columns are matched by class name; a model without an UNK class gets UNK = 0.0. Raises ValueError naming
    any of the eight diagnoses the model lacks.
    """
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float64)
    class_names = list(class_names)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs of shape {probs.shape} for {len(class_names)} class names")
    missing = [c for c in ISIC2019_SUBMISSION_COLUMNS if c != "UNK" and c not in class_names]
    if missing:
        raise ValueError(f"the model has no class(es) {missing} required by the ISIC 2019 submission format")
    if len(image_ids) != len(probs):
        raise ValueError(f"{len(image_ids)} image ids but {len(probs)} probability rows")
    frame = pd.DataFrame({"image": [str(i) for i in image_ids]})
    for column in ISIC2019_SUBMISSION_COLUMNS:
        frame[column] = probs[:, class_names.index(column)] if column in class_names else 0.0
    return frame


def write_isic2019_submission(path, image_ids, probs, class_names) -> None:
    # Whole or not at all: a torn submission CSV still parses.
    atomic_write_text(path, isic2019_submission_frame(image_ids, probs, class_names).to_csv(index=False))


def malignant_score(probs, class_names: Sequence[str], malignant: Sequence[str] = MALIGNANT_CLASSES) -> np.ndarray:
    """Probability of a malignant diagnosis: the sum over the malignant classes the model has.

    Pass ``malignant=("MEL", "BCC", "SCC", "AK")`` to count actinic keratosis as well.
    """
    indices = [i for i, name in enumerate(class_names) if name in set(malignant)]
    if not indices:
        raise ValueError(f"none of the malignant classes {list(malignant)} is among {list(class_names)}")
    return np.asarray(probs, dtype=np.float64)[:, indices].sum(axis=1)


def partial_auc_above_tpr(y_true, scores, min_tpr: float = 0.80) -> float:
    """ISIC 2024 (Kaggle) score: area under the ROC curve above ``min_tpr`` sensitivity, in [0, 1 - min_tpr].

    The official metric's steps: flip labels and negate scores so that high sensitivity becomes low FPR,
    take scikit-learn's McClish-standardised partial AUC up to ``max_fpr = 1 - min_tpr`` and undo the
    standardisation. 0.2 for a perfect scorer at the default ``min_tpr``.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int).reshape(-1)
    if set(np.unique(y_true).tolist()) != {0, 1}:
        raise ValueError("partial AUC needs binary y_true with both 0 and 1 present")
    if not 0 <= min_tpr < 1:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    max_fpr = abs(1 - min_tpr)
    flipped = np.abs(y_true - 1)
    negated = -1.0 * np.asarray(scores, dtype=np.float64).reshape(-1)
    scaled = roc_auc_score(flipped, negated, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def ood_metrics(malignant, scores) -> dict:
    """A multi-class model scored on a binary benign/malignant set (ISIC 2024) through its malignant score.

    ``malignant`` is 0/1 per case, ``scores`` P(malignant) (`malignant_score`); the binary probabilities are
    ``[1 - score, score]``. Keys: those of `classification_metrics` over ``OOD_CLASSES`` (B-ACC at score > 0.5,
    AUROC of the score, 15-bin ECE, Brier, NLL, accuracy, per-class recall and support), the ISIC 2024 challenge
    metric ``pauc_above_tpr_0.8`` and ``num_malignant``.
    """
    malignant = np.asarray(malignant).astype(int).reshape(-1)
    scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)  # a sum of probabilities may pass 1
    if len(np.unique(malignant)) < 2:
        raise ValueError("the OOD split needs both benign and malignant cases")
    return {
        **classification_metrics(malignant, np.stack([1.0 - scores, scores], axis=1), OOD_CLASSES),
        "pauc_above_tpr_0.8": partial_auc_above_tpr(malignant, scores, min_tpr=0.8),
        "num_malignant": int(malignant.sum()),
    }


# --------------------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------------------


def age_band(age, width: int = 20) -> str:
    """``55 → "40-59"``; blank, negative or non-numeric → ``"unknown"``."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return UNKNOWN_GROUP
    if math.isnan(value) or value < 0:
        return UNKNOWN_GROUP
    low = int(value // width) * width
    return f"{low}-{low + width - 1}"


def _group_value(value) -> str:
    import pandas as pd

    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return UNKNOWN_GROUP
    text = str(value).strip()
    # CSV round trips turn missing values into these strings.
    return UNKNOWN_GROUP if text.lower() in ("", UNKNOWN_GROUP, "nan", "none", "<na>") else text


def subgroup_table(labels, probs, groups: dict[str, Sequence], class_names: Sequence[str], min_count: int = 1):
    """B-ACC, macro AUROC and ECE per value of each metadata attribute, with the sample count of each group.

    Missing values form the group ``"unknown"``; groups with fewer than ``min_count`` samples are left out.
    A group lacking some classes is scored over the classes it has (no warnings: small groups always do).
    """
    import pandas as pd

    labels, probs = _check(labels, probs)
    if len(class_names) != probs.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} probability columns")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for attribute, values in groups.items():
            values = list(values)
            if len(values) != len(labels):
                raise ValueError(f"subgroup {attribute!r} has {len(values)} values for {len(labels)} samples")
            keys = np.array([_group_value(v) for v in values], dtype=object)
            for group in sorted(set(keys.tolist())):
                mask = keys == group
                if mask.sum() < min_count:
                    continue
                rows.append(
                    {
                        "attribute": attribute,
                        "group": group,
                        "n": int(mask.sum()),
                        "balanced_accuracy": balanced_accuracy(labels[mask], probs[mask]),
                        "auroc_macro": macro_auroc(labels[mask], probs[mask]),
                        "ece": expected_calibration_error(labels[mask], probs[mask]),
                    }
                )
    return pd.DataFrame(rows, columns=list(SUBGROUP_COLUMNS))


def largest_gap(table, metric: str) -> dict[str, dict]:
    """Per attribute, the best and worst known group on ``metric`` and their gap (the flagged disparity).

    ``{attribute: {"gap", "best", "worst", "best_n", "worst_n"}}``; "unknown" groups and nan values are not
    compared, and attributes with fewer than two comparable groups are left out. Lower is better for ECE.
    """
    gaps = {}
    for attribute, part in table.groupby("attribute", sort=False):
        known = part[(part["group"] != UNKNOWN_GROUP) & part[metric].notna()]
        if len(known) < 2:
            continue
        ordered = known.sort_values(metric, ascending=metric == "ece", kind="stable")
        best, worst = ordered.iloc[0], ordered.iloc[-1]
        gaps[attribute] = {
            "gap": float(abs(best[metric] - worst[metric])),
            "best": str(best["group"]),
            "worst": str(worst["group"]),
            "best_n": int(best["n"]),
            "worst_n": int(worst["n"]),
        }
    return gaps


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def metrics_markdown_table(metrics: dict, class_names: Sequence[str]) -> str:
    """Headline metrics (with ``[low, high]`` where a ``<metric>_ci`` entry exists), then a per-class table."""
    lines = ["| metric | value |", "|---|---|"]
    for key in ("balanced_accuracy", "auroc_macro", "ece", "brier", "nll", "accuracy"):
        if key in metrics:
            value = f"{metrics[key]:.4f}"
            if f"{key}_ci" in metrics:
                low, high = metrics[f"{key}_ci"]
                value += f" [{low:.4f}, {high:.4f}]"
            lines.append(f"| {key} | {value} |")
    if "num_samples" in metrics:
        lines.append(f"| num_samples | {metrics['num_samples']} |")
    lines += ["", "| class | support | recall | AUROC |", "|---|---|---|---|"]
    for name in class_names:
        entry = metrics.get("per_class", {}).get(name, {})
        lines.append(
            f"| {name} | {entry.get('support', 0)} | {entry.get('recall', math.nan):.4f} | "
            f"{entry.get('auroc', math.nan):.4f} |"
        )
    return "\n".join(lines)


def _pyplot():
    # Imported here, not at module level: importing this module must stay fast, and Agg needs no display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability_diagram(labels, probs, path, n_bins: int = 15) -> None:
    """Accuracy per confidence bin against the diagonal, with the ECE in the title; PNG at ``path``."""
    plt = _pyplot()
    labels, probs = _check(labels, probs)
    bins, _, correct = _calibration_bins(labels, probs, n_bins)
    bins = np.minimum(bins, n_bins - 1)  # draw confidence 1.0 in the top bar
    accuracy_per_bin = [correct[bins == b].mean() if np.any(bins == b) else np.nan for b in range(n_bins)]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.bar(
        np.arange(n_bins) / n_bins,
        accuracy_per_bin,
        width=1 / n_bins,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set(
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"ECE = {expected_calibration_error(labels, probs, n_bins):.3f}",
    )
    axis.legend(loc="upper left")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def _save_figure(figure, path) -> None:
    """Write a figure whole or not at all (rendered in memory, then an atomic write); the format from the suffix."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def plot_confusion_matrix(labels, probs, class_names: Sequence[str], path, normalize: bool = True) -> None:
    """Confusion matrix of argmax predictions (rows: true class, normalised to recall by default); PNG."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
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
            axis.text(
                j,
                i,
                f"{matrix[i, j]:.2f}" if normalize else int(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > 0.5 * matrix.max() else "black",
                fontsize=8,
            )
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------------------


def _strict_json_value(value):
    """NumPy and non-finite values → plain JSON: an undefined metric (nan) or an infinity becomes null."""
    if isinstance(value, dict):
        return {str(key): _strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return _strict_json_value(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def to_strict_json(value, indent: int | None = 2) -> str:
    """JSON that every parser reads: json.dumps writes a bare ``NaN`` for nan, which is not JSON."""
    return json.dumps(_strict_json_value(value), indent=indent, allow_nan=False)
