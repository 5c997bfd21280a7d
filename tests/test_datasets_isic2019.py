"""ISIC 2019 converter on the real CSVs and the real sample images.

The tests run on the tests/data cut (261 real rows, whole lesions; tests/data/NOTICE.md); those about the
complete files' numbers also run on the 25,331 rows in ../shared/data when it is there.
"""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datasets_scripts import isic2019
from datasets_scripts.splits import make_splits

# What each source holds, counted in its CSVs: ../shared/data/SOURCES.md for the complete files, the cut's rules
# (tests/data/build_test_data.py) for tests/data. Missing values stay missing: never filled in.
EXPECTED = {
    "tests/data": dict(
        rows=261,
        counts={"MEL": 55, "NV": 82, "BCC": 20, "AK": 16, "BKL": 35, "DF": 20, "VASC": 20, "SCC": 13},
        age=15,
        site=22,
        sex=14,
        lesion=97,
        downsampled=77,
        repeated_lesions=56,
    ),
    "shared/data": dict(
        rows=25331,
        counts={"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628},
        age=437,
        site=2631,
        sex=384,
        lesion=2084,
        downsampled=2074,
        repeated_lesions=5059,
    ),
}
# Absolute, per class and split: 0.01 on the full 25k rows; on the 261-row cut, one row of a 37-row split (0.027).
PROPORTION_TOLERANCE = {"tests/data": 0.03, "shared/data": 0.01}


@pytest.fixture(scope="module")
def isic_dir(sample_data):
    return sample_data / "isic2019"


def _load(isic_dir):
    return isic2019.load_table(isic_dir / isic2019.GROUND_TRUTH_FILE, isic_dir / isic2019.METADATA_FILE)


@pytest.fixture(scope="module")
def table(isic_dir):
    return _load(isic_dir)


@pytest.fixture(scope="module", params=list(EXPECTED))
def any_table(request, sample_data):
    """(source, table) for the cut and, where ../shared/data is there, the complete files."""
    root = sample_data if request.param == "tests/data" else request.getfixturevalue("shared_data")
    return request.param, _load(root / "isic2019")


def test_csv_row_and_class_counts(any_table):
    source, table = any_table
    expected = EXPECTED[source]
    assert len(table) == expected["rows"]
    counts = np.bincount(table["label"], minlength=8)
    assert dict(zip(isic2019.CLASS_NAMES, counts.tolist())) == expected["counts"]
    assert isic2019.CLASS_NAMES == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert table["age_approx"].isna().sum() == expected["age"]
    assert table["anatom_site_general"].isna().sum() == expected["site"]
    assert table["sex"].isna().sum() == expected["sex"]
    assert table["lesion_id"].isna().sum() == expected["lesion"]
    assert table["image_id"].str.endswith("_downsampled").sum() == expected["downsampled"]


def test_rows_without_lesion_id_are_their_own_group(any_table):
    source, table = any_table
    no_lesion = table[table["lesion_id"].isna()]
    assert no_lesion["group_id"].is_unique
    assert (no_lesion["group_id"] == "image:" + no_lesion["image_id"]).all()
    repeated = table["lesion_id"].value_counts()
    assert (repeated > 1).sum() == EXPECTED[source]["repeated_lesions"]


def test_full_splits_grouped_and_stratified(any_table):
    source, table = any_table
    labels, groups = table["label"].to_numpy(), table["group_id"].to_numpy()
    splits = make_splits(labels, groups, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert sum(len(rows) for rows in splits.values()) == len(table)
    assert len(np.unique(np.concatenate(list(splits.values())))) == len(table)
    group_sets = {name: set(groups[rows]) for name, rows in splits.items()}
    assert not group_sets["train"] & group_sets["validation"]
    assert not group_sets["train"] & group_sets["test"]
    assert not group_sets["validation"] & group_sets["test"]
    overall = np.bincount(labels, minlength=8) / len(labels)
    for name, rows in splits.items():
        proportions = np.bincount(labels[rows], minlength=8) / len(rows)
        assert np.abs(proportions - overall).max() < PROPORTION_TOLERANCE[source], name
    assert 0.12 < len(splits["test"]) / len(table) < 0.18


def test_no_label_in_metadata_text(table):
    texts = table["metadata_text"]
    assert texts.iloc[0] == "A lesion on the anterior torso of a female patient aged about 55."
    for word in ["melanoma", "nevus", "carcinoma", "keratosis", "MEL", "HAM_", "lesion_id", "IL_"]:
        assert not texts.str.contains(word, regex=False).any(), word


def test_gender_header_variant(isic_dir, tmp_path):
    metadata = pd.read_csv(isic_dir / isic2019.METADATA_FILE, dtype=str).head(50).rename(columns={"sex": "gender"})
    truth = pd.read_csv(isic_dir / isic2019.GROUND_TRUTH_FILE, dtype=str).head(50)
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    loaded = isic2019.load_table(tmp_path / "truth.csv", tmp_path / "meta.csv")
    assert loaded["sex"].notna().sum() == metadata["gender"].notna().sum()


@pytest.fixture(scope="module")
def subset_layout(sample_data, isic_dir, tmp_path_factory):
    """Official layout for a 60-row subset: the 31 real images plus tiny stand-ins for repeated lesions."""
    root = tmp_path_factory.mktemp("isic2019")
    truth = pd.read_csv(isic_dir / isic2019.GROUND_TRUTH_FILE, dtype=str)
    metadata = pd.read_csv(isic_dir / isic2019.METADATA_FILE, dtype=str)
    labels = pd.read_csv(sample_data / "images" / "labels.csv")
    real = labels[labels["dataset"] == "ISIC2019"]
    (root / isic2019.IMAGE_DIR).mkdir()
    for file, image_id in zip(real["file"], real["image_id"]):
        shutil.copy(
            sample_data / "images" / file, root / isic2019.IMAGE_DIR / f"{image_id.replace('_downsampled', '')}.jpg"
        )
    # Two images of each of 14 lesions (all eight classes) as generated stand-ins.
    joined = truth.merge(metadata, on="image")
    joined["cls"] = joined[isic2019.CLASS_NAMES].astype(float).to_numpy().argmax(axis=1)
    multi = joined[joined["lesion_id"].notna()].groupby("lesion_id").filter(lambda g: len(g) == 2)
    picked = multi.groupby("cls").head(4).head(30)["image"].tolist()
    picked_lesions = set(joined.set_index("image").loc[picked, "lesion_id"])
    stand_in = joined[joined["lesion_id"].isin(picked_lesions)]["image"].tolist()
    for index, image_id in enumerate(stand_in):
        Image.new("RGB", (12, 10), (index * 7 % 255, 90, 60)).save(root / isic2019.IMAGE_DIR / f"{image_id}.png")
    keep = set(real["image_id"]) | set(stand_in)
    truth[truth["image"].isin(keep)].to_csv(root / isic2019.GROUND_TRUTH_FILE, index=False)
    metadata[metadata["image"].isin(keep)].to_csv(root / isic2019.METADATA_FILE, index=False)
    return root, len(keep)


def test_convert_subset_and_save(subset_layout, tmp_path):
    from datasets import load_from_disk

    root, n_rows = subset_layout
    output = tmp_path / "out"
    isic2019.convert(root, output, val_fraction=0.2, test_fraction=0.2, seed=1)
    loaded = load_from_disk(str(output))
    assert sorted(loaded) == ["test", "train", "validation"]
    assert sum(len(split) for split in loaded.values()) == n_rows
    assert loaded["train"].features["label"].names == isic2019.CLASS_NAMES
    for column in [
        "image_id",
        "image",
        "label",
        "metadata_text",
        "report",
        "group_id",
        "age_approx",
        "sex",
        "anatom_site_general",
        "lesion_id",
    ]:
        assert column in loaded["train"].column_names
    groups = {name: set(split["group_id"]) for name, split in loaded.items()}
    assert (
        not (groups["train"] & groups["validation"])
        and not (groups["train"] & groups["test"])
        and not (groups["validation"] & groups["test"])
    )
    row = loaded["train"][0]
    assert row["image"].size[0] > 0  # bytes embedded: readable after the source folder is gone
    assert row["report"].startswith("Diagnosis: ")
    assert (output / "splits.csv").is_file() and (output / "skipped_images.csv").is_file()
    assert "HAM10000" in loaded["train"].info.description
