"""Cut tests/data from the full sample data in ../shared/data (see tests/data/NOTICE.md).

    python tests/data/build_test_data.py [--shared ../shared/data] [--out tests/data]

Deterministic: the rows are picked by rules over the source files (no random draw), so the same sources give
the same bytes; tests/test_test_data.py regenerates the folder and compares. CSV rows are copied as raw bytes
(line ends included), never re-serialised, so every kept row is byte-identical to its source row. Derm7pt's
split index files are the one exception: they hold row numbers, which are renumbered to the kept rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
QWEN_BASE = "bases/qwen2.5-vl-7b-instruct"
# Files written here besides the data (kept when the folder is rebuilt).
OWN_FILES = {"NOTICE.md", "build_test_data.py", "MANIFEST.json", ".gitattributes"}


def _raw_rows(path: Path) -> tuple[bytes, list[bytes]]:
    """Header and data rows as raw bytes; refuses a file with a quoted line break (rows would not be lines)."""
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) - 1 != len(pd.read_csv(path, dtype=str)):
        raise ValueError(f"{path}: a field holds a line break; rows cannot be cut as lines")
    return lines[0], lines[1:]


def _write_rows(source: Path, target: Path, positions) -> int:
    header, rows = _raw_rows(source)
    positions = sorted(set(int(p) for p in positions))  # source order
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(header + b"".join(rows[p] for p in positions))
    return len(positions)


def _whole_groups(frame: pd.DataFrame, positions, key: str) -> set[int]:
    """The positions plus every other row of the same group (a lesion is kept with all its images)."""
    positions = set(int(p) for p in positions)
    keys = set(frame.loc[sorted(positions), key].dropna())
    return positions | set(frame.index[frame[key].isin(keys)])


def _lesions_of_size(frame: pd.DataFrame, rows: pd.Index, key: str, size: int, count: int) -> list[int]:
    """The first ``count`` groups (file order) among ``rows`` with exactly ``size`` rows in the FULL table."""
    sizes = frame[key].value_counts()
    keys = [k for k in dict.fromkeys(frame.loc[rows, key].dropna()) if sizes[k] == size][:count]
    return list(frame.index[frame[key].isin(keys)])


def cut_ham10000(shared: Path, out: Path) -> list[str]:
    """Per dx: 4 single-image lesions, 2 two-image lesions, 1 lesion of 3+ images; missing age/sex/site rows;
    every dx_type and every Dataverse `dataset`. Both files keep the same rows (they share the row order)."""
    meta = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv", dtype=str)
    with_dataset = pd.read_csv(shared / "ham10000" / "HAM10000_metadata_with_dataset.csv", dtype=str)
    assert (meta["image_id"] == with_dataset["image_id"]).all()
    sizes = meta["lesion_id"].map(meta["lesion_id"].value_counts())
    keep: set[int] = set()
    for dx in sorted(meta["dx"].unique()):
        rows = meta.index[meta["dx"] == dx]
        keep |= set(_lesions_of_size(meta, rows, "lesion_id", 1, 4))
        keep |= set(_lesions_of_size(meta, rows, "lesion_id", 2, 2))
        large = rows[sizes[rows] >= 3]
        keep |= set(large[:1])
    keep |= set(meta.index[meta["age"].isna()][:2])
    keep |= set(meta.index[meta["sex"] == "unknown"][:2])
    keep |= set(meta.index[meta["localization"] == "unknown"][:2])
    for column, frame in (("dx_type", meta), ("dataset", with_dataset)):
        for value in sorted(frame[column].unique()):
            keep.add(int(frame.index[frame[column] == value][0]))
    keep = _whole_groups(meta, keep, "lesion_id")
    for name in ("HAM10000_metadata.csv", "HAM10000_metadata_with_dataset.csv"):
        _write_rows(shared / "ham10000" / name, out / "ham10000" / name, keep)
    return meta.loc[sorted(keep), "image_id"].tolist()


def cut_isic2019(shared: Path, out: Path, ham_images: list[str]) -> None:
    """The first 60 rows, the rows of the real sample images and of the HAM10000 cut, and per class 3 two-image
    lesions, 1 lesion of 3+ images and 4 rows without lesion_id; rows missing age/site/sex. Whole lesions."""
    source = shared / "isic2019"
    truth = pd.read_csv(source / "ISIC_2019_Training_GroundTruth.csv", dtype=str)
    meta = pd.read_csv(source / "ISIC_2019_Training_Metadata.csv", dtype=str)
    assert (truth["image"] == meta["image"]).all()
    label = truth[ISIC_CLASSES].astype(float).to_numpy().argmax(axis=1)
    sizes = meta["lesion_id"].map(meta["lesion_id"].value_counts())
    images = pd.read_csv(shared / "images" / "labels.csv")
    wanted = set(images.loc[images["dataset"] == "ISIC2019", "image_id"]) | set(ham_images)
    keep = set(range(60)) | set(truth.index[truth["image"].isin(wanted)])
    for k in range(len(ISIC_CLASSES)):
        rows = truth.index[label == k]
        keep |= set(_lesions_of_size(meta, rows, "lesion_id", 2, 3))
        keep |= set(rows[sizes[rows] >= 3][:1])
        keep |= set(rows[meta.loc[rows, "lesion_id"].isna()][:4])
    for column in ("age_approx", "anatom_site_general", "sex"):
        keep |= set(meta.index[meta[column].isna()][:3])
    keep = _whole_groups(meta, keep, "lesion_id")
    assert set(truth.loc[sorted(keep), "image"]) >= wanted
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        _write_rows(source / name, out / "isic2019" / name, keep)


def cut_derm7pt(shared: Path, out: Path) -> None:
    """The first 10 cases, the first 2 cases of each of the 20 diagnosis strings, 3 cases whose clinical image is
    the dermoscopic one, 2 with notes; the split index files renumbered to the kept rows, in their own order."""
    source = shared / "derm7pt"
    meta = pd.read_csv(source / "meta.csv", dtype=str)
    keep = set(range(10))
    for diagnosis in sorted(meta["diagnosis"].unique()):
        keep |= set(meta.index[meta["diagnosis"] == diagnosis][:2])
    keep |= set(meta.index[meta["clinic"] == meta["derm"]][:3])
    keep |= set(meta.index[meta["notes"].notna()][:2])
    kept = sorted(keep)
    _write_rows(source / "meta.csv", out / "derm7pt" / "meta.csv", kept)
    new_position = {old: new for new, old in enumerate(kept)}
    for name in ("train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"):
        indexes = pd.read_csv(source / name)["indexes"]
        renumbered = [new_position[i] for i in indexes if i in new_position]
        (out / "derm7pt" / name).write_text("indexes\n" + "".join(f"{i}\n" for i in renumbered))


def copy_whole(shared: Path, out: Path) -> None:
    """Small files kept whole: the 5 real ISIC 2024 rows, the Derm7pt release README (its terms), the 47 sample
    images and their labels."""
    (out / "isic2024").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "isic2024" / "train-metadata_5rows.csv", out / "isic2024" / "train-metadata_5rows.csv")
    shutil.copyfile(shared / "derm7pt" / "README_release_v0.txt", out / "derm7pt" / "README_release_v0.txt")
    for path in sorted(p for p in (shared / "images").rglob("*") if p.is_file()):
        target = out / "images" / path.relative_to(shared / "images")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # bytes only: the shared copies are read-only


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(shared: Path, out: Path) -> None:
    """Every data file's bytes, sha256, rows and source; plus the source sha256 of the shipped Qwen base files."""
    source_manifest = {
        entry["file"].removeprefix("shared/data/"): entry
        for entry in json.loads((shared / "MANIFEST.json").read_text())
    }
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name not in OWN_FILES):
        relative = path.relative_to(out).as_posix()
        entry = {
            "file": relative,
            "bytes": path.stat().st_size,
            "sha256": _sha256(path),
            "source": f"shared/data/{relative}",
            "source_sha256": source_manifest[relative]["sha256"],
        }
        if path.suffix == ".csv":
            entry["rows"] = len(pd.read_csv(path, dtype=str))
            entry["source_rows"] = len(pd.read_csv(shared / relative, dtype=str))
        files.append(entry)
    bases = {
        name.rsplit("/", 1)[1]: entry["sha256"]
        for name, entry in source_manifest.items()
        if name.startswith(QWEN_BASE + "/")
    }
    manifest = {
        "total_bytes": sum(entry["bytes"] for entry in files),
        "files": files,
        "qwen2.5-vl-7b-instruct_base_files_sha256": dict(sorted(bases.items())),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


def build(shared: Path, out: Path) -> None:
    for child in out.iterdir() if out.exists() else []:
        if child.name not in OWN_FILES:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    ham_images = cut_ham10000(shared, out)
    cut_isic2019(shared, out, ham_images)
    cut_derm7pt(shared, out)
    copy_whole(shared, out)
    write_manifest(shared, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    build(args.shared, args.out)


if __name__ == "__main__":
    main()
