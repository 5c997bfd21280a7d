"""Derm7pt converter on the real meta files, with generated stand-in images (the real ones may not be shared).

The tests run on the tests/data cut (49 cases covering all 20 diagnosis strings, the official split index files
renumbered to them); the complete release's counts are also checked on ../shared/data when it is there.
"""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datasets_scripts import derm7pt
from datasets_scripts.common import DataError

# Counted in the meta files: ../shared/data/SOURCES.md for the release,
# tests/data/build_test_data.py's rules for the cut.
EXPECTED = {
    "tests/data": dict(
        counts={"BCC": 10, "NEV": 14, "MEL": 12, "MISC": 11, "SK": 2},
        splits={"train": 21, "validation": 10, "test": 18},
    ),
    "shared/data": dict(
        counts={"BCC": 42, "NEV": 575, "MEL": 252, "MISC": 97, "SK": 45},
        splits={"train": 413, "validation": 203, "test": 395},
    ),
}


def _make_release(data_dir, root):
    """release_v0 layout: the real meta files and one tiny stand-in image per dermoscopic path (exact case)."""
    (root / "meta").mkdir()
    for name in ["meta.csv", "train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"]:
        shutil.copy(data_dir / "derm7pt" / name, root / "meta" / name)
    meta = pd.read_csv(root / "meta" / "meta.csv")
    for index, relative in enumerate(meta["derm"]):
        path = root / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index % 251, 80, 40)).save(path, format="JPEG")
    return root


@pytest.fixture(scope="module")
def release(sample_data, tmp_path_factory):
    return _make_release(sample_data, tmp_path_factory.mktemp("derm7pt"))


@pytest.fixture(scope="module", params=list(EXPECTED))
def any_release(request, sample_data, tmp_path_factory):
    """(source, release) for the cut and, where ../shared/data is there, the complete release."""
    if request.param == "tests/data":
        return request.param, _make_release(sample_data, tmp_path_factory.mktemp("derm7pt"))
    return request.param, _make_release(request.getfixturevalue("shared_data"), tmp_path_factory.mktemp("derm7pt-full"))


def test_table_counts_and_official_splits(any_release):
    source, release = any_release
    expected = EXPECTED[source]
    table = derm7pt.load_table(release / "meta" / "meta.csv")
    assert len(table) == sum(expected["counts"].values())
    counts = np.bincount(table["label"], minlength=5)
    assert dict(zip(derm7pt.CLASS_NAMES, counts.tolist())) == expected["counts"]
    assert table["split"].value_counts().to_dict() == expected["splits"]
    assert set(derm7pt.DIAGNOSIS_TO_CLASS) == set(pd.read_csv(release / "meta" / "meta.csv")["diagnosis"])


def test_no_leak_in_prompt_or_columns(release):
    table = derm7pt.load_table(release / "meta" / "meta.csv")
    meta = pd.read_csv(release / "meta" / "meta.csv")
    for column in derm7pt.LEAK_COLUMNS:
        assert column not in table.columns
    texts = " ".join(table["metadata_text"]).lower()
    for word in ["excision", "follow up", "no further examination", "score", "difficulty", "melanoma", "nevus"]:
        assert word not in texts, word
    assert table["metadata_text"][0] == "A lesion on the abdomen of a female patient. The lesion is nodular."
    first = table.iloc[0]
    assert first["report"].startswith("Seven-point checklist: pigment network absent; streaks absent;")
    assert first["report"].endswith("vascular structures arborizing. Diagnosis: basal cell carcinoma.")
    assert str(meta["seven_point_score"][0]) not in first["metadata_text"]


def test_convert_keeps_official_split_sizes(any_release, tmp_path):
    from datasets import load_from_disk

    source, release = any_release
    derm7pt.convert(release, tmp_path / "out")
    loaded = load_from_disk(str(tmp_path / "out"))
    assert {name: len(split) for name, split in loaded.items()} == EXPECTED[source]["splits"]
    assert loaded["test"].features["label"].names == derm7pt.CLASS_NAMES
    assert "management" not in loaded["train"].column_names
    assert loaded["train"][0]["image"].size == (8, 8)


def test_wrong_case_path_is_absent(release, tmp_path):
    broken = tmp_path / "release"
    shutil.copytree(release, broken)
    meta = pd.read_csv(broken / "meta" / "meta.csv")
    first = broken / "images" / meta["derm"][0]
    first.rename(first.with_name(first.name.upper() if first.name != first.name.upper() else first.name.lower()))
    with pytest.raises(DataError, match="derm7pt_case_0001"):
        derm7pt.convert(broken, tmp_path / "out", verify_images=False)
    assert not (tmp_path / "out").exists()


def test_unknown_diagnosis_names_the_case(release, tmp_path):
    meta = pd.read_csv(release / "meta" / "meta.csv", dtype=str, keep_default_na=False)
    meta.loc[4, "diagnosis"] = "psoriasis"
    meta.to_csv(tmp_path / "meta.csv", index=False)
    for name in ["train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"]:
        shutil.copy(release / "meta" / name, tmp_path / name)
    with pytest.raises(DataError, match="derm7pt_case_0005.*psoriasis"):
        derm7pt.load_table(tmp_path / "meta.csv")


def test_non_integer_split_index_names_file_and_value(release, tmp_path):
    shutil.copy(release / "meta" / "meta.csv", tmp_path / "meta.csv")
    for name in ["train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"]:
        shutil.copy(release / "meta" / name, tmp_path / name)
    (tmp_path / "valid_indexes.csv").write_text("indexes\n3\nabc\n4.5\n")
    with pytest.raises(DataError, match=r"valid_indexes\.csv: row index\(es\) \['abc', '4\.5'\] are not whole numbers"):
        derm7pt.load_table(tmp_path / "meta.csv")
