"""Leak-free splits shared by every converter: seeded, stratified by class, grouped by lesion/patient.

`make_splits` cuts the test split first and then the validation split from the rest, each with scikit-learn's
`StratifiedGroupKFold` (shuffled, seeded): the held-out part is one fold of ``round(1 / fraction)`` folds, so the
realised fraction is the nearest ``1 / k`` and never splits a group. `subsample_train` keeps a stratified
fraction of the TRAIN split only (the paper's 12% data-efficiency runs); validation and test stay whole.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

SPLIT_NAMES = ("train", "validation", "test")


def _hold_out_one_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """(kept, held_out) positions: one fold of a shuffled StratifiedGroupKFold with about ``fraction`` of rows."""
    positions = np.arange(len(labels))
    n_groups = len(np.unique(groups))
    if fraction <= 0 or n_groups < 2:
        return positions, positions[:0]
    # Small samples: scikit-learn refuses more folds than groups, or than members of the largest class.
    largest_class = np.unique(labels, return_counts=True)[1].max()
    n_splits = min(max(2, int(round(1.0 / fraction))), n_groups, largest_class)
    if n_splits < 2:
        return positions, positions[:0]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only k members": expected for rare classes in small samples.
        warnings.simplefilter("ignore", UserWarning)
        kept, held_out = next(splitter.split(positions, labels, groups))
    return kept, held_out


def make_splits(
    labels, groups, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, np.ndarray]:
    """Row indices of ``train`` / ``validation`` / ``test``, stratified by ``labels`` and grouped by ``groups``.

    ``groups`` must not contain missing values: give rows without a lesion/patient id their own group first
    (`unique_groups`). Every group lands in exactly one split. Sorted indices are returned.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups).astype(str)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D of one length, got {labels.shape} and {groups.shape}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}"
        )
    rest, test = _hold_out_one_fold(labels, groups, test_fraction, seed)
    val_of_rest = val_fraction / (1.0 - test_fraction) if val_fraction > 0 else 0.0
    train_of_rest, val_of_rest_idx = _hold_out_one_fold(labels[rest], groups[rest], val_of_rest, seed + 1)
    return {
        "train": np.sort(rest[train_of_rest]),
        "validation": np.sort(rest[val_of_rest_idx]),
        "test": np.sort(test),
    }


def unique_groups(group_ids, row_ids, prefix: str = "image:") -> list[str]:
    """Group id per row; a missing one (None/NaN/blank) becomes ``prefix + row id``, its own group."""
    result = []
    for group, row_id in zip(group_ids, row_ids):
        missing = group is None or (isinstance(group, float) and np.isnan(group)) or not str(group).strip()
        result.append(f"{prefix}{row_id}" if missing else str(group).strip())
    return result


def subsample_indices(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` of rows: ``max(1, round(fraction * n_c))`` per class."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def subsample_train(train, fraction: float, seed: int = 0, label_column: str = "label"):
    """Stratified ``fraction`` of the TRAIN split only.

    ``train`` is a `datasets.Dataset` (returns ``train.select(...)``) or an array of labels (returns positions).
    """
    if hasattr(train, "select") and hasattr(train, "column_names"):
        return train.select(subsample_indices(train[label_column], fraction, seed))
    return subsample_indices(train, fraction, seed)
