"""What every baseline shares with ``train.py``: config parsing, data loading, metrics and output files.

The data and the files come from ``train.py`` itself (`load_yaml_config`, `DataArguments`,
`load_training_data`, `write_predictions`) and the metrics from `skinclip_metrics`, the functions the CFA
trainer's ``compute_metrics`` uses: a baseline and SkinCLIP-VL are scored on the same rows by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml


def parse_config(argv: Sequence[str], dataclass_types: tuple) -> tuple:
    """``[config.yaml, --field=value, ...]`` → dataclasses, with train.py's semantics (``extends:``, YAML values)."""
    from transformers import HfArgumentParser

    from train import load_yaml_config

    parser = HfArgumentParser(dataclass_types)
    if not argv or not str(argv[0]).endswith((".yaml", ".yml")):
        return parser.parse_args_into_dataclasses(args=list(argv))
    values = load_yaml_config(Path(argv[0]))
    for override in argv[1:]:
        if not override.startswith("--") or "=" not in override:
            raise ValueError(f"override {override!r} must look like --field=value")
        key, value = override[2:].split("=", 1)
        values[key] = yaml.safe_load(value)
    return parser.parse_dict(_numbers_from_strings(values, dataclass_types), allow_extra_keys=False)


def _numbers_from_strings(values: dict, dataclass_types: tuple) -> dict:
    """YAML 1.1 reads ``3e-3`` (no dot) as a string: turn such strings into the float/int a field declares."""
    import dataclasses

    kinds = {f.name: f.type for cls in dataclass_types for f in dataclasses.fields(cls)}
    converted = dict(values)
    for key, value in values.items():
        kind = kinds.get(key)
        if isinstance(value, str) and kind in (float, "float", int, "int"):
            try:
                converted[key] = float(value) if kind in (float, "float") else int(value)
            except ValueError as error:
                raise ValueError(f"{key}: {value!r} is not a number") from error
    return converted


def load_data(data_args, seed: int):
    """The DatasetDict exactly as train.py sees it (demo generation, split checks, stratified train fraction)."""
    from train import load_training_data

    return load_training_data(data_args, seed)


def write_split_outputs(output_dir: str | Path, split: str, image_ids, labels: np.ndarray, probs: np.ndarray,
                        class_names: list[str], extra: dict | None = None) -> dict[str, float]:
    """Write ``<split>_predictions.csv`` and ``<split>_metrics.json`` as train.py does; return the metrics."""
    from skinclip.classification_metrics import headline_metrics
    from train import write_predictions

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    metrics = {**headline_metrics(labels, probs), **(extra or {})}
    write_predictions(output_dir / f"{split}_predictions.csv", image_ids, labels, probs, class_names)
    (output_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def image_ids_of(split_dataset) -> list:
    if "image_id" in split_dataset.column_names:
        return list(split_dataset["image_id"])
    return list(range(len(split_dataset)))


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
