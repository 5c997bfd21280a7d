"""ISIC 2024 converter: the 5 real full-width metadata rows and their real images in a small HDF5."""

import h5py
import numpy as np
import pandas as pd
import pytest

from datasets_scripts import isic2024
from datasets_scripts.common import DataError


@pytest.fixture(scope="module")
def slice3d(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("isic2024")
    metadata_csv = sample_data / "isic2024" / "train-metadata_5rows.csv"
    ids = pd.read_csv(metadata_csv)["isic_id"]
    with h5py.File(root / "train-image.hdf5", "w") as handle:
        for image_id in ids:
            handle[image_id] = np.void((sample_data / "images" / "isic2024" / f"{image_id}.jpg").read_bytes())
    return metadata_csv, root / "train-image.hdf5"


def test_leak_columns_dropped(slice3d):
    metadata_csv, _ = slice3d
    table = isic2024.load_table(metadata_csv)
    assert len(table) == 5 and table["label"].tolist().count(1) == 3
    raw = pd.read_csv(metadata_csv)
    leaked = [
        c
        for c in raw.columns
        if c == "target" or c == "lesion_id" or c.startswith(("iddx_", "mel_")) or c == "tbp_lv_dnn_lesion_confidence"
    ]
    assert len(leaked) == 11
    assert not set(leaked) & set(table.columns)
    texts = " ".join(table["metadata_text"]).lower()
    for word in ["malignant", "benign", "carcinoma", "il_", "72.2"]:
        assert word not in texts, word
    assert (
        table["metadata_text"][0]
        == "A lesion on the anterior torso of a female patient aged about 80. Its longest diameter is about 9.3 mm."
    )


def test_convert_from_hdf5(slice3d, tmp_path):
    metadata_csv, hdf5_path = slice3d
    dataset = isic2024.convert(metadata_csv, hdf5_path, tmp_path / "out", ood_only=True)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 0, "validation": 0, "test": 5}
    assert dataset["test"].features["label"].names == ["benign", "malignant"]
    assert dataset["test"][0]["image"].size[0] > 50
    assert not any(c.startswith(("iddx", "mel_")) or c in ("target", "lesion_id") for c in dataset["test"].column_names)
    assert not list(tmp_path.glob(".isic2024-build-*"))


def test_grouped_splits_and_corrupt_tile(slice3d, tmp_path):
    metadata_csv, hdf5_path = slice3d
    broken = tmp_path / "broken.hdf5"
    with h5py.File(hdf5_path, "r") as source, h5py.File(broken, "w") as target:
        for key in source:
            data = source[key][()].tobytes()
            target[key] = np.void(data[: len(data) // 3] if key == "ISIC_0157465" else data)
    dataset = isic2024.convert(metadata_csv, broken, tmp_path / "out", val_fraction=0.25, test_fraction=0.25)
    assert dataset.skip_report.image_ids == ["ISIC_0157465"]
    assert sum(len(split) for split in dataset.values()) == 4
    with pytest.raises(DataError, match="ISIC_0157465"):
        isic2024.convert(metadata_csv, broken, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_missing_tile_named(slice3d, tmp_path):
    metadata_csv, hdf5_path = slice3d
    with h5py.File(tmp_path / "partial.hdf5", "w") as handle:
        handle["ISIC_0082829"] = np.void(b"x")
    with pytest.raises(DataError, match="ISIC_0157465"):
        isic2024.convert(metadata_csv, tmp_path / "partial.hdf5", tmp_path / "out")
