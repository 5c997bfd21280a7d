"""ISIC 2024 (SLICE-3D) → binary `DatasetDict` for out-of-distribution evaluation of an ISIC 2019 model.

Layout (Kaggle "ISIC 2024 - Skin Cancer Detection with 3D-TBP")::

    train-metadata.csv    isic_id,target,patient_id,age_approx,sex,anatom_site_general,clin_size_long_diam_mm,...
    train-image.hdf5      one dataset per isic_id holding the JPEG bytes of the tile

Classes: benign (0), malignant (1) from ``target``. Columns that exist only for training leak the label and are
dropped before anything else: ``target`` (kept only as ``label``), ``lesion_id`` (filled almost only for
malignant lesions: even its presence leaks), every ``iddx_*`` and ``mel_*`` column and
``tbp_lv_dnn_lesion_confidence``. The prompt uses age, sex, body site and the longest diameter. Rows are
grouped by ``patient_id``. Images stream from the HDF5 file into the saved dataset (never all in memory).

Scoring an ISIC 2019 model: P(malignant) = P(MEL) + P(BCC) + P(SCC)
(`skinclip.classification_metrics.malignant_score`). AK counts as benign by default, matching SLICE-3D, whose
``target`` is 0 for actinic keratoses (an indeterminate/pre-malignant lesion); pass
``malignant=(*MALIGNANT_CLASSES, "AK")`` for the stricter reading.

    python -m datasets_scripts.isic2024 --metadata-csv train-metadata.csv --hdf5 train-image.hdf5 \
        --output-dir data/isic2024 --ood-only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from skinclip.errors import run_entry_point
from skinclip.labels import OOD_CLASSES

from .common import (
    DEFAULT_MAX_IMAGE_SIDE,
    DataError,
    SkipReport,
    add_common_arguments,
    apply_offline_descriptions,
    apply_train_fraction,
    assign_splits,
    bound_image_bytes,
    check_labels,
    check_unique_ids,
    common_options,
    image_problem,
    none_if_missing,
    prepare_output_dir,
    print_conversion,
    print_metadata_issues,
    read_csv,
    save_conversion,
    schema_features,
)
from .metadata_text import clean_age, clean_number, clean_text, describe_metadata
from .splits import SPLIT_NAMES, unique_groups

CLASS_NAMES = list(OOD_CLASSES)
LEAK_COLUMNS = ["target", "lesion_id", "iddx_full", "tbp_lv_dnn_lesion_confidence"]
LEAK_PREFIXES = ("iddx_", "mel_")
PROMPT_TEXT_COLUMNS = ("sex", "anatom_site_general")  # cut to a prompt-sized length; other strings kept whole
STRING_COLUMNS = [
    "patient_id",
    "sex",
    "anatom_site_general",
    "image_type",
    "tbp_tile_type",
    "tbp_lv_location",
    "tbp_lv_location_simple",
    "attribution",
    "copyright_license",
]
REPORTS = {
    0: "Diagnosis: benign skin lesion, seen as a crop of a 3D total-body photograph.",
    1: "Diagnosis: malignant skin lesion (melanoma, basal cell carcinoma or squamous cell carcinoma), seen as a crop "
    "of a 3D total-body photograph.",
}


def is_leak_column(column: str) -> bool:
    return column in LEAK_COLUMNS or column.startswith(LEAK_PREFIXES)


def load_table(metadata_csv, issues: list | None = None) -> pd.DataFrame:
    """Checked table without the leak columns; ``label`` from ``target``; no images read.

    Unusable numbers (an age outside 0-120, "abc", inf) are left out and over-long prompt texts cut; each is
    recorded in ``issues`` (file and image named).
    """
    meta = read_csv(metadata_csv, ["isic_id", "target", "patient_id"])
    check_unique_ids(meta["isic_id"], metadata_csv)
    check_labels(meta["target"].str.strip(), ["0", "1"], meta["isic_id"], metadata_csv)
    labels = meta["target"].astype(int).to_numpy()
    allowed = [column for column in meta.columns if not is_leak_column(column) and column != "isic_id"]
    table = pd.DataFrame({"image_id": meta["isic_id"], "label": labels})
    rows = [f"{metadata_csv} image {image_id}" for image_id in meta["isic_id"]]
    for column in allowed:
        table[column] = [_clean_value(column, value, row, issues) for value, row in zip(meta[column], rows)]
    table["group_id"] = unique_groups(table["patient_id"], table["image_id"])
    table["metadata_text"] = [
        describe_metadata(
            age=row.get("age_approx"),
            sex=row.get("sex"),
            site=row.get("anatom_site_general"),
            diameter_mm=row.get("clin_size_long_diam_mm"),
        )
        for row in table.to_dict("records")
    ]
    table["report"] = [REPORTS[label] for label in labels]
    return table


def _clean_value(column: str, value, row: str, issues: list | None):
    """One metadata value through the shared checks of `metadata_text` (the one place they live)."""
    if column == "age_approx":
        return clean_age(value, row, issues, column)
    if column in PROMPT_TEXT_COLUMNS:
        return clean_text(value, row, issues, column)
    if column in STRING_COLUMNS:
        return none_if_missing(value)
    return clean_number(value, row, issues, column)


def features(table: pd.DataFrame):
    from datasets import Value

    shared = schema_features(CLASS_NAMES)
    metadata = {
        column: Value("string") if column in STRING_COLUMNS else Value("float32")
        for column in table.columns
        if column not in shared and column != "split"
    }
    return schema_features(CLASS_NAMES, **metadata)


def _read_image_bytes(handle, image_id: str) -> bytes:
    value = handle[image_id][()]
    return value.tobytes() if hasattr(value, "tobytes") else bytes(value)


def _generate_rows(table_path: str, hdf5_path: str, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE):
    import h5py

    table = pd.read_parquet(table_path)
    with h5py.File(hdf5_path, "r") as handle:
        for row in table.to_dict("records"):
            image_id = row["image_id"]
            data = bound_image_bytes(_read_image_bytes(handle, image_id), max_image_side)
            row["image"] = {"bytes": data, "path": f"{image_id}.jpg"}
            yield {key: (None if isinstance(value, float) and np.isnan(value) else value) for key, value in row.items()}


def convert(
    metadata_csv,
    hdf5_path,
    output_dir=None,
    *,
    ood_only: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    verify_images: bool = True,
    descriptions=None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    train_fraction: float = 1.0,
    max_image_side: int | None = None,
):
    """Convert ``train-metadata.csv`` + HDF5; ``ood_only`` puts every row in ``test`` (train/validation empty)."""
    import h5py
    from datasets import Dataset, DatasetDict, DatasetInfo

    inputs = {"input_files": [metadata_csv, hdf5_path, descriptions]}
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite, **inputs)  # before any work: never over the raw data
    issues: list = []
    table = apply_offline_descriptions(load_table(metadata_csv, issues), descriptions)
    print_metadata_issues(issues)
    report = SkipReport()
    keep = np.ones(len(table), dtype=bool)
    with h5py.File(hdf5_path, "r") as handle:
        missing = [image_id for image_id in table["image_id"] if image_id not in handle]
        if missing:
            raise DataError(
                f"{hdf5_path}: {len(missing)} image(s) listed in {metadata_csv} but absent, e.g. {missing[:10]}"
            )
        if verify_images:
            for position, image_id in enumerate(tqdm(table["image_id"], desc="checking images", leave=False)):
                problem = image_problem(data=_read_image_bytes(handle, image_id))
                if problem is not None:
                    if strict:
                        raise DataError(f"image {image_id!r} in {hdf5_path} is unusable: {problem}")
                    report.add(image_id, f"{hdf5_path}:{image_id}", problem)
                    keep[position] = False
    table = table[keep].reset_index(drop=True)
    if len(table) == 0:
        raise DataError("no usable image left after the image check (see the skip report)")
    table = table.assign(split="test") if ood_only else assign_splits(table, val_fraction, test_fraction, seed)
    table = apply_train_fraction(table, train_fraction, seed).reset_index(drop=True)

    schema = features(table)
    info = DatasetInfo(
        description="ISIC 2024 SLICE-3D (3D-TBP tile crops), binary benign/malignant, for OOD evaluation; "
        "label-leaking columns (target, lesion_id, iddx_*, mel_*, tbp_lv_dnn_lesion_confidence) dropped. CC-BY-NC.",
        features=schema,
    )
    work_dir = Path(tempfile.mkdtemp(prefix=".isic2024-build-", dir=Path(output_dir).parent if output_dir else None))
    dataset_dict = DatasetDict()
    for name in SPLIT_NAMES:
        part = table[table["split"] == name].drop(columns="split")
        part_path = work_dir / f"{name}.parquet"
        part.to_parquet(part_path)
        if len(part) == 0:
            dataset_dict[name] = Dataset.from_dict(
                {column: [] for column in schema}, features=schema, info=info, split=name
            )
        else:
            dataset_dict[name] = Dataset.from_generator(
                _generate_rows,
                features=schema,
                gen_kwargs={
                    "table_path": str(part_path),
                    "hdf5_path": str(hdf5_path),
                    "max_image_side": max_image_side or DEFAULT_MAX_IMAGE_SIDE,
                },
                cache_dir=str(work_dir / "cache"),
                split=name,
            )
            dataset_dict[name].info.description = info.description
    if output_dir is not None:
        try:
            # The images come from one HDF5 file, not one file each: datasets' default shards ({}).
            recorded = {"max_image_side": max_image_side or DEFAULT_MAX_IMAGE_SIDE}
            save_conversion(dataset_dict, table, output_dir, overwrite, report, issues, recorded, {}, **inputs)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        from datasets import load_from_disk

        dataset_dict = load_from_disk(str(output_dir))
    dataset_dict.skip_report = report
    dataset_dict.metadata_issues = issues
    return dataset_dict


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.isic2024",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--metadata-csv", required=True, help="train-metadata.csv")
    parser.add_argument("--hdf5", required=True, help="train-image.hdf5 (isic_id → JPEG bytes)")
    parser.add_argument("--ood-only", action="store_true", help="every row in the test split (OOD evaluation)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error("--output-dir is required")
    dataset_dict = convert(
        args.metadata_csv,
        args.hdf5,
        args.output_dir,
        ood_only=args.ood_only,
        **common_options(args),
    )
    print_conversion(dataset_dict, args.output_dir)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
