"""ISIC 2019 (task 3) → `DatasetDict`: 8 classes, lesion-grouped stratified splits.

Layout (official archives from https://challenge.isic-archive.com/data/#2019)::

    ISIC_2019_Training_GroundTruth.csv   image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK   (one-hot floats)
    ISIC_2019_Training_Metadata.csv      image,age_approx,anatom_site_general,lesion_id,sex  (or `gender`)
    ISIC_2019_Training_Input/            <image>.jpg

UNK has no training image, so the classes are MEL, NV, BCC, AK, BKL, DF, VASC, SCC (this order). There is no
patient id: rows are grouped by ``lesion_id``; the 2,084 rows without one are their own groups. 2,074 names end
in ``_downsampled``: the column ``image_id`` keeps the ground-truth name, image files may use either name.

    python -m datasets_scripts.isic2019 --data-dir ISIC2019/ --output-dir data/isic2019
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
    DataError,
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
from .metadata_text import clean_age, clean_text, describe_metadata
from .splits import unique_groups

CLASS_NAMES = list(ISIC2019_CLASSES)
GROUND_TRUTH_FILE = "ISIC_2019_Training_GroundTruth.csv"
METADATA_FILE = "ISIC_2019_Training_Metadata.csv"
IMAGE_DIR = "ISIC_2019_Training_Input"

# Bias-free class descriptions (morphology only, no demographics): the ground-truth `report`. Shared with the
# demo set and with HAM10000, which uses the same class codes.
CLASS_DESCRIPTIONS = {
    "MEL": "Melanoma, a malignant melanocytic tumour. Dermoscopy typically shows asymmetry of colour and structure, "
    "several colours, an atypical pigment network, irregular dots, globules or streaks, and a blue-white veil.",
    "NV": "Melanocytic nevus, a benign mole. Dermoscopy typically shows a symmetric lesion with a regular pigment "
    "network or regular globules and one or two evenly distributed brown colours.",
    "BCC": "Basal cell carcinoma, a malignant epidermal tumour. Dermoscopy typically shows arborizing vessels, "
    "blue-grey ovoid nests or globules, leaf-like areas, shiny white areas and ulceration, without a pigment network.",
    "AK": "Actinic keratosis, a pre-malignant keratinocyte lesion of sun-damaged skin. Dermoscopy typically shows a "
    "red pseudo-network around follicles, white scale and rosettes.",
    "BKL": "Benign keratosis (seborrheic keratosis, solar lentigo or lichen planus-like keratosis). Dermoscopy "
    "typically shows sharp borders, milia-like cysts, comedo-like openings, fissures and a fingerprint-like pattern.",
    "DF": "Dermatofibroma, a benign fibrous lesion. Dermoscopy typically shows a central white scar-like patch "
    "surrounded by a delicate peripheral pigment network.",
    "VASC": "Vascular lesion (angioma, angiokeratoma or pyogenic granuloma), benign. Dermoscopy typically shows "
    "well-demarcated red, purple or blue lacunae separated by whitish septa.",
    "SCC": "Squamous cell carcinoma, a malignant keratinocyte tumour. Dermoscopy typically shows keratin masses, "
    "white circles around follicles, surface scale and dotted or glomerular vessels.",
}


def class_report(class_name: str) -> str:
    """The ground-truth text of a class: "Diagnosis: <description>"."""
    return f"Diagnosis: {CLASS_DESCRIPTIONS[class_name]}"


def features():
    from datasets import Value

    return schema_features(
        CLASS_NAMES,
        age_approx=Value("float32"),
        anatom_site_general=Value("string"),
        sex=Value("string"),
        lesion_id=Value("string"),
    )


def load_table(ground_truth_csv, metadata_csv, issues: list | None = None) -> pd.DataFrame:
    """Join and check the two CSVs; one row per image with label, group, metadata text and report (no images).

    This is the "CSV check" path: it needs no image file. Raises `DataError` for a missing column (file and
    column named), a duplicated id, a row with no or several classes (id named) or a metadata/ground-truth
    mismatch. An unusable age (not a finite number in 0-120) or an over-long text is left out or cut and
    recorded in ``issues`` (`MetadataIssue`, naming the file and image).
    """
    truth = read_csv(ground_truth_csv, ["image", *CLASS_NAMES])
    metadata = read_csv(
        metadata_csv, ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"], aliases={"gender": "sex"}
    )
    check_unique_ids(truth["image"], ground_truth_csv)
    check_unique_ids(metadata["image"], metadata_csv)

    one_hot = truth[CLASS_NAMES].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy()
    extra_classes = [column for column in truth.columns if column not in ("image", *CLASS_NAMES)]
    extra_hits = (
        truth[extra_classes].apply(pd.to_numeric, errors="coerce").fillna(0.0).to_numpy().sum(axis=1)
        if extra_classes
        else 0
    )
    hits = (one_hot > 0.5).sum(axis=1)
    bad = truth["image"][(hits != 1) | (np.asarray(extra_hits) > 0.5)].tolist()
    if bad:
        raise DataError(
            f"{ground_truth_csv}: label outside the class list {CLASS_NAMES} (or not one-hot) for image(s) {bad[:10]}"
        )
    labels = one_hot.argmax(axis=1)

    truth_ids, metadata_ids = set(truth["image"]), set(metadata["image"])
    no_metadata = [image for image in truth["image"] if image not in metadata_ids]
    if no_metadata:
        raise DataError(f"{metadata_csv}: no metadata row for image(s) {no_metadata[:10]}")
    unknown = [image for image in metadata["image"] if image not in truth_ids]
    if unknown:
        raise DataError(f"{metadata_csv}: image(s) {unknown[:10]} are not in {ground_truth_csv}")

    table = truth[["image"]].assign(label=labels).merge(metadata, on="image", how="left", validate="one_to_one")
    table = table.rename(columns={"image": "image_id"})
    rows = [f"{metadata_csv} image {image_id}" for image_id in table["image_id"]]
    table["age_approx"] = [clean_age(v, row, issues, "age_approx") for v, row in zip(table["age_approx"], rows)]
    for column in ("anatom_site_general", "sex"):
        table[column] = [clean_text(value, row, issues, column) for value, row in zip(table[column], rows)]
    table["lesion_id"] = [none_if_missing(value) for value in table["lesion_id"]]
    table["group_id"] = unique_groups(table["lesion_id"], table["image_id"])
    table["metadata_text"] = [
        describe_metadata(age=age, sex=sex, site=site)
        for age, sex, site in zip(table["age_approx"], table["sex"], table["anatom_site_general"])
    ]
    table["report"] = [class_report(CLASS_NAMES[label]) for label in table["label"]]
    check_labels(table["label"], range(len(CLASS_NAMES)), table["image_id"], ground_truth_csv)
    return table


def convert(
    data_dir=None,
    output_dir=None,
    *,
    ground_truth_csv=None,
    metadata_csv=None,
    image_dir=None,
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
    """Convert the official layout under ``data_dir`` (or the three explicit paths) to a `DatasetDict`.

    Saved atomically to ``output_dir`` when given (plus ``skipped_images.csv`` and ``splits.csv``).
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    ground_truth_csv = Path(ground_truth_csv or data_dir / GROUND_TRUTH_FILE)
    metadata_csv = Path(metadata_csv or data_dir / METADATA_FILE)
    image_dir = Path(image_dir or data_dir / IMAGE_DIR)
    inputs = {"input_dirs": [data_dir, image_dir], "input_files": [ground_truth_csv, metadata_csv, descriptions]}
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite, **inputs)  # before any work: never into the raw data
    issues: list = []
    table = load_table(ground_truth_csv, metadata_csv, issues)
    table["image"] = resolve_image_paths(table["image_id"].tolist(), index_image_files([image_dir]), image_dir)
    return finish_conversion(
        table,
        features(),
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
        description="ISIC 2019 training set (task 3), 8 classes; splits grouped by lesion_id. "
        "Contains all of HAM10000 (lesion_id HAM_*). CC-BY-NC 4.0.",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.isic2019",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", help=f"folder with {GROUND_TRUTH_FILE}, {METADATA_FILE} and {IMAGE_DIR}/")
    parser.add_argument("--ground-truth-csv")
    parser.add_argument("--metadata-csv")
    parser.add_argument("--image-dir")
    parser.add_argument(
        "--csv-only", action="store_true", help="check the CSVs and print class counts; no images needed"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.data_dir is None and not (
        args.ground_truth_csv and args.metadata_csv and (args.image_dir or args.csv_only)
    ):
        parser.error("give --data-dir or the explicit CSV (and image) paths")
    if not args.csv_only and not args.output_dir:
        parser.error("--output-dir is required (unless --csv-only)")
    if args.csv_only:
        issues: list = []
        table = load_table(
            args.ground_truth_csv or Path(args.data_dir) / GROUND_TRUTH_FILE,
            args.metadata_csv or Path(args.data_dir) / METADATA_FILE,
            issues,
        )
        print_metadata_issues(issues)
        counts = np.bincount(table["label"], minlength=len(CLASS_NAMES))
        print(
            f"{len(table)} rows, {table['group_id'].nunique()} groups; "
            + ", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, counts))
        )
        return
    dataset_dict = convert(
        args.data_dir,
        args.output_dir,
        ground_truth_csv=args.ground_truth_csv,
        metadata_csv=args.metadata_csv,
        image_dir=args.image_dir,
        **common_options(args),
    )
    print_conversion(dataset_dict, args.output_dir)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
