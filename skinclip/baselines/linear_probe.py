"""Linear probe on the frozen vision features: the baseline a trained SkinCLIP-VL head has to beat.

    python -m skinclip.baselines.linear_probe configs/tables/ham10000_mini/probe.yaml

Reads a SkinCLIP-VL training config (the same vision tower, dataset and splits as train.py; the training-only
fields are ignored). Features per image: the first token (CLS) and the mean of the patch tokens of the cached
``vision_features`` column `(num_tokens, hidden)` → `(2 * hidden,)`; a dataset without that column gets it from
the config's vision tower (`skinclip.feature_cache.add_vision_features`, fp16 like the cache). The probe is
scikit-learn's ``StandardScaler`` + ``LogisticRegression(class_weight="balanced")``; C is chosen from
``probe_c_grid`` by balanced accuracy in a stratified k-fold cross-validation on the **train split only**
(grouped by ``group_id`` where the dataset has it, so images of one lesion never sit on both sides of a fold),
then refitted on the whole train split. The validation split is only scored (for temperature scaling,
`skinclip.run_calibration`), never used for fitting or choosing; the test split only scored.

Writes what train.py writes: ``validation_/test_predictions.csv`` and ``*_metrics.json``, plus ``run_info.json``
(chosen C, cross-validation scores, parameter count) and ``probe.safetensors`` (scaler and weights).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from skinclip.baselines.common import resolve_device, write_run_info, write_split_scores
from skinclip.errors import UserError
from skinclip.run_io import DataArguments, load_training_data, parse_config

logger = logging.getLogger("skinclip.baselines.linear_probe")


@dataclass
class ProbeArguments:
    output_dir: str = field(default="outputs/baselines/linear_probe")
    seed: int = field(default=42)
    device: str = field(default="auto", metadata={"help": "Where the vision tower runs when features are computed."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Images per feature batch."})
    probe_c_grid: list[float] = field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0],
        metadata={"help": "Inverse regularisation strengths tried by the cross-validation."},
    )
    probe_cv_folds: int = field(default=5, metadata={"help": "Folds (fewer when the rarest class has fewer groups)."})
    probe_max_iter: int = field(default=5000)
    probe_prefix_tokens: int = field(
        default=1,
        metadata={"help": "Tokens before the patches in the cached rows (CLS, registers); the first is CLS."},
    )


def _training_only_fields() -> set[str]:
    """Fields of train.py's training arguments that a probe has no use for (read from the config, then dropped)."""
    from trainer_cfa import CFATrainingArguments

    return {f.name for f in fields(CFATrainingArguments)} - {f.name for f in fields(ProbeArguments)}


def parse_arguments(argv: list[str]):
    """(ModelArguments, DataArguments, ProbeArguments) from a training config; unknown fields stay errors."""
    from skinclip.training import ModelArguments

    training_only = _training_only_fields()

    def drop_training_fields(values: dict) -> None:
        for name in [name for name in values if name in training_only]:
            del values[name]

    model_args, data_args, args = parse_config(
        argv, (ModelArguments, DataArguments, ProbeArguments), adjust=drop_training_fields
    )
    if not args.probe_c_grid or any(c <= 0 for c in args.probe_c_grid):
        raise UserError(f"probe_c_grid must list positive numbers, got {args.probe_c_grid}")
    if args.probe_cv_folds < 2:
        raise UserError(f"probe_cv_folds must be >= 2, got {args.probe_cv_folds}")
    if args.probe_prefix_tokens < 1:
        raise UserError(f"probe_prefix_tokens must be >= 1 (the CLS token), got {args.probe_prefix_tokens}")
    return model_args, data_args, args


def probe_features(tokens: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """`(n, num_tokens, hidden)` tokens, prefix first → `(n, 2 * hidden)`: [CLS token, mean of the patch tokens]."""
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 3 or tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(f"expected (n, tokens > {num_prefix_tokens}, hidden) vision tokens, got {tokens.shape}")
    return np.concatenate([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(axis=1)], axis=1)


def split_features(split_dataset, num_prefix_tokens: int, batch_size: int = 256) -> np.ndarray:
    """The probe features of every row of a split that holds the ``vision_features`` column."""
    from skinclip.feature_cache import FEATURES_COLUMN

    columns = split_dataset.select_columns([FEATURES_COLUMN]).with_format("numpy")
    parts = [probe_features(batch[FEATURES_COLUMN], num_prefix_tokens) for batch in columns.iter(batch_size=batch_size)]
    return np.concatenate(parts)


def dataset_with_features(
    dataset, splits: list[str], model_args, args, class_names: list[str], dataset_path: str
) -> tuple[dict, str]:
    """``{split: Dataset with vision_features}`` and where the features came from: a column of the dataset, the
    store train.py keeps beside it (`skinclip.feature_cache.with_stored_vision_features`), or the tower."""
    from datasets import load_from_disk

    from skinclip.feature_cache import (
        FEATURES_COLUMN,
        KEY_COLUMN,
        stored_features_folder,
        vision_features_key,
        with_stored_vision_features,
    )
    from skinclip.run_io import image_ids_of
    from skinclip.training import build_config

    config = build_config(model_args, class_names)
    expected = vision_features_key(config.vision_config)
    if all(FEATURES_COLUMN in dataset[split].column_names for split in splits):
        for split in splits:
            keys = set(dataset[split][KEY_COLUMN]) if KEY_COLUMN in dataset[split].column_names else {expected}
            if keys != {expected}:
                raise UserError(
                    f"the {split!r} split's cached vision_features come from {sorted(keys)}, but the config's tower "
                    f"is {expected!r}: set the config's vision fields to that tower, or drop the column"
                )
        return {split: dataset[split] for split in splits}, f"cached column {FEATURES_COLUMN} ({expected})"
    stores = [stored_features_folder(dataset_path, expected, split, image_ids_of(dataset[split])) for split in splits]
    if all((store / "state.json").is_file() for store in stores):
        # The tower's output for these rows, stored by an earlier train.py run (or probe) on the same dataset.
        return {split: load_from_disk(str(store)) for split, store in zip(splits, stores)}, f"stored ({expected})"

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    model = SkinClipVLModel(config, device=resolve_device(args.device)).eval()
    if model.vision.num_prefix_tokens != args.probe_prefix_tokens:
        raise UserError(
            f"probe_prefix_tokens is {args.probe_prefix_tokens} but the tower {expected!r} puts "
            f"{model.vision.num_prefix_tokens} tokens before its patches: set probe_prefix_tokens to that"
        )
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    with_features = {split: dataset[split] for split in splits}
    with_stored_vision_features(with_features, splits, dataset_path, model, processor, image_ids_of)
    return with_features, f"computed with {expected} (stored beside the dataset)"


def cross_validation(train_dataset, labels: np.ndarray, args):
    """The folds of the C search: stratified, grouped by ``group_id`` when present; fewer where classes are small."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = np.asarray(train_dataset["group_id"]) if "group_id" in train_dataset.column_names else None
    if groups is not None:
        smallest = min(len(set(groups[labels == k])) for k in np.unique(labels))
    else:
        smallest = int(np.bincount(labels)[np.unique(labels)].min())
    folds = min(args.probe_cv_folds, smallest)
    if folds < 2:
        raise UserError(
            f"the train split's rarest class has {smallest} {'lesion' if groups is not None else 'image'}(s): "
            "cross-validation needs at least 2"
        )
    kind = StratifiedGroupKFold if groups is not None else StratifiedKFold
    return kind(n_splits=folds, shuffle=True, random_state=args.seed), groups


def fit_probe(features: np.ndarray, labels: np.ndarray, cv, groups, args):
    """GridSearchCV over C (balanced accuracy), refitted on every train row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(
        StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=args.probe_max_iter)
    )
    search = GridSearchCV(
        pipeline,
        {"logisticregression__C": list(args.probe_c_grid)},
        scoring="balanced_accuracy",
        cv=cv,
        refit=True,
    )
    search.fit(features, labels, groups=groups)
    return search


def class_probabilities(search, features: np.ndarray, num_classes: int) -> np.ndarray:
    """`(n, num_classes)`: a class absent from the train split gets probability 0."""
    probs = np.zeros((len(features), num_classes))
    probs[:, search.classes_] = search.predict_proba(features)
    return probs


def save_probe(output_dir: Path, search) -> None:
    """``probe.safetensors``: the scaler's mean/scale and the logistic regression's weights (no pickle)."""
    import torch
    from safetensors.torch import save_file

    scaler, regression = search.best_estimator_[0], search.best_estimator_[-1]
    tensors = {
        "scaler.mean": scaler.mean_,
        "scaler.scale": scaler.scale_,
        "coef": regression.coef_,
        "intercept": regression.intercept_,
        "classes": np.asarray(regression.classes_, dtype=np.int64),
    }
    save_file(
        {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in tensors.items()}, str(output_dir / "probe.safetensors")
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dataset = load_training_data(data_args, args.seed)
    class_names = dataset[data_args.train_split].features["label"].names
    scored = [s for s in (data_args.eval_split, data_args.test_split) if s]
    splits, source = dataset_with_features(
        dataset, [data_args.train_split, *scored], model_args, args, class_names, data_args.dataset_path
    )
    labels = np.asarray(splits[data_args.train_split]["label"], dtype=int)
    features = split_features(splits[data_args.train_split], args.probe_prefix_tokens)
    cv, groups = cross_validation(splits[data_args.train_split], labels, args)
    search = fit_probe(features, labels, cv, groups, args)
    logger.info("C = %s (cross-validated balanced accuracy %.4f)", search.best_params_, search.best_score_)

    output_dir = Path(args.output_dir)
    metrics: dict[str, dict] = {}
    for split in scored:
        probs = class_probabilities(search, split_features(splits[split], args.probe_prefix_tokens), len(class_names))
        metrics[split] = write_split_scores(output_dir, split, dataset[split], probs, class_names)
        logger.info("%s: %s", split, metrics[split])
    save_probe(output_dir, search)
    regression = search.best_estimator_[-1]
    write_run_info(
        output_dir,
        runner="linear_probe",
        features=f"[CLS, mean of patch tokens] of the frozen vision tower, {features.shape[1]} values; {source}",
        class_names=class_names,
        dataset_path=data_args.dataset_path,
        chosen_c=float(search.best_params_["logisticregression__C"]),
        c_grid=list(args.probe_c_grid),
        cv=f"{type(cv).__name__}(n_splits={cv.get_n_splits()}) on {data_args.train_split!r}, balanced accuracy",
        cv_mean_balanced_accuracy={
            str(c): float(s)
            for c, s in zip(search.cv_results_["param_logisticregression__C"], search.cv_results_["mean_test_score"])
        },
        trainable_parameters=int(regression.coef_.size + regression.intercept_.size),
    )
    return metrics


if __name__ == "__main__":
    main()
