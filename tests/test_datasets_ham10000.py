"""HAM10000 converter on the real metadata files: the tests/data cut (88 rows, whole lesions, every dx), and for
the complete files' numbers also the 10,015 rows in ../shared/data when it is there."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datasets_scripts import ham10000, isic2019

# Counted in the CSVs: ../shared/data/SOURCES.md for the complete file,
# tests/data/build_test_data.py's rules for the cut.
EXPECTED = {
    "tests/data": dict(
        rows=88,
        counts={"MEL": 11, "NV": 11, "BCC": 11, "AK": 11, "BKL": 22, "DF": 11, "VASC": 11},
        lesions=57,
        age=2,
        sex=2,
        site=5,
    ),
    "shared/data": dict(
        rows=10015,
        counts={"MEL": 1113, "NV": 6705, "BCC": 514, "AK": 327, "BKL": 1099, "DF": 115, "VASC": 142},
        lesions=7470,
        age=57,
        sex=57,
        site=234,
    ),
}


def _root(request, sample_data):
    return sample_data if request.param == "tests/data" else request.getfixturevalue("shared_data")


@pytest.fixture(scope="module")
def table(sample_data):
    return ham10000.load_table(sample_data / "ham10000" / "HAM10000_metadata.csv")


@pytest.fixture(scope="module", params=list(EXPECTED))
def any_source(request, sample_data):
    """(source, data folder, table) for the cut and, where ../shared/data is there, the complete files."""
    root = _root(request, sample_data)
    return request.param, root, ham10000.load_table(root / "ham10000" / "HAM10000_metadata.csv")


def test_counts_groups_and_missing(any_source):
    source, _, table = any_source
    expected = EXPECTED[source]
    assert len(table) == expected["rows"]
    assert dict(zip(ham10000.CLASS_NAMES, np.bincount(table["label"], minlength=7).tolist())) == expected["counts"]
    assert table["group_id"].nunique() == expected["lesions"]
    assert table["age"].isna().sum() == expected["age"] and table["sex"].isna().sum() == expected["sex"]
    assert table["localization"].isna().sum() == expected["site"]
    assert ham10000.CLASS_NAMES == isic2019.CLASS_NAMES[:7]


def test_dx_type_never_reaches_prompt(table):
    assert "dx_type" not in table.columns
    texts = " ".join(table["metadata_text"])
    for word in ["histo", "follow_up", "follow up", "consensus", "confocal", "unknown"]:
        assert word not in texts, word


def test_subset_of_isic2019(any_source):
    # On the cut this holds because the cut keeps the ISIC 2019 rows of its HAM10000 images; the finding is the
    # complete files'. What the cut still checks: ids join once `_downsampled` is stripped.
    _, root, table = any_source
    truth = pd.read_csv(root / "isic2019" / isic2019.GROUND_TRUTH_FILE)
    isic_ids = set(truth["image"].str.replace("_downsampled", "", regex=False))
    assert set(table["image_id"]) <= isic_ids
    assert "subset of ISIC 2019" in ham10000.SUBSET_NOTE


def test_convert_with_dataset_column(sample_data, tmp_path):
    meta = pd.read_csv(sample_data / "ham10000" / "HAM10000_metadata_with_dataset.csv", dtype=str)
    meta = meta[meta["lesion_id"].isin(meta.groupby("dx")["lesion_id"].head(6))]
    data_dir = tmp_path / "ham"
    (data_dir / "HAM10000_images_part_1").mkdir(parents=True)
    meta.to_csv(data_dir / ham10000.METADATA_FILE, index=False)
    for image_id in meta["image_id"]:
        Image.new("RGB", (6, 6), (200, 120, 90)).save(data_dir / "HAM10000_images_part_1" / f"{image_id}.jpg")
    dataset = ham10000.convert(data_dir, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    assert sum(len(split) for split in dataset.values()) == len(meta)
    assert "dataset" in dataset["train"].column_names and "dx_type" not in dataset["train"].column_names
    assert ham10000.SUBSET_NOTE in dataset["train"].info.description
