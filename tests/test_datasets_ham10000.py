"""HAM10000 converter on the real metadata files."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datasets_scripts import ham10000, isic2019

EXPECTED = {"MEL": 1113, "NV": 6705, "BCC": 514, "AK": 327, "BKL": 1099, "DF": 115, "VASC": 142}


@pytest.fixture(scope="module")
def table(shared_data):
    return ham10000.load_table(shared_data / "ham10000" / "HAM10000_metadata.csv")


def test_counts_groups_and_missing(table):
    assert len(table) == 10015
    assert dict(zip(ham10000.CLASS_NAMES, np.bincount(table["label"], minlength=7).tolist())) == EXPECTED
    assert table["group_id"].nunique() == 7470
    assert table["age"].isna().sum() == 57 and table["sex"].isna().sum() == 57 and table["localization"].isna().sum() == 234
    assert ham10000.CLASS_NAMES == isic2019.CLASS_NAMES[:7]


def test_dx_type_never_reaches_prompt(table):
    assert "dx_type" not in table.columns
    texts = " ".join(table["metadata_text"])
    for word in ["histo", "follow_up", "follow up", "consensus", "confocal", "unknown"]:
        assert word not in texts, word


def test_subset_of_isic2019(table, shared_data):
    truth = pd.read_csv(shared_data / "isic2019" / isic2019.GROUND_TRUTH_FILE)
    isic_ids = set(truth["image"].str.replace("_downsampled", "", regex=False))
    assert set(table["image_id"]) <= isic_ids
    assert "subset of ISIC 2019" in ham10000.SUBSET_NOTE


def test_convert_with_dataset_column(shared_data, tmp_path):
    meta = pd.read_csv(shared_data / "ham10000" / "HAM10000_metadata_with_dataset.csv", dtype=str)
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
