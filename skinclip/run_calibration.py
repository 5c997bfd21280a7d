"""Temperature scaling and bootstrap intervals of a finished run, read from its prediction files alone.

Every runner (train.py, the baselines, the linear probe) writes ``validation_predictions.csv`` and
``test_predictions.csv`` (one probability per class). The temperature is fitted on the validation split with the
code ``evaluate_skinclip.py`` uses (`classification_metrics.fit_temperature`, its search bounds and its bound
warning) on the log-probabilities: ``log p`` differs from the logits only by a constant per row, so
``softmax(log p / T) == softmax(logits / T)``. The test metrics before and after, each with 95% bootstrap
intervals (`classification_metrics.classification_metrics_with_ci`), go to ``test_calibration.json``:

    {"temperature": T, "fitted_on": "validation", "uncalibrated": {...}, "calibrated": {...}, ...}

    python -m skinclip.run_calibration RUN_DIR [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from skinclip import classification_metrics as sm
from skinclip.csv_rows import find_problem, rows_with_lines
from skinclip.errors import UserError

CALIBRATION_FILE = "test_calibration.json"


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``<split>_predictions.csv`` → (labels `(n,)` as class indices, probabilities `(n, classes)`, class names)."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path} does not exist: the run wrote no predictions for that split")
    # Read back like user input: a file cut short or edited by hand is named, never a traceback or NaN metrics.
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "label": str})
    except pd.errors.ParserError as error:
        problem = find_problem(path.read_text(encoding="utf-8", errors="replace"))
        raise UserError(f"{path}: not a readable CSV ({problem or ' '.join(str(error).split())})") from error
    except (pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a readable CSV ({' '.join(str(error).split())})") from error
    if list(frame.columns[:2]) != ["image_id", "label"] or len(frame.columns) < 4:
        raise UserError(f"{path}: expected the columns image_id, label and 2+ classes, found {list(frame.columns)}")
    class_names = [str(name) for name in frame.columns[2:]]
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise UserError(f"{path}: labels {unknown} are not among its probability columns {class_names}")
    probs = frame[class_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(probs) & (probs >= 0) & (probs <= 1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            starts = [line for line, _ in rows_with_lines(handle)]  # the header's, then each row's first line
        raise UserError(
            f"{path}: {len(rows)} row(s) hold a probability that is empty, not a number or outside [0, 1] "
            f"(the first on line {starts[rows[0] + 1]}); write the predictions again"
        )
    return frame["label"].map(index).to_numpy(dtype=int), probs, class_names


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant; a probability written as 0 becomes the smallest positive float's log."""
    return np.log(np.clip(probs, np.finfo(np.float64).tiny, None))


def calibrate_run(
    run_dir: str | Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    calibration_split: str = "validation",
    split: str = "test",
) -> dict:
    """Fit T on ``calibration_split``'s predictions, score ``split`` before/after; write and return the report."""
    from skinclip.evaluation import TEMPERATURE_BOUNDS, temperature_bound_warning

    run_dir = Path(run_dir)
    fit_labels, fit_probs, fit_classes = read_predictions(run_dir / f"{calibration_split}_predictions.csv")
    labels, probs, class_names = read_predictions(run_dir / f"{split}_predictions.csv")
    if fit_classes != class_names:
        raise UserError(f"{run_dir}: {calibration_split} and {split} predictions name other classes")
    temperature = sm.fit_temperature(log_probabilities(fit_probs), fit_labels, bounds=TEMPERATURE_BOUNDS)
    calibrated = sm.apply_temperature(log_probabilities(probs), temperature)

    def scored(p: np.ndarray) -> dict:
        if n_bootstrap > 0:
            return sm.classification_metrics_with_ci(labels, p, class_names, n_resamples=n_bootstrap, seed=seed)
        return sm.classification_metrics(labels, p, class_names)

    report = {
        "split": split,
        "fitted_on": calibration_split,
        "num_fit_images": int(len(fit_labels)),
        "temperature": float(temperature),
        "n_bootstrap": n_bootstrap,
        "uncalibrated": scored(probs),
        "calibrated": scored(calibrated),
    }
    warning = temperature_bound_warning(temperature, calibration_split)
    if warning:
        report["temperature_warning"] = warning
    target = run_dir / CALIBRATION_FILE
    partial = target.with_name(target.name + ".partial")
    partial.write_text(sm.to_strict_json(report))
    partial.replace(target)  # atomic: a reader never sees half a file
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output_dir holding validation_/test_predictions.csv")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = calibrate_run(args.run_dir, n_bootstrap=args.bootstrap, seed=args.seed)
    print(f"T = {report['temperature']:.4f}; written {Path(args.run_dir) / CALIBRATION_FILE}")
    return report


if __name__ == "__main__":
    import sys

    from skinclip.errors import run_entry_point

    sys.exit(run_entry_point(main))
