"""The `evaluate` metric of this project (metrics/skin_lesion_classification), loaded by path, and as a Trainer
``compute_metrics``.

Always by absolute path: `evaluate.load` treats a relative ``a/b`` that is not a folder under the working
directory as a Hub id and would fetch code from the Hub. The folder sits in the checkout, not in a built wheel:
these helpers need a checkout (an editable install).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "skin_lesion_classification"


def load_skin_lesion_metric(inputs: str = "logits", **load_kwargs):
    """``evaluate.load`` of the local metric; ``inputs`` is "logits" or "probabilities" (its configuration).

    Kept in memory by default (no Arrow cache files; Trainer gathers the predictions of every process before
    ``compute_metrics``, so nothing needs to be shared on disk).
    """
    import evaluate

    if not (METRIC_DIR / f"{METRIC_DIR.name}.py").is_file():
        raise FileNotFoundError(f"{METRIC_DIR}: the metric script is not there (it ships in the source checkout)")
    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRIC_DIR), inputs, **load_kwargs)


def evaluate_compute_metrics(inputs: str = "logits", **load_kwargs) -> Callable[..., dict[str, float]]:
    """A Trainer ``compute_metrics``: the metric on an ``EvalPrediction`` (``predictions`` the class logits by
    default, or the first array of a tuple of model outputs; ``label_ids`` the class indices)."""
    metric = load_skin_lesion_metric(inputs, **load_kwargs)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        labels = np.asarray(eval_prediction.label_ids).astype(int).reshape(-1)
        return metric.compute(predictions=np.asarray(predictions), references=labels)

    return compute_metrics
