"""Evaluate a SkinCLIP-VL checkpoint on a dataset split: metrics, calibration, conformal sets, subgroups.

    python evaluate_skinclip.py --model outputs/isic2019 --dataset data/isic2019 --split test --out eval/
    python evaluate_skinclip.py --model outputs/isic2019 --dataset data/isic2024 --split test --out eval-ood/

Writes to ``--out``: ``predictions.csv`` (probability per class, before and after temperature scaling),
``metrics.json`` and ``metrics.md`` (B-ACC, macro and per-class AUROC, recall, ECE (15 bins, top-label, L1),
Brier, NLL, bootstrap 95% CIs, before/after temperature scaling), ``reliability.png``,
``confusion_matrix.png``, ``subgroups.csv``/``.md`` (by sex, age band, site and other metadata columns, with
the largest gap flagged), and for ISIC-2019 classes the challenge submission CSV. ``--rationales N`` also
generates the written rationale of the split's first N rows and scores whether each names the class head's
top class (``skinclip.agreement``): ``rationale_agreement`` (rate) and ``_counts`` in metrics.json/.md, each
row in ``rationales.csv``; off by default, as generation costs far more than classification. A binary dataset
(e.g. ISIC 2024) evaluated with a multi-class model is scored out of distribution through the malignant
score (sum of the malignant classes' probabilities), with the ISIC 2024 partial AUC above 80% TPR.

Temperature scaling and split-conformal prediction are fitted on ``--calibration-split`` (default
``validation``); ``--save-calibration`` stores them as ``calibration.json`` in the checkpoint, where
``AutoModel.from_pretrained`` (temperature) and ``predict.py`` (prediction sets) pick them up.
(Never name this module ``evaluate.py``: it would shadow the Hugging Face ``evaluate`` package.)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from skinclip import classification_metrics as sm
from skinclip import validation
from skinclip.errors import UserError
from skinclip.inference import split_logits
from skinclip.labels import ISIC2019_CLASSES
from skinclip.output_folder import OutputFolder, PreviousRun, atomic_write_text, owned_and_foreign, refuse_symlinks

SUBGROUP_COLUMNS = {
    "sex": ("sex", "gender"),
    "site": ("anatom_site_general", "site", "location", "localization"),
}
AGE_COLUMNS = ("age_approx", "age", "age_years")
TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search interval of the fitted temperature
# Every file an evaluation may write into --out: a previous evaluation's (listed in the manifest) is replaced whole;
# other files the project wrote there (predict.py's heatmaps, say) are not this command's to replace.
EVALUATION_FILES = frozenset(
    {
        "predictions.csv",
        "metrics.json",
        "metrics.md",
        "calibration.json",
        "reliability.png",
        "confusion_matrix.png",
        "subgroups.csv",
        "subgroups.md",
        "isic2019_submission.csv",
        "rationales.csv",
    }
)


def subgroup_values(split, num_rows: int) -> dict[str, list]:
    """Metadata columns to stratify by: sex, age band, site, and any other short categorical column."""
    columns = split.column_names
    groups: dict[str, list] = {}
    for name, candidates in SUBGROUP_COLUMNS.items():
        column = next((c for c in candidates if c in columns), None)
        if column:
            groups[name] = split[column]
    age_column = next((c for c in AGE_COLUMNS if c in columns), None)
    if age_column:
        groups["age_band"] = [sm.age_band(a) for a in split[age_column]]
    skip = {
        "image",
        "image_id",
        "label",
        "metadata_text",
        "report",
        "group_id",
        age_column,
        *(c for cands in SUBGROUP_COLUMNS.values() for c in cands),
    }
    for column in columns:
        if column in skip:
            continue
        values = split[column]
        distinct = {v for v in values if v not in (None, "")}
        if isinstance(next(iter(distinct), None), str) and 1 < len(distinct) <= 20:
            groups[column] = values
    return {k: v for k, v in groups.items() if len(v) == num_rows}


def evaluate(
    model,
    processor,
    dataset,
    split_name: str,
    out_dir: Path,
    calibration_split: str | None = "validation",
    coverage: float = 0.9,
    conformal_method: str = "aps",
    n_bootstrap: int = 1000,
    batch_size: int = 16,
    progress: bool = True,
    seed: int = 0,
    rationales: int = 0,
    max_new_tokens: int | None = None,
    positive_class: str | None = None,
    malignant_classes: list[str] | None = None,
    checkpoint: str | None = None,
) -> dict:
    """Run the whole evaluation and write every report file; returns the metrics dict.

    ``rationales`` > 0 generates the rationales of the split's first rows (at most ``max_new_tokens`` tokens each,
    default the checkpoint's ``max_rationale_tokens``) and adds their agreement with the class head.
    A binary split scored with a multi-class model takes its positive class and the malignant classes from
    ``positive_class`` / ``malignant_classes`` or the split's own labels (`validation.binary_positive_class`,
    `validation.malignant_class_set`); the report names both and where they came from.
    Logits that are not finite (a checkpoint whose weights overflow) are a `UserError` naming ``checkpoint``
    (default: the model's ``name_or_path``), raised before any file is written.
    """
    import pandas as pd

    class_names = model.config.class_names
    # Every split is checked before anything is computed or written (an empty one crashed half-way).
    in_model_classes = validation.check_evaluation_splits(
        dataset, split_name, calibration_split, class_names, "dataset"
    )
    split = dataset[split_name]
    data_classes = split.features["label"].names
    if not in_model_classes:
        positive, positive_from = validation.binary_positive_class(data_classes, class_names, positive_class)
        malignant, malignant_from = validation.malignant_class_set(positive, class_names, malignant_classes)
        print(
            f"note: binary split scored out of distribution: positive class {positive!r} (from {positive_from}); "
            f"malignant score = sum of P({', '.join(malignant)}) (from {malignant_from})",
            file=sys.stderr,
        )
    checkpoint = checkpoint or getattr(model, "name_or_path", "") or "the checkpoint"
    labels = np.asarray(split["label"], dtype=int)
    logits = require_finite(
        split_logits(model, processor, split, batch_size, progress), "logits", split_name, checkpoint
    )

    calibration: dict = {}
    predictor = None
    if calibration_split and calibration_split in dataset and in_model_classes:
        calibration_logits = require_finite(
            split_logits(model, processor, dataset[calibration_split], batch_size, progress),
            "logits",
            calibration_split,
            checkpoint,
        )
        calibration_labels = np.asarray(dataset[calibration_split]["label"], dtype=int)
        temperature = float(sm.fit_temperature(calibration_logits, calibration_labels, bounds=TEMPERATURE_BOUNDS))
        predictor = sm.SplitConformal(method=conformal_method, coverage=coverage, seed=seed)
        predictor.fit(sm.apply_temperature(calibration_logits, temperature), calibration_labels)
        calibration = {
            "temperature": temperature,
            "fitted_on": calibration_split,
            "conformal": {
                "method": conformal_method,
                "coverage": coverage,
                "qhat": float(predictor.qhat),
                **(
                    {"raps_lambda": predictor.raps_lambda, "raps_k_reg": predictor.raps_k_reg}
                    if conformal_method == "raps"
                    else {}
                ),
            },
        }
        bound_warning = temperature_bound_warning(temperature, calibration_split)
        if bound_warning:
            warnings.warn(bound_warning, stacklevel=2)
            calibration["warning"] = bound_warning
    elif calibration_split and calibration_split not in dataset:
        warnings.warn(
            f"no {calibration_split!r} split: temperature scaling and conformal sets are skipped", stacklevel=2
        )

    temperature = calibration.get("temperature", 1.0)
    probs_raw = sm.apply_temperature(logits, 1.0)
    probs = require_finite(sm.apply_temperature(logits, temperature), "probabilities", split_name, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a checkpoint that cannot be scored writes nothing
    ids = split["image_id"] if "image_id" in split.column_names else [str(i) for i in range(len(split))]

    frame = pd.DataFrame(probs, columns=class_names)
    frame.insert(0, "label", [data_classes[i] for i in labels])
    frame.insert(0, "image_id", ids)
    for index, name in enumerate(class_names):
        frame[f"{name}_uncalibrated"] = probs_raw[:, index]
    atomic_write_text(out_dir / "predictions.csv", frame.to_csv(index=False))

    report: dict = {
        "split": split_name,
        "num_images": int(len(labels)),
        "classes": class_names,
        "temperature": temperature,
    }
    report["calibration"] = calibration or None
    if "warning" in calibration:
        report["temperature_warning"] = calibration["warning"]
    if in_model_classes:
        report["uncalibrated"] = sm.classification_metrics(labels, probs_raw, class_names)
        report["calibrated"] = (
            sm.classification_metrics_with_ci(labels, probs, class_names, n_resamples=n_bootstrap, seed=seed)
            if n_bootstrap > 0
            else sm.classification_metrics(labels, probs, class_names)
        )
        sm.plot_reliability_diagram(labels, probs, out_dir / "reliability.png", n_bins=15)
        sm.plot_confusion_matrix(labels, probs, class_names, out_dir / "confusion_matrix.png")
        groups = subgroup_values(split, len(labels))
        if groups:
            table = sm.subgroup_table(labels, probs, groups, class_names)
            atomic_write_text(out_dir / "subgroups.csv", table.to_csv(index=False))
            report["subgroup_largest_gaps"] = _largest_gaps(table)
            atomic_write_text(
                out_dir / "subgroups.md", table.to_markdown(index=False) if _has_tabulate() else table.to_string()
            )
        if predictor is not None:
            report["conformal"] = {
                **sm.conformal_report(predictor.predict_sets(probs), labels),
                "method": conformal_method,
                "target_coverage": coverage,
            }
        if set(ISIC2019_CLASSES) <= set(class_names):
            sm.write_isic2019_submission(out_dir / "isic2019_submission.csv", [str(i) for i in ids], probs, class_names)
    else:
        # Out of distribution: a multi-class model scored on a binary benign/malignant dataset.
        y_true = (labels == data_classes.index(positive)).astype(int)
        report["ood_binary"] = {
            **sm.ood_metrics(y_true, sm.malignant_score(probs, class_names, malignant)),
            "malignant_classes": malignant,
            "malignant_classes_from": malignant_from,
            "positive_class": positive,
            "positive_class_from": positive_from,
        }

    if rationales > 0:
        agreement = rationale_agreement(
            model, processor, split, rationales, out_dir, batch_size, max_new_tokens, progress
        )
        report.update(agreement_metrics(agreement))
    # Strict JSON: an undefined metric is null (json.dumps wrote a bare NaN, which parsers reject).
    atomic_write_text(out_dir / "metrics.json", sm.to_strict_json(report))
    atomic_write_text(out_dir / "metrics.md", _markdown(report, class_names))
    if calibration:
        atomic_write_text(out_dir / "calibration.json", sm.to_strict_json(calibration))
    return report


def require_finite(values: np.ndarray, what: str, split_name: str, checkpoint: str) -> np.ndarray:
    """``values`` (one row per image) if every one is finite; else a `UserError` naming the checkpoint and cause.

    A checkpoint whose weights are finite can still give inf logits (a product overflows float32), and softmax
    turns those into NaN probabilities: scored, they crashed the metrics after predictions.csv had been written
    with empty cells (issue 22).
    """
    bad_rows = int((~np.isfinite(values)).reshape(len(values), -1).any(axis=1).sum()) if len(values) else 0
    if bad_rows:
        raise UserError(
            f"{checkpoint}: the model gives non-finite {what} (inf or NaN) for {bad_rows} of {len(values)} images of "
            f"the {split_name!r} split: its weights overflow float32 (a diverged or corrupted training run); "
            "nothing was written"
        )
    return values


def agreement_metrics(agreement: dict) -> dict:
    """The metrics entries of a `rationale_agreement` result, the same in train.py's test_metrics.json and
    evaluate's metrics.json: ``rationale_agreement`` the rate (None when it could not be measured),
    ``rationale_agreement_counts`` everything (counts, generation settings, or why it is unavailable)."""
    return {"rationale_agreement": agreement.get("rate"), "rationale_agreement_counts": agreement}


def rationale_agreement(
    model,
    processor,
    split,
    rows: int,
    out_dir: Path,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate the rationales of the split's first ``rows`` rows; how many name the class head's top class.

    Writes ``rationales.csv`` (image id, true class, top class, the class the rationale names, the rationale) and
    returns the counts of `skinclip.agreement.RationaleReader.agreement` (``rate`` = agreeing rows / rows), with
    the generation settings. A model whose classes no converter writes reports for cannot be read: the result
    then says so instead of a rate.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from skinclip.agreement import RationaleReader
    from skinclip.inference import predict_batch

    class_names = model.config.class_names
    max_new_tokens = max_new_tokens or model.config.max_rationale_tokens
    settings = {"max_new_tokens": max_new_tokens, "conditioning": model.config.rationale_conditioning}
    reader = RationaleReader.for_classes(class_names)
    if reader is None:
        return {
            **settings,
            "unavailable": f"no dataset converter writes reports naming the classes {class_names}",
        }
    subset = split.select(range(min(rows, len(split))))
    texts, predicted = [], []
    model.eval()
    for start in tqdm(range(0, len(subset), batch_size), desc="rationales", unit="batch", disable=not progress):
        batch = subset[start : start + batch_size]
        metadata = batch["metadata_text"] if "metadata_text" in batch else [""] * len(batch["image"])
        prediction, _ = predict_batch(model, processor, batch["image"], metadata, max_new_tokens)
        texts += processor.decode(prediction.rationale_ids)
        predicted += prediction.logits.argmax(-1).tolist()
    result = reader.agreement(texts, predicted)
    data_classes = subset.features["label"].names
    frame = pd.DataFrame(
        {
            "image_id": subset["image_id"] if "image_id" in subset.column_names else list(range(len(subset))),
            "label": [data_classes[i] for i in subset["label"]],
            "top_class": [class_names[i] for i in predicted],
            "rationale_names": result.pop("named_classes"),
            "rationale": texts,
        }
    )
    atomic_write_text(out_dir / "rationales.csv", frame.to_csv(index=False))
    return {**result, **settings}


def save_calibration(calibration: dict | None, checkpoint: Path) -> None:
    """``--save-calibration``: the one way a calibration reaches a checkpoint (from_pretrained applies it)."""
    if not calibration:
        warnings.warn(
            "--save-calibration: no calibration was fitted (no calibration split, or an out-of-"
            "distribution dataset); the checkpoint is left unchanged",
            stacklevel=2,
        )
        return
    atomic_write_text(checkpoint / "calibration.json", sm.to_strict_json(calibration))


def temperature_bound_warning(temperature: float, calibration_split: str) -> str | None:
    """A warning when the fitted temperature sits at an end of its search interval: the calibration split did
    not determine it (a model always right on it drives T to the lower bound), so it is not a calibration."""
    reasons = ("a model always right on it", "a model no better than chance on it")
    for bound, reason in zip(TEMPERATURE_BOUNDS, reasons):
        if abs(np.log(temperature / bound)) < 1e-3:
            return (
                f"the temperature fitted on {calibration_split!r} ({temperature:.4g}) sits at its search bound "
                f"{bound}: that split does not determine it (too few images, or {reason}); treat the "
                "calibration as unreliable"
            )
    return None


def _largest_gaps(table) -> dict:
    gaps = {}
    for metric in ("balanced_accuracy", "auroc_macro", "ece"):
        try:
            gaps[metric] = sm.largest_gap(table, metric)
        except Exception as error:  # a gap needs two groups with a defined value; say why it is absent
            gaps[metric] = f"undefined ({error})"
    return gaps


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)
    except ImportError:
        return False
    return True


def _markdown(report: dict, class_names: list[str]) -> str:
    lines = [f"# Evaluation on `{report['split']}` ({report['num_images']} images)", ""]
    if "calibrated" in report:
        lines.append(sm.metrics_markdown_table(report["calibrated"], class_names))
        before, after = report["uncalibrated"], report["calibrated"]
        lines += [
            "",
            f"Temperature scaling (T = {report['temperature']:.3f}):",
            "",
            "| | ECE | NLL | Brier |",
            "|---|---|---|---|",
            f"| before | {before['ece']:.4f} | {before['nll']:.4f} | {before['brier']:.4f} |",
            f"| after | {after['ece']:.4f} | {after['nll']:.4f} | {after['brier']:.4f} |",
        ]
        if "ci" in after:
            skipped = after["ci"]["skipped"]
            for name in skipped:
                low, high = after[f"{name}_ci"]
                lines.append(
                    f"\n95% bootstrap CI of {name}: [{low:.4f}, {high:.4f}] "
                    f"({after['ci']['n_resamples'] - skipped[name]} resamples)"
                )
        if "conformal" in report:
            c = report["conformal"]
            lines.append(
                f"\nConformal ({c['method']}, target {c['target_coverage']:.0%}): empirical coverage "
                f"{c['coverage']:.3f}, mean set size {c['mean_set_size']:.2f}"
            )
    agreement = report.get("rationale_agreement_counts")
    if agreement:
        conditioning = f"rationale_conditioning: {agreement['conditioning']}"
        if "unavailable" in agreement:
            lines.append(f"\nRationale agreement: not measured ({agreement['unavailable']}).")
        else:
            lines.append(
                f"\nRationale agreement with the top class ({agreement['rows']} rows, {conditioning}): "
                f"{agreement['rate']:.3f} ({agreement['agree']} agree, {agreement['disagree']} name another class, "
                f"{agreement['none']} name none, {agreement['ambiguous']} name several; rationales.csv)"
            )
    if "ood_binary" in report:
        ood = report["ood_binary"]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in ood.items() if isinstance(v, float)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--dataset", required=True, help="DatasetDict directory written by datasets_scripts")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibration-split", default="validation", help="'' to skip calibration")
    coverage = validation.cli_number(float, 0, 1, low_open=True, high_open=True)
    parser.add_argument("--coverage", type=coverage, default=0.9)
    parser.add_argument("--conformal-method", default="aps", choices=("aps", "raps", "lac"))
    resamples = validation.cli_number(int, 0)
    parser.add_argument("--bootstrap", type=resamples, default=1000, help="bootstrap resamples for 95%% CIs (0 = off)")
    parser.add_argument("--batch-size", type=validation.cli_number(int, 1), default=16)
    parser.add_argument("--save-calibration", action="store_true", help="write calibration.json into the checkpoint")
    parser.add_argument(
        "--positive-class", default=None, help="binary split: its positive (malignant) class, when its names do not say"
    )
    parser.add_argument(
        "--malignant-classes",
        default=None,
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        help="binary split: the model's classes summed into the malignant score (default MEL,BCC,SCC)",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--rationales",
        type=validation.cli_number(int, 0),
        default=0,
        metavar="N",
        help="generate the rationales of the first N rows and report their agreement with the top class (0 = off)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=validation.cli_number(int, 1),
        default=None,
        help="rationale length limit (default: max_rationale_tokens)",
    )
    args = parser.parse_args(argv)
    validation.check_evaluation_arguments(args)
    if args.save_calibration and not Path(args.model).is_dir():
        raise UserError("--save-calibration needs a local checkpoint directory for --model")

    from modeling_skinclip import SkinClipVLProcessor

    # Data and labels are checked against the checkpoint's config before the model is built.
    dataset = validation.load_dataset_dict(args.dataset, "--dataset")
    class_names = validation.load_checkpoint_config(args.model).class_names
    in_model_classes = validation.check_evaluation_splits(
        dataset, args.split, args.calibration_split or None, class_names, args.dataset
    )
    if not in_model_classes:  # refused before the model is built when the split does not say
        names = dataset[args.split].features["label"].names
        positive, _ = validation.binary_positive_class(names, class_names, args.positive_class)
        validation.malignant_class_set(positive, class_names, args.malignant_classes)
    model = validation.load_checkpoint(args.model, device=args.device)
    model.calibration_temperature.fill_(1.0)  # evaluate raw logits; the calibration is refitted here
    processor = SkinClipVLProcessor.from_pretrained(args.model)
    out_dir = Path(args.out)
    # --out is locked while written (a second evaluation into it is refused), and no write follows a symlink.
    # A previous evaluation in --out is set aside while this one runs: replaced by it whole if it finishes, given
    # back if it fails (a full disk half-way would have left the two evaluations' files mixed).
    with OutputFolder(out_dir, "evaluate_skinclip.py") as folder:
        refuse_symlinks(out_dir)
        previous_evaluation = [name for name in owned_and_foreign(out_dir)[0] if name in EVALUATION_FILES]
        with PreviousRun(folder, previous_evaluation):
            report = evaluate(
                model,
                processor,
                dataset,
                args.split,
                out_dir,
                args.calibration_split or None,
                args.coverage,
                args.conformal_method,
                args.bootstrap,
                args.batch_size,
                rationales=args.rationales,
                max_new_tokens=args.max_new_tokens,
                positive_class=args.positive_class,
                malignant_classes=args.malignant_classes,
                checkpoint=args.model,
            )
        if args.save_calibration:
            save_calibration(report["calibration"], Path(args.model))
    print((out_dir / "metrics.md").read_text())
    return report
