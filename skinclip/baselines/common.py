"""What the baselines share beyond `skinclip.run_io` (train.py's config rules, data and files): run info, device.

Configs, data and the ``<split>_*`` files come from `skinclip.run_io`, the module train.py uses, and the metrics
from `skinclip.classification_metrics.headline_metrics`, the trio the CFA trainer's ``compute_metrics`` gives: a
baseline and SkinCLIP-VL are scored on the same rows by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_split_scores(
    output_dir: str | Path, split: str, split_dataset, probs: np.ndarray, class_names: list[str]
) -> dict[str, float]:
    """The headline metrics of ``probs`` on a split, written as train.py writes its own; returns them."""
    from skinclip.classification_metrics import headline_metrics
    from skinclip.run_io import image_ids_of, write_split_outputs

    labels = np.asarray(split_dataset["label"]).astype(int)
    return write_split_outputs(
        output_dir, split, image_ids_of(split_dataset), labels, probs, class_names, headline_metrics(labels, probs)
    )


def write_run_info(output_dir: str | Path, **info) -> None:
    """``run_info.json``: what ran (model, parameter counts, class names) for the tables' Params column."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
