"""Skin-lesion classification metrics for Hugging Face `evaluate`: B-ACC, macro AUROC, ECE-15, Brier and NLL.

Load it by path (never by name: a bare ``owner/name`` that is not a local folder is looked up on the Hub)::

    metric = evaluate.load("/path/to/metrics/skin_lesion_classification")            # per-class probabilities
    metric = evaluate.load("/path/to/metrics/skin_lesion_classification", "logits")  # per-class logits

Every number comes from the project's ``skinclip.classification_metrics`` module (this script only adapts its
inputs), so the values equal those of its ``classification_metrics`` on the same probabilities, bit for bit.
The ``skinclip`` package must be importable: install the project (``pip install -e .``) or run from its root.
"""

import datasets
import evaluate
import numpy as np

from skinclip import classification_metrics as clf_metrics

INPUT_KINDS = ("probabilities", "logits")
METRIC_KEYS = ("balanced_accuracy", "auroc_macro", "ece", "brier", "nll")
# float32 softmax rows sum to 1 within a few 1e-7; logits passed by mistake miss by far more.
ROW_SUM_TOLERANCE = 1e-4

_DESCRIPTION = """
Headline metrics of a multi-class skin-lesion classifier, as the SkinCLIP-VL paper reports them:
balanced accuracy (mean per-class recall of the argmax), macro one-vs-rest AUROC, top-label expected calibration
error with 15 equal-width bins (L1, binned as torchmetrics' MulticlassCalibrationError), the multi-class Brier
score and the negative log-likelihood. Classes absent from the labels are left out of the B-ACC and AUROC
averages with a warning; an undefined value (AUROC with one class present) is nan.

Configurations: "probabilities" (the default; each row a distribution over the classes) and "logits" (class
logits, turned into probabilities by a float64 softmax, `classification_metrics.apply_temperature` at T = 1).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or an array of shape (n, C)): per-class probabilities (rows sum to
        1), or per-class logits with the "logits" configuration. C >= 2; column k is class k.
    references (`list` of `int`): the true class index of each row, in [0, C).
Returns:
    dict with `balanced_accuracy`, `auroc_macro`, `ece` (15 bins), `brier`, `nll`: floats.
Examples:
    >>> metric = evaluate.load("metrics/skin_lesion_classification")  # a path that exists from the working dir
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["balanced_accuracy"]
    1.0
"""

_CITATION = """
SkinCLIP-VL (the paper this project implements); Guo et al., On Calibration of Modern Neural Networks, ICML 2017
(ECE); Brier, Verification of forecasts expressed in terms of probability, Monthly Weather Review 1950.
"""


def probabilities_from(predictions, kind: str) -> np.ndarray:
    """(n, C) float64 probabilities from what the caller passed; refuses rows that are not distributions."""
    scores = np.asarray(predictions, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"predictions must be (num_samples, num_classes >= 2), got shape {scores.shape}")
    if kind == "logits":
        return clf_metrics.apply_temperature(scores, 1.0)
    row_sums = scores.sum(axis=1)
    if len(scores) and (scores.min() < 0 or scores.max() > 1 or np.abs(row_sums - 1).max() > ROW_SUM_TOLERANCE):
        raise ValueError(
            "predictions are not per-class probabilities (values in [0, 1], rows summing to 1); "
            "for logits load the metric with the 'logits' configuration"
        )
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SkinLesionClassification(evaluate.Metric):
    def _info(self):
        if self.config_name not in ("default", *INPUT_KINDS):
            raise ValueError(f"configuration {self.config_name!r}: use one of {list(INPUT_KINDS)}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 keeps float32 and float64 inputs exact on their way through the Arrow table.
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    @property
    def input_kind(self) -> str:
        return "probabilities" if self.config_name == "default" else self.config_name

    def _compute(self, predictions, references):
        probs = probabilities_from(predictions, self.input_kind)
        class_names = [str(k) for k in range(probs.shape[1])]
        result = clf_metrics.classification_metrics(np.asarray(references), probs, class_names)
        return {key: result[key] for key in METRIC_KEYS}
