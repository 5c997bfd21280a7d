"""Out-of-distribution evaluation (the paper's ISIC 2024 columns) of any run trained on ISIC 2019.

ISIC 2024 is binary (benign / malignant); an ISIC 2019 model gives 8-class probabilities. Its malignant score
is the probability mass on the malignant classes (`skinclip.classification_metrics.malignant_score`: MEL + BCC +
SCC), and the binary probabilities are ``[1 - score, score]``. From those (`classification_metrics.ood_metrics`, the
scorer evaluate_skinclip.py uses too):

* B-ACC: mean recall of benign and malignant at the argmax, i.e. at score > 0.5;
* AUROC: binary ROC AUC of the score;
* ECE: 15-bin top-label ECE of ``[1 - score, score]``;
* ``pauc_above_tpr_0.8``: partial AUC above 80% TPR (the ISIC 2024 challenge metric), beside the paper's three.

Files: ``ood_metrics.json`` and ``ood_predictions.csv`` (``image_id, label, benign, malignant``) in the run's
output directory, beside its ``test_metrics.json``.

    python -m skinclip.baselines.ood --checkpoint outputs/isic2019 --dataset data/isic2024 --split test
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skinclip.classification_metrics import malignant_score, ood_metrics, to_strict_json
from skinclip.labels import OOD_CLASSES
from skinclip.run_io import image_ids_of, write_predictions
from skinclip.validation import cli_number

OOD_PREFIX = "ood"


def load_ood_split(dataset_path: str | Path, split: str = "test"):
    """One split of a binary DatasetDict (``split="all"`` concatenates every split); checks the label names."""
    from datasets import concatenate_datasets, load_from_disk

    dataset = load_from_disk(str(dataset_path))
    if split == "all":
        part = concatenate_datasets([dataset[name] for name in dataset])
    elif split not in dataset:
        raise ValueError(f"OOD dataset {dataset_path} has no split {split!r} (it has {list(dataset)})")
    else:
        part = dataset[split]
    names = part.features["label"].names
    if sorted(names) != sorted(OOD_CLASSES):
        raise ValueError(f"OOD dataset {dataset_path} must have labels {list(OOD_CLASSES)}, got {names}")
    return part


def is_malignant(split_dataset) -> np.ndarray:
    names = split_dataset.features["label"].names
    return (np.asarray(split_dataset["label"]) == names.index("malignant")).astype(int)


def write_ood_outputs(
    output_dir: str | Path,
    image_ids,
    malignant: np.ndarray,
    class_probs: np.ndarray,
    class_names: Sequence[str],
    source: str = "",
) -> dict[str, float]:
    """Malignant score from multi-class probabilities → ``ood_predictions.csv`` and ``ood_metrics.json``."""
    scores = np.asarray(malignant_score(np.asarray(class_probs), list(class_names)), dtype=np.float64)
    metrics = ood_metrics(malignant, scores)
    metrics["source"] = str(source)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(
        output_dir / f"{OOD_PREFIX}_predictions.csv",
        image_ids,
        np.asarray(malignant).astype(int),
        np.stack([1.0 - scores, scores], axis=1),
        list(OOD_CLASSES),
    )
    (output_dir / f"{OOD_PREFIX}_metrics.json").write_text(to_strict_json(metrics))
    return metrics


def skinclip_class_probs(checkpoint: str | Path, split_dataset, batch_size: int = 16, device: str | None = None):
    """Class probabilities of a SkinCLIP-VL checkpoint (``model.predict``, no rationale) over a dataset split."""
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from skinclip.inference import split_probabilities

    model = SkinClipVLModel.from_pretrained(str(checkpoint), device=device)
    processor = SkinClipVLProcessor.from_pretrained(str(checkpoint))
    return split_probabilities(model, processor, split_dataset, batch_size), list(model.config.class_names)


def evaluate_skinclip_checkpoint(
    checkpoint: str | Path,
    dataset_path: str | Path,
    split: str = "test",
    output_dir: str | Path | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    part = load_ood_split(dataset_path, split)
    probs, class_names = skinclip_class_probs(checkpoint, part, batch_size=batch_size)
    return write_ood_outputs(
        output_dir or checkpoint,
        image_ids_of(part),
        is_malignant(part),
        probs,
        class_names,
        source=f"{dataset_path}:{split}",
    )


def binary_dataset_from(
    source_path: str | Path, output_dir: str | Path, malignant_classes: Sequence[str], splits: Sequence[str] = ("test",)
):
    """A benign/malignant DatasetDict from a multi-class one (the --tiny stand-in for ISIC 2024), saved in
    ``output_dir``. Nothing is written into ``source_path`` (map's cache of each split, images included, goes to a
    temporary folder beside ``output_dir`` that is deleted)."""
    import tempfile

    from datasets import ClassLabel, DatasetDict, load_from_disk

    source = load_from_disk(str(source_path))
    Path(output_dir).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".binary-labels-", dir=Path(output_dir).parent) as map_cache:
        result = {}
        for split in splits:
            part = source[split]
            names = part.features["label"].names
            malignant_ids = {names.index(name) for name in malignant_classes if name in names}
            if not malignant_ids:
                raise ValueError(f"none of {list(malignant_classes)} is a class of {source_path} ({names})")
            features = part.features.copy()
            features["label"] = ClassLabel(names=list(OOD_CLASSES))
            result[split] = part.map(
                lambda row, malignant_ids=malignant_ids: {"label": int(row["label"] in malignant_ids)},
                features=features,
                cache_file_name=str(Path(map_cache) / f"{split}.arrow"),
                desc="binary OOD labels",
            )
        DatasetDict(result).save_to_disk(str(output_dir))
        del result  # it maps the cache files
    return load_from_disk(str(output_dir))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="SkinCLIP-VL output directory (trained on ISIC 2019)")
    parser.add_argument("--dataset", required=True, help="binary DatasetDict (datasets_scripts.isic2024)")
    parser.add_argument("--split", default="test", help="split to score, or 'all'")
    parser.add_argument("--output_dir", default=None, help="where to write ood_*.* (default: the checkpoint)")
    parser.add_argument("--batch_size", type=cli_number(int, 1), default=16)
    args = parser.parse_args(argv)
    metrics = evaluate_skinclip_checkpoint(args.checkpoint, args.dataset, args.split, args.output_dir, args.batch_size)
    print(to_strict_json(metrics))
    return metrics


if __name__ == "__main__":
    main()
