"""Derm7pt (release_v0) → `DatasetDict` with its official train/valid/test split.

Layout of the official release::

    release_v0/meta/meta.csv                    1,011 cases
    release_v0/meta/{train,valid,test}_indexes.csv   column `indexes`: 0-based rows of meta.csv (413/203/395)
    release_v0/images/<clinic or derm path>     paths are case-sensitive (e.g. FCL/Fcl068.jpg)

Classes (the common 5-class grouping of the 20 diagnosis strings, Kawahara et al. 2019), in this order:
BCC, NEV, MEL, MISC, SK — see `DIAGNOSIS_TO_CLASS`. The ``report`` is the seven-point checklist in words
followed by the fine diagnosis. The prompt (``metadata_text``) uses only location, sex and elevation:
``management``, ``seven_point_score`` and ``level_of_diagnostic_difficulty`` come from the diagnostic work-up and
leak the label, so they are dropped from the dataset; the free-text ``notes`` and ``case_id`` are dropped too.
Each case is one lesion: ``group_id`` is ``case:<case_num>``. Its images may not be redistributed.

    python -m datasets_scripts.derm7pt --data-dir release_v0 --output-dir data/derm7pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from skinclip.errors import run_entry_point

from .common import (
    DataError,
    add_common_arguments,
    check_unique_ids,
    common_options,
    finish_conversion,
    prepare_output_dir,
    print_conversion,
    read_csv,
    schema_features,
)
from .metadata_text import clean_text, describe_metadata

CLASS_NAMES = ["BCC", "NEV", "MEL", "MISC", "SK"]
DIAGNOSIS_TO_CLASS = {
    "basal cell carcinoma": "BCC",
    "blue nevus": "NEV",
    "clark nevus": "NEV",
    "combined nevus": "NEV",
    "congenital nevus": "NEV",
    "dermal nevus": "NEV",
    "recurrent nevus": "NEV",
    "reed or spitz nevus": "NEV",
    "melanoma": "MEL",
    "melanoma (in situ)": "MEL",
    "melanoma (less than 0.76 mm)": "MEL",
    "melanoma (0.76 to 1.5 mm)": "MEL",
    "melanoma (more than 1.5 mm)": "MEL",
    "melanoma metastasis": "MEL",
    "dermatofibroma": "MISC",
    "lentigo": "MISC",
    "melanosis": "MISC",
    "miscellaneous": "MISC",
    "vascular lesion": "MISC",
    "seborrheic keratosis": "SK",
}
CHECKLIST = [
    "pigment_network",
    "streaks",
    "pigmentation",
    "regression_structures",
    "dots_and_globules",
    "blue_whitish_veil",
    "vascular_structures",
]
# Never in the prompt (label leaks or free text): dropped from the output altogether.
LEAK_COLUMNS = ["management", "seven_point_score", "level_of_diagnostic_difficulty", "notes", "case_id"]
REQUIRED_COLUMNS = ["case_num", "diagnosis", *CHECKLIST, "elevation", "location", "sex", "clinic", "derm"]
SPLIT_FILES = {"train": "train_indexes.csv", "validation": "valid_indexes.csv", "test": "test_indexes.csv"}


def checklist_report(row) -> str:
    """The seven-point checklist in words, then the diagnosis: the ground-truth report of a case."""
    items = [
        f"{column.replace('_', ' ').replace('blue whitish', 'blue-whitish')} {str(row[column]).strip()}"
        for column in CHECKLIST
    ]
    return f"Seven-point checklist: {'; '.join(items)}. Diagnosis: {str(row['diagnosis']).strip()}."


def features():
    from datasets import Value

    metadata = {
        column: Value("string")
        for column in (
            "case_num",
            "diagnosis",
            "elevation",
            "location",
            "sex",
            "image_type",
            "clinic_path",
            "derm_path",
        )
    }
    metadata.update({column: Value("string") for column in CHECKLIST})
    return schema_features(CLASS_NAMES, **metadata)


def load_table(meta_csv, index_dir=None, issues: list | None = None) -> pd.DataFrame:
    """Checked table of all cases with label, report, metadata text and the official ``split`` (no images).

    Over-long prompt texts (location, sex, elevation) are cut and recorded in ``issues`` (file and case named).
    """
    meta_csv = Path(meta_csv)
    index_dir = Path(index_dir) if index_dir is not None else meta_csv.parent
    meta = read_csv(meta_csv, REQUIRED_COLUMNS)
    meta["image_id"] = [
        f"derm7pt_case_{int(num):04d}" if str(num).isdigit() else f"derm7pt_case_{num}" for num in meta["case_num"]
    ]
    check_unique_ids(meta["image_id"], meta_csv)
    unknown = [
        (image_id, diagnosis)
        for image_id, diagnosis in zip(meta["image_id"], meta["diagnosis"])
        if diagnosis not in DIAGNOSIS_TO_CLASS
    ]
    if unknown:
        raise DataError(f"{meta_csv}: diagnosis outside the class mapping for {unknown[:10]}")

    split = pd.Series([None] * len(meta), dtype=object)
    for name, file_name in SPLIT_FILES.items():
        index_csv = index_dir / file_name
        indexes = _row_indexes(index_csv)
        out_of_range = [index for index in indexes if not 0 <= index < len(meta)]
        if out_of_range:
            raise DataError(f"{index_csv}: row index(es) {out_of_range[:10]} outside meta.csv (0..{len(meta) - 1})")
        twice = [meta["image_id"][index] for index in indexes if split[index] is not None]
        if twice:
            raise DataError(f"{index_csv}: case(s) {twice[:10]} are already in another split")
        split[indexes.to_numpy()] = name
    unassigned = meta["image_id"][split.isna()].tolist()
    if unassigned:
        raise DataError(f"{index_dir}: case(s) {unassigned[:10]} are in no official split file")

    rows = [f"{meta_csv} case {image_id}" for image_id in meta["image_id"]]
    for column in ("sex", "location", "elevation"):
        meta[column] = [clean_text(value, row, issues, column) for value, row in zip(meta[column], rows)]
    table = pd.DataFrame(
        {
            "image_id": meta["image_id"],
            "label": [CLASS_NAMES.index(DIAGNOSIS_TO_CLASS[diagnosis]) for diagnosis in meta["diagnosis"]],
            "metadata_text": [
                describe_metadata(sex=sex, site=location, elevation=elevation)
                for sex, location, elevation in zip(meta["sex"], meta["location"], meta["elevation"])
            ],
            "report": [checklist_report(row) for _, row in meta.iterrows()],
            "group_id": "case:" + meta["case_num"].astype(str),
            "case_num": meta["case_num"],
            "diagnosis": meta["diagnosis"],
            "elevation": meta["elevation"],
            "location": meta["location"],
            "sex": meta["sex"],
            "clinic_path": meta["clinic"],
            "derm_path": meta["derm"],
            "split": split.to_numpy(),
        }
    )
    for column in CHECKLIST:
        table[column] = meta[column]
    return table


def _row_indexes(index_csv) -> pd.Series:
    """The ``indexes`` column as integers; a value that is not a whole number is a `DataError` naming it."""
    raw = read_csv(index_csv, ["indexes"])["indexes"]
    numbers = pd.to_numeric(raw, errors="coerce")
    bad = raw[numbers.isna() | (numbers != numbers.round())].tolist()
    if bad:
        raise DataError(f"{index_csv}: row index(es) {bad[:10]} are not whole numbers (column 'indexes')")
    return numbers.astype(int)


def convert(
    data_dir=None,
    output_dir=None,
    *,
    meta_csv=None,
    index_dir=None,
    image_dir=None,
    image_type: str = "derm",
    overwrite: bool = False,
    strict: bool = False,
    verify_images: bool = True,
    descriptions=None,
    seed: int = 0,
    train_fraction: float = 1.0,
    max_image_side: int | None = None,
):
    """Convert the official release under ``data_dir`` (``meta/`` and ``images/``); ``image_type`` derm or clinic."""
    if image_type not in ("derm", "clinic"):
        raise ValueError(f"image_type must be 'derm' or 'clinic', got {image_type!r}")
    data_dir = Path(data_dir) if data_dir is not None else None
    meta_csv = Path(meta_csv or data_dir / "meta" / "meta.csv")
    image_dir = Path(image_dir or data_dir / "images")
    inputs = {"input_dirs": [data_dir, image_dir, index_dir], "input_files": [meta_csv, descriptions]}
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite, **inputs)  # before any work: never into the raw data
    issues: list = []
    table = load_table(meta_csv, index_dir, issues)
    relative = table[f"{image_type}_path"]
    # Exact, case-sensitive paths (a case-insensitive file system would hide a wrong case).
    paths = [image_dir / path for path in relative]
    listings: dict[Path, set[str]] = {}
    for path in {path.parent for path in paths}:
        listings[path] = {entry.name for entry in path.iterdir()} if path.is_dir() else set()
    missing = [image_id for image_id, path in zip(table["image_id"], paths) if path.name not in listings[path.parent]]
    if missing:
        raise DataError(
            f"{image_dir}: {len(missing)} image(s) listed in {meta_csv} but absent on disk, e.g. {missing[:10]}"
        )
    table["image"] = [str(path) for path in paths]
    table["image_type"] = image_type
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
        seed=seed,
        train_fraction=train_fraction,
        max_image_side=max_image_side,
        description="Derm7pt release_v0 (Kawahara et al. 2019), official train/valid/test split, 5 classes "
        "BCC/NEV/MEL/MISC/SK. Academic research use only; images may not be redistributed.",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.derm7pt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, help="release_v0 folder (meta/ and images/)")
    parser.add_argument("--image-type", choices=["derm", "clinic"], default="derm")
    add_common_arguments(parser, random_splits=False)
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error("--output-dir is required")
    dataset_dict = convert(
        args.data_dir,
        args.output_dir,
        image_type=args.image_type,
        **common_options(args),
    )
    print_conversion(dataset_dict, args.output_dir)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
