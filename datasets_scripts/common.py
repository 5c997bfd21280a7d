"""Helpers shared by the converters: CSV checks, image validation with a skip report, atomic saving.

Failures name what is wrong (the file and the column, or the image id), early, instead of crashing deep inside
training; nothing already on disk is touched until a complete output exists (temp dir + rename).

Output safety: an output folder may not be, contain or lie inside an input folder, and ``--overwrite`` replaces
only a folder that holds `MARKER_NAME`, the file every conversion writes into its output (or an empty folder).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from skinclip.csv_rows import find_problem
from skinclip.errors import UserError
from skinclip.output_folder import writing_into
from skinclip.validation import cli_number

from .metadata_text import MetadataIssue, is_missing, load_offline_descriptions
from .splits import SPLIT_NAMES, make_splits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff")
DOWNSAMPLED_SUFFIX = "_downsampled"
SKIP_REPORT_NAME = "skipped_images.csv"
SPLITS_FILE_NAME = "splits.csv"
METADATA_WARNINGS_NAME = "metadata_warnings.csv"
DEFAULT_MAX_IMAGE_SIDE = 2048  # = skinclip.images.MAX_WORKING_SIDE: prediction never looks at more either
MARKER_NAME = ".skinclip-conversion.json"  # "this folder is a converter's output": --overwrite may replace it
MAX_SHARD_BYTES = 500 * 1024 * 1024
CSV_ENCODING = "utf-8-sig"  # UTF-8, with or without the byte-order mark spreadsheets write
MAX_WARNINGS_SHOWN = 20


class DataError(UserError):
    """Bad input data; the message names the file, column or image id."""


class OutputExistsError(DataError, FileExistsError):
    """The output folder exists and ``--overwrite`` was not given."""


def schema_features(class_names: Sequence[str], **metadata_columns):
    """The columns every converted dataset shares (the trainer's contract), then its own metadata columns."""
    from datasets import ClassLabel, Features, Image, Value

    return Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "label": ClassLabel(names=list(class_names)),
            "metadata_text": Value("string"),
            "report": Value("string"),
            "group_id": Value("string"),
            **metadata_columns,
        }
    )


# ----------------------------------------------------------------------------------------------- CSV checks


def read_csv(path, required_columns: Sequence[str] = (), aliases: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV as strings (blank → NaN) and check its header.

    ``aliases`` maps alternative header names to the canonical one (e.g. ``{"gender": "sex"}``, a variant of the
    ISIC 2019 metadata). A missing required column raises `DataError` naming the file and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding=CSV_ENCODING)
    except UnicodeDecodeError as error:
        line, column = _first_undecodable(path)
        raise DataError(
            f"{path}: line {line}, column {column} is not UTF-8 text ({error.reason}); save the file as UTF-8"
        ) from error
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(error).split())})") from error
    except pd.errors.ParserError as error:
        # pandas names a record number or a 0-based row, not the file line, and not what was lost with it.
        problem = find_problem(path.read_text(encoding=CSV_ENCODING, errors="replace"))
        detail = str(problem) if problem is not None else " ".join(str(error).split())
        raise DataError(f"{path}: not a readable CSV ({detail})") from error
    table.columns = [column.strip() for column in table.columns]
    for alias, canonical in (aliases or {}).items():
        if alias in table.columns and canonical not in table.columns:
            table = table.rename(columns={alias: canonical})
    missing = [column for column in required_columns if column not in table.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing} (found {list(table.columns)})")
    return table


def _first_undecodable(path: Path) -> tuple[int, int]:
    """(line, column), both from 1, of the first bytes of ``path`` that are not UTF-8."""
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return line_number, error.start + 1
    return 0, 0


def check_unique_ids(ids: Iterable, source) -> None:
    """Raise `DataError` naming the duplicated id(s) and the source."""
    series = pd.Series(list(ids))
    duplicated = series[series.duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"{source}: duplicated image id(s) {duplicated[:10]}")


def check_labels(values: Iterable, allowed: Sequence[str], ids: Iterable, source) -> None:
    """Raise `DataError` naming the first ids whose label is outside ``allowed``."""
    allowed_set = set(allowed)
    bad = [(image_id, value) for image_id, value in zip(ids, values) if value not in allowed_set]
    if bad:
        shown = ", ".join(f"{image_id!r}: {value!r}" for image_id, value in bad[:10])
        raise DataError(f"{source}: label(s) outside the class list {list(allowed)} for {shown}")


def strip_downsampled(image_id: str) -> str:
    """ISIC 2019 names 2,074 images ``<id>_downsampled``; archives and other datasets use the bare id."""
    return image_id[: -len(DOWNSAMPLED_SUFFIX)] if image_id.endswith(DOWNSAMPLED_SUFFIX) else image_id


def none_if_missing(value):
    return None if is_missing(value) else value


# ------------------------------------------------------------------------------------------------ images


@dataclass
class SkipReport:
    """Images that could not be used: (image id, path, reason). Written next to the dataset."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, image_id: str, path, reason: str) -> None:
        self.rows.append((str(image_id), str(path), reason))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_ids(self) -> list[str]:
        return [row[0] for row in self.rows]

    def write(self, path) -> None:
        with Path(path).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", "path", "reason"])
            writer.writerows(self.rows)


def index_image_files(image_dirs: Sequence) -> dict[str, Path]:
    """``{file stem: path}`` for every image file under the folders (recursive; case of names kept)."""
    index: dict[str, Path] = {}
    for image_dir in image_dirs:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found")
        for path in image_dir.rglob("*"):
            if path.suffix in IMAGE_EXTENSIONS and path.is_file():
                index.setdefault(path.stem, path)
    return index


def resolve_image_paths(image_ids: Sequence[str], index: dict[str, Path], source) -> list[str]:
    """File path per id (``<id>`` or, for ISIC 2019, the bare id without ``_downsampled``); absent → `DataError`."""
    paths, missing = [], []
    for image_id in image_ids:
        path = index.get(image_id) or index.get(strip_downsampled(image_id))
        if path is None:
            missing.append(image_id)
        else:
            paths.append(str(path))
    if missing:
        raise DataError(f"{source}: {len(missing)} image(s) listed but absent on disk, e.g. {missing[:10]}")
    return paths


def image_problem(path=None, data: bytes | None = None) -> str | None:
    """None if the file/bytes decode completely as an image, else the reason (truncated, not an image, ...)."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data) if data is not None else path) as image:
            image.load()  # full decode: `verify()` alone misses truncated JPEGs
            if image.width < 1 or image.height < 1:
                return "empty image"
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(error).__name__}: {error}"
    return None


def validate_images(
    image_ids: Sequence[str], paths: Sequence[str], strict: bool = False, verify: bool = True
) -> tuple[np.ndarray, SkipReport]:
    """Keep-mask and skip report. ``strict`` turns the first bad image into a `DataError` naming it."""
    report = SkipReport()
    keep = np.ones(len(image_ids), dtype=bool)
    if not verify:
        return keep, report
    for position, (image_id, path) in enumerate(tqdm(list(zip(image_ids, paths)), desc="checking images", leave=False)):
        problem = image_problem(path)
        if problem is not None:
            if strict:
                raise DataError(f"image {image_id!r} ({path}) is unusable: {problem}")
            report.add(image_id, path, problem)
            keep[position] = False
    return keep, report


# ------------------------------------------------------------------------------------ text and splitting


def apply_offline_descriptions(table: pd.DataFrame, descriptions_path, id_column: str = "image_id") -> pd.DataFrame:
    """Replace ``metadata_text`` by the offline description of each image that has one (others keep the template)."""
    if descriptions_path is None:
        return table
    descriptions = load_offline_descriptions(descriptions_path)
    replaced = [
        descriptions.get(image_id) or descriptions.get(strip_downsampled(image_id)) or text
        for image_id, text in zip(table[id_column], table["metadata_text"])
    ]
    return table.assign(metadata_text=replaced)


def assign_splits(table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Add a ``split`` column from `make_splits` on the ``label`` and ``group_id`` columns."""
    indices = make_splits(table["label"].to_numpy(), table["group_id"].to_numpy(), val_fraction, test_fraction, seed)
    split = np.empty(len(table), dtype=object)
    for name, rows in indices.items():
        split[rows] = name
    return table.assign(split=split)


# -------------------------------------------------------------------------------------------------- saving


def check_output_location(output_dir, input_dirs: Sequence = (), input_files: Sequence = ()) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder, or that contains an input file.

    Replacing such a folder (``--overwrite``) would delete the raw data; writing inside it would make the next
    run index its own output as input images.
    """
    output = Path(output_dir).resolve()
    for folder in filter(None, input_dirs):
        relation = _relation(output, Path(folder).resolve())
        if relation:
            raise DataError(
                f"output folder {output_dir} {relation} the input folder {folder}; "
                "choose a folder outside the input (--output-dir)"
            )
    for file in filter(None, input_files):
        if Path(file).resolve().is_relative_to(output):
            raise DataError(
                f"output folder {output_dir} contains the input file {file}; choose another folder (--output-dir)"
            )


def _relation(output: Path, folder: Path) -> str | None:
    """How ``output`` overlaps ``folder`` (both resolved), or None when they are apart."""
    if output == folder:
        return "is"
    if folder.is_relative_to(output):
        return "contains"
    if output.is_relative_to(folder):
        return "lies inside"
    return None


def is_conversion_output(folder) -> bool:
    """True for a folder written by a converter (it holds `MARKER_NAME`) or an empty folder: safe to replace."""
    folder = Path(folder)
    return (folder / MARKER_NAME).is_file() or (folder.is_dir() and not any(folder.iterdir()))


def prepare_output_dir(output_dir, overwrite: bool, input_dirs: Sequence = (), input_files: Sequence = ()) -> Path:
    """Fail before any work if the target is unsafe (see `check_output_location`) or exists without ``overwrite``.

    With ``overwrite`` only a previous conversion's output (or an empty folder) may be replaced.
    """
    output_dir = Path(output_dir)
    check_output_location(output_dir, input_dirs, input_files)
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir() or output_dir.is_symlink():
            raise DataError(f"{output_dir} exists and is not a folder; choose another --output-dir")
        if not overwrite:
            raise OutputExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
        if not is_conversion_output(output_dir):
            raise DataError(
                f"{output_dir} is not the output of a previous conversion (no {MARKER_NAME}); "
                "--overwrite replaces only those: delete it yourself or choose another --output-dir"
            )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return output_dir


def write_marker(folder, description: str = "", **recorded) -> None:
    """The file that lets a later ``--overwrite`` recognise ``folder`` as a converter's output; ``recorded``
    (``max_image_side``, ``images_downscaled``) says how it was built."""
    content = {"written_by": "skinclip datasets_scripts", "description": description, **recorded}
    (Path(folder) / MARKER_NAME).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def atomic_save(
    dataset_dict,
    output_dir,
    overwrite: bool = False,
    extra_files: dict[str, object] | None = None,
    num_shards: dict[str, int] | None = None,
    input_dirs: Sequence = (),
    input_files: Sequence = (),
    recorded: dict | None = None,
) -> Path:
    """``save_to_disk`` into a temp dir beside ``output_dir``, then rename: a failed run leaves the old output intact.

    ``extra_files`` maps file names to a `SkipReport`, a DataFrame (written as CSV) or a string. The output gets
    `MARKER_NAME`; ``overwrite`` replaces only an earlier output that has it (`prepare_output_dir`).
    """
    output_dir = prepare_output_dir(output_dir, overwrite, input_dirs, input_files)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    old_dir = None
    # An OS error that names no file (a full disk found when pyarrow closes a shard) names the output instead.
    with writing_into(output_dir):
        try:
            target = temp_dir / "dataset"
            num_shards = dict(num_shards or {})
            for name, split in dataset_dict.items():
                if len(split) == 0:
                    num_shards[name] = 1  # zero shards would not load back
            dataset_dict.save_to_disk(str(target), num_shards=num_shards)
            for name, content in (extra_files or {}).items():
                if isinstance(content, SkipReport):
                    content.write(target / name)
                elif isinstance(content, pd.DataFrame):
                    content.to_csv(target / name, index=False)
                else:
                    (target / name).write_text(str(content), encoding="utf-8")
            write_marker(target, _description_of(dataset_dict), **(recorded or {}))
            if output_dir.exists():
                old_dir = temp_dir / "previous"
                os.replace(output_dir, old_dir)
            os.replace(target, output_dir)
        except BaseException:
            if old_dir is not None and old_dir.exists() and not output_dir.exists():
                os.replace(old_dir, output_dir)
            raise
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return output_dir


def _description_of(dataset_dict) -> str:
    for split in dataset_dict.values():
        return split.info.description or ""
    return ""


def shards_for(paths: Sequence[str]) -> int:
    """Shard count so that each saved shard holds about 500 MB of embedded image bytes."""
    total = sum(os.path.getsize(path) for path in paths) if paths else 0
    return max(1, int(np.ceil(total / MAX_SHARD_BYTES)))


def _header(source) -> tuple[tuple[int, int], str] | None:
    """(size, format) from an image's header (nothing is decoded); None when unreadable."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                return image.size, image.format
    except Exception:  # unreadable: the image check decided (or was told not to)
        return None


def _bounded_copy(path, source_format: str, max_side: int) -> bytes:
    """The image at ``max_side`` on its long side, upright RGB: JPEG quality 95 for a JPEG source, else PNG."""
    import io

    from skinclip.images import load_image

    picture = load_image(path, max_side)  # one decode at a reduced scale where the format allows it
    encoded = io.BytesIO()
    if source_format == "JPEG":
        picture.save(encoded, format="JPEG", quality=95)
    else:
        picture.save(encoded, format="PNG")
    return encoded.getvalue()


def bound_image_sides(paths: Sequence[str], max_side: int, folder: Path | None = None) -> tuple[list, int]:
    """Each image larger than ``max_side`` on its long side → a copy at ``max_side`` (`_bounded_copy`) in
    ``folder``, or as ``{"bytes": ...}`` without one; the others stay as they are.

    Returns (the image column, how many were downscaled). Training decodes every stored image whole, so one huge
    image stored as it was set the run's peak memory (issue 22).
    """
    bounded, downscaled = [], 0
    for position, path in enumerate(tqdm(paths, desc="bounding image sizes", leave=False)):
        header = _header(path)
        if header is None or max(header[0]) <= max_side:
            bounded.append(path)
            continue
        data = _bounded_copy(path, header[1], max_side)
        if folder is None:
            bounded.append({"bytes": data, "path": None})
        else:
            target = folder / f"{position}.{'jpg' if header[1] == 'JPEG' else 'png'}"
            target.write_bytes(data)
            bounded.append(str(target))
        downscaled += 1
    return bounded, downscaled


def bound_image_bytes(data: bytes, max_side: int) -> bytes:
    """`bound_image_sides` for one image held as bytes (an HDF5 archive's)."""
    import io

    header = _header(io.BytesIO(data))
    if header is None or max(header[0]) <= max_side:
        return data
    with tempfile.NamedTemporaryFile(suffix=".image") as copy:
        copy.write(data)
        copy.flush()
        return _bounded_copy(copy.name, header[1], max_side)


def build_dataset_dict(table: pd.DataFrame, features, description: str = "", image_column: str = "image"):
    """`DatasetDict` of the three splits from a table with a ``split`` column and image file paths (or bytes).

    Images stay file paths until `save_to_disk` embeds their bytes shard by shard, so a 25k-image dataset is
    never held in memory at once.
    """
    from datasets import Dataset, DatasetDict, DatasetInfo

    columns = list(features)
    dataset_dict = DatasetDict()
    for name in SPLIT_NAMES:
        part = table[table["split"] == name]
        records = {column: [none_if_nan(value) for value in part[column].tolist()] for column in columns}
        dataset_dict[name] = Dataset.from_dict(
            records, features=features, info=DatasetInfo(description=description, features=features), split=name
        )
    return dataset_dict


def none_if_nan(value):
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def split_summary(dataset_dict) -> str:
    """One line per split: row count and class counts."""
    lines = []
    for name, split in dataset_dict.items():
        names = split.features["label"].names
        counts = (
            np.bincount(np.asarray(split["label"], dtype=int), minlength=len(names))
            if len(split)
            else np.zeros(len(names), int)
        )
        lines.append(f"{name}: {len(split)} rows; " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
    return "\n".join(lines)


def add_common_arguments(
    parser, default_val: float = 0.15, default_test: float = 0.15, random_splits: bool = True
) -> None:
    """Command-line options every converter shares."""
    parser.add_argument("--output-dir", help="where the DatasetDict is saved (save_to_disk)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first truncated/non-image file instead of skipping it"
    )
    parser.add_argument(
        "--no-verify-images",
        dest="verify_images",
        action="store_false",
        help="skip the full decode check of every image",
    )
    parser.add_argument(
        "--descriptions",
        default=None,
        help="offline descriptions (JSONL or CSV: image_id,text) replacing the template text",
    )
    parser.add_argument("--seed", type=cli_number(int, 0), default=0)
    if random_splits:
        parser.add_argument("--val-fraction", type=cli_number(float, 0, 1, high_open=True), default=default_val)
        parser.add_argument("--test-fraction", type=cli_number(float, 0, 1, high_open=True), default=default_test)
    parser.add_argument(
        "--max-image-side",
        type=cli_number(int, 224),
        default=DEFAULT_MAX_IMAGE_SIDE,
        help="store larger images downscaled to this long side (recorded in the output's "
        f"{MARKER_NAME}; default %(default)s)",
    )
    parser.add_argument(
        "--train-fraction",
        type=cli_number(float, 0, 1, low_open=True),
        default=1.0,
        help="stratified fraction of the TRAIN split kept (e.g. 0.12)",
    )


# Keyword arguments of every converter's ``convert`` that `add_common_arguments` defines.
COMMON_OPTIONS = (
    "overwrite",
    "strict",
    "verify_images",
    "descriptions",
    "val_fraction",
    "test_fraction",
    "seed",
    "train_fraction",
    "max_image_side",
)


def common_options(args) -> dict:
    """The shared `convert` keyword arguments from parsed command-line ``args`` (those this converter defines)."""
    return {name: getattr(args, name) for name in COMMON_OPTIONS if hasattr(args, name)}


def print_conversion(dataset_dict, output_dir, note: str = "") -> None:
    """What every converter's command line prints at the end: the splits, the skipped images, where it went."""
    print(split_summary(dataset_dict))
    print(f"skipped images: {len(dataset_dict.skip_report)}; saved to {output_dir}" + (f"\n{note}" if note else ""))


# ------------------------------------------------------------------------------------------ the pipeline


def apply_train_fraction(table: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Drop train rows outside a stratified ``fraction`` of the train split (validation/test untouched)."""
    from .splits import subsample_indices

    if fraction >= 1.0:
        return table
    train_positions = np.flatnonzero(table["split"].to_numpy() == "train")
    kept = train_positions[subsample_indices(table["label"].to_numpy()[train_positions], fraction, seed)]
    keep = table["split"].to_numpy() != "train"
    keep[kept] = True
    return table[keep]


def finish_conversion(
    table: pd.DataFrame,
    features,
    *,
    output_dir=None,
    overwrite: bool = False,
    strict: bool = False,
    verify_images: bool = True,
    descriptions=None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    train_fraction: float = 1.0,
    description: str = "",
    image_problems: dict[str, str] | None = None,
    input_dirs: Sequence = (),
    input_files: Sequence = (),
    metadata_issues: Sequence[MetadataIssue] = (),
    max_image_side: int | None = None,
):
    """Shared tail of every file-based converter.

    ``table`` has one row per image with the columns of ``features`` (``image`` holding file paths and ``label``
    holding class indices) and optionally a ``split`` column (official splits, e.g. Derm7pt). Steps: offline
    descriptions → image check (skip report / ``strict``) → grouped stratified splits → ``train_fraction`` →
    `DatasetDict` → atomic save with ``skipped_images.csv``, ``splits.csv`` and ``metadata_warnings.csv`` (the
    values left out or cut, ``metadata_issues``, also printed) beside it. Images larger than ``max_image_side``
    on their long side are stored downscaled (`bound_image_sides`), so that a training run's memory does not
    depend on the largest image; the side and the count are recorded in the output's `MARKER_NAME`.
    """
    max_image_side = DEFAULT_MAX_IMAGE_SIDE if max_image_side is None else max_image_side
    if output_dir is not None:
        prepare_output_dir(output_dir, overwrite, input_dirs, input_files)
    print_metadata_issues(metadata_issues)
    table = apply_offline_descriptions(table.reset_index(drop=True), descriptions)
    keep, report = validate_images(
        table["image_id"].tolist(), table["image"].tolist(), strict=strict, verify=verify_images
    )
    table = table[keep].reset_index(drop=True)
    if len(table) == 0:
        raise DataError("no usable image left after the image check (see the skip report)")
    if "split" not in table.columns:
        table = assign_splits(table, val_fraction, test_fraction, seed)
    table = apply_train_fraction(table, train_fraction, seed).reset_index(drop=True)
    # Downscaled copies are files beside the output until it is saved (never all in memory); bytes without one.
    parent = Path(output_dir).parent if output_dir is not None else None
    with tempfile.TemporaryDirectory(prefix=".bounded-images-", dir=parent) as copies:
        images, downscaled = bound_image_sides(
            table["image"].tolist(), max_image_side, Path(copies) if output_dir is not None else None
        )
        if downscaled:
            print(f"downscaled {downscaled} image(s) to at most {max_image_side} px on the long side", file=sys.stderr)
        table = table.assign(image=images)
        dataset_dict = build_dataset_dict(table, features, description=description)
        if output_dir is not None:
            save_conversion(
                dataset_dict,
                table,
                output_dir,
                overwrite,
                report,
                metadata_issues,
                recorded={"max_image_side": max_image_side, "images_downscaled": downscaled},
                input_dirs=input_dirs,
                input_files=input_files,
            )
    dataset_dict.skip_report = report  # read by the CLIs and tests; not saved by save_to_disk
    dataset_dict.metadata_issues = list(metadata_issues)
    return dataset_dict


def save_conversion(
    dataset_dict, table, output_dir, overwrite, report, metadata_issues, recorded, num_shards=None, **inputs
) -> None:
    """`atomic_save` with what every converter writes beside its splits: the skip report, the split of every
    image and the metadata warnings. ``num_shards`` defaults to ~500 MB shards of the files in ``table['image']``;
    ``inputs`` are `atomic_save`'s ``input_dirs``/``input_files`` (never overwritten)."""
    if num_shards is None:
        paths = {name: table.loc[table["split"] == name, "image"].tolist() for name in SPLIT_NAMES}
        num_shards = {name: min(shards_for(paths[name]), max(1, len(paths[name]))) for name in SPLIT_NAMES}
    atomic_save(
        dataset_dict,
        output_dir,
        overwrite=overwrite,
        extra_files={
            SKIP_REPORT_NAME: report,
            SPLITS_FILE_NAME: table[["image_id", "group_id", "split"]],
            METADATA_WARNINGS_NAME: metadata_issue_table(metadata_issues),
        },
        num_shards=num_shards,
        recorded=recorded,
        **inputs,
    )


def metadata_issue_table(issues: Sequence[MetadataIssue]) -> pd.DataFrame:
    """``metadata_warnings.csv``: one row per value left out or cut (row, field, value, problem)."""
    return pd.DataFrame([vars(issue) for issue in issues], columns=["row", "field", "value", "problem"])


def print_metadata_issues(issues: Sequence[MetadataIssue], stream=None) -> None:
    """One ``warning:`` line per issue on stderr, at most `MAX_WARNINGS_SHOWN`, then a count of the rest."""
    stream = stream or sys.stderr
    for issue in issues[:MAX_WARNINGS_SHOWN]:
        print(f"warning: {issue}", file=stream)
    if len(issues) > MAX_WARNINGS_SHOWN:
        print(
            f"warning: ... and {len(issues) - MAX_WARNINGS_SHOWN} more (all in {METADATA_WARNINGS_NAME})", file=stream
        )
