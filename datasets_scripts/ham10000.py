"""HAM10000 → `DatasetDict` (7 classes with the ISIC 2019 codes), splits grouped by ``lesion_id``.

NOTE: HAM10000 is a SUBSET of ISIC 2019 (all 10,015 images are in it, lesion_id HAM_*). It is not an independent
test set for a model trained on ISIC 2019; the saved dataset says so in its description.

Layout (Harvard Dataverse / Kaggle)::

    HAM10000_metadata.csv      lesion_id,image_id,dx,dx_type,age,sex,localization[,dataset]
    HAM10000_images_part_1/    <image_id>.jpg   (and HAM10000_images_part_2/; any folders given are searched)

``dx`` maps to the ISIC 2019 codes (akiec → AK, as ISIC 2019 does) in the ISIC 2019 order MEL, NV, BCC, AK, BKL,
DF, VASC, so class indices agree with an ISIC 2019 model's first seven. ``dx_type`` (how the diagnosis was
confirmed: follow_up occurs only for nv, confocal only for bkl) leaks the label and is dropped.

    python -m datasets_scripts.ham10000 --data-dir HAM10000/ --output-dir data/ham10000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from skinclip.errors import run_entry_point
from skinclip.labels import ISIC2019_CLASSES

from .common import (
    add_common_arguments,
    check_labels,
    check_unique_ids,
    common_options,
    finish_conversion,
    index_image_files,
    none_if_missing,
    prepare_output_dir,
    print_conversion,
    print_metadata_issues,
    read_csv,
    resolve_image_paths,
    schema_features,
)
from .isic2019 import class_report
from .metadata_text import clean_age, clean_text, describe_metadata
from .splits import unique_groups

CLASS_NAMES = [name for name in ISIC2019_CLASSES if name != "SCC"]  # ISIC 2019's order; HAM10000 has no SCC
DX_TO_CLASS = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC"}
LEAK_COLUMNS = ["dx_type"]
METADATA_FILE = "HAM10000_metadata.csv"
SUBSET_NOTE = "HAM10000 is a subset of ISIC 2019: not an independent test set for a model trained on ISIC 2019."


def features(with_source_dataset: bool = False):
    from datasets import Value

    metadata = {
        "lesion_id": Value("string"),
        "dx": Value("string"),
        "age": Value("float32"),
        "sex": Value("string"),
        "localization": Value("string"),
    }
    if with_source_dataset:
        metadata["dataset"] = Value("string")  # acquisition source (vidir_molemax, rosendahl, ...)
    return schema_features(CLASS_NAMES, **metadata)


def load_table(metadata_csv, issues: list | None = None) -> pd.DataFrame:
    """Checked table (no images): label, group, metadata text, report; ``dx_type`` dropped.

    Unusable ages and over-long texts are left out or cut and recorded in ``issues`` (file and image named).
    """
    meta = read_csv(metadata_csv, ["lesion_id", "image_id", "dx", "age", "sex", "localization"])
    check_unique_ids(meta["image_id"], metadata_csv)
    check_labels(meta["dx"], list(DX_TO_CLASS), meta["image_id"], metadata_csv)
    rows = [f"{metadata_csv} image {image_id}" for image_id in meta["image_id"]]
    table = pd.DataFrame(
        {
            "image_id": meta["image_id"],
            "label": [CLASS_NAMES.index(DX_TO_CLASS[dx]) for dx in meta["dx"]],
            "lesion_id": [none_if_missing(value) for value in meta["lesion_id"]],
            "dx": meta["dx"],
            "age": [clean_age(value, row, issues) for value, row in zip(meta["age"], rows)],
            "sex": [clean_text(value, row, issues, "sex") for value, row in zip(meta["sex"], rows)],
            "localization": [
                clean_text(value, row, issues, "localization") for value, row in zip(meta["localization"], rows)
            ],
        }
    )
    if "dataset" in meta.columns:
        table["dataset"] = [none_if_missing(value) for value in meta["dataset"]]
    table["group_id"] = unique_groups(table["lesion_id"], table["image_id"])
    table["metadata_text"] = [
        describe_metadata(age=age, sex=sex, site=site)
        for age, sex, site in zip(table["age"], table["sex"], table["localization"])
    ]
    table["report"] = [class_report(CLASS_NAMES[label]) for label in table["label"]]
    return table


def convert(
    data_dir=None,
    output_dir=None,
    *,
    metadata_csv=None,
    image_dirs=None,
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
    """Convert HAM10000; images are searched recursively under ``image_dirs`` (default: ``data_dir``)."""
    metadata_csv = Path(metadata_csv or Path(data_dir) / METADATA_FILE)
    image_dirs = [Path(path) for path in (image_dirs or [data_dir])]
    inputs = {"input_dirs": [data_dir, *image_dirs], "input_files": [metadata_csv, descriptions]}
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite, **inputs)  # before any work: never into the raw data
    issues: list = []
    table = load_table(metadata_csv, issues)
    table["image"] = resolve_image_paths(table["image_id"].tolist(), index_image_files(image_dirs), image_dirs)
    return finish_conversion(
        table,
        features("dataset" in table.columns),
        **inputs,
        metadata_issues=issues,
        output_dir=output_dir,
        overwrite=overwrite,
        strict=strict,
        verify_images=verify_images,
        descriptions=descriptions,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        train_fraction=train_fraction,
        max_image_side=max_image_side,
        description=f"HAM10000 (Tschandl et al. 2018), 7 classes with ISIC 2019 codes; splits grouped by lesion_id. "
        f"{SUBSET_NOTE} CC BY-NC 4.0.",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.ham10000",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", help=f"folder with {METADATA_FILE} and the image folders")
    parser.add_argument("--metadata-csv")
    parser.add_argument("--image-dir", action="append", dest="image_dirs", help="image folder (repeatable)")
    parser.add_argument(
        "--csv-only", action="store_true", help="check the CSV and print class counts; no images needed"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.data_dir is None and not (args.metadata_csv and (args.image_dirs or args.csv_only)):
        parser.error("give --data-dir or --metadata-csv with --image-dir")
    if args.csv_only:
        issues: list = []
        table = load_table(args.metadata_csv or Path(args.data_dir) / METADATA_FILE, issues)
        print_metadata_issues(issues)
        counts = np.bincount(table["label"], minlength=len(CLASS_NAMES))
        print(
            f"{len(table)} rows, {table['group_id'].nunique()} lesions; "
            + ", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, counts))
        )
        print(SUBSET_NOTE)
        return
    if not args.output_dir:
        parser.error("--output-dir is required (unless --csv-only)")
    dataset_dict = convert(
        args.data_dir,
        args.output_dir,
        metadata_csv=args.metadata_csv,
        image_dirs=args.image_dirs,
        **common_options(args),
    )
    print_conversion(dataset_dict, args.output_dir, SUBSET_NOTE)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
