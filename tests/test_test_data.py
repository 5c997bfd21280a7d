"""tests/data: listed file by file, small, real (rebuilt byte for byte from ../shared/data), and covering the cases
the tests rely on (missing values, `_downsampled` names, lesions with several images, every class)."""

import hashlib
import json

import pandas as pd
import pytest

from tests.conftest import TEST_DATA

MANIFEST = json.loads((TEST_DATA / "MANIFEST.json").read_text())
OWN_FILES = {"MANIFEST.json", "NOTICE.md", "build_test_data.py", ".gitattributes"}
MAX_BYTES = 10 * 1024 * 1024


def _data_files():
    return sorted(
        p.relative_to(TEST_DATA).as_posix()
        for p in TEST_DATA.rglob("*")
        if p.is_file() and p.name not in OWN_FILES and "__pycache__" not in p.parts
    )


def test_every_file_is_listed_with_its_sha256_and_the_folder_is_small():
    listed = {entry["file"]: entry for entry in MANIFEST["files"]}
    assert sorted(listed) == _data_files()
    for name, entry in listed.items():
        data = (TEST_DATA / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), name
    total = sum(p.stat().st_size for p in TEST_DATA.rglob("*") if p.is_file())
    assert total < MAX_BYTES, total


def test_every_source_is_named_in_the_notice():
    notice = (TEST_DATA / "NOTICE.md").read_text()
    for folder in {name.split("/")[0] for name in _data_files()}:
        assert f"`{folder}/" in notice, folder


def test_rebuilt_from_the_complete_files_byte_for_byte(shared_data, tmp_path):
    """Every CSV row is a source row unchanged (Derm7pt's index files renumbered), every image the source bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_test_data", TEST_DATA / "build_test_data.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.build(shared_data, tmp_path)
    rebuilt = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert rebuilt == sorted([*_data_files(), "MANIFEST.json"])
    for name in rebuilt:
        assert (tmp_path / name).read_bytes() == (TEST_DATA / name).read_bytes(), name


def test_the_cut_keeps_the_cases_the_tests_rely_on():
    from datasets_scripts import derm7pt, ham10000, isic2019

    isic = isic2019.load_table(
        TEST_DATA / "isic2019" / isic2019.GROUND_TRUTH_FILE, TEST_DATA / "isic2019" / isic2019.METADATA_FILE
    )
    lesion_sizes = isic.groupby("label")["lesion_id"].apply(lambda ids: ids.value_counts().max())
    assert sorted(isic["label"].unique()) == list(range(8)) and (lesion_sizes >= 2).all()  # several images per lesion
    for column in ("age_approx", "anatom_site_general", "sex", "lesion_id"):
        assert isic[column].isna().any(), column
    assert isic["image_id"].str.endswith("_downsampled").any()
    assert (
        isic["image_id"].iloc[:60]
        == pd.read_csv(TEST_DATA / "isic2019" / isic2019.GROUND_TRUTH_FILE)["image"].iloc[:60]
    ).all()
    sample_images = pd.read_csv(TEST_DATA / "images" / "labels.csv").query("dataset == 'ISIC2019'")["image_id"]
    assert set(sample_images) <= set(isic["image_id"])

    ham = ham10000.load_table(TEST_DATA / "ham10000" / "HAM10000_metadata.csv")
    assert sorted(ham["label"].unique()) == list(range(7)) and ham["group_id"].value_counts().max() >= 3
    assert set(ham["image_id"]) <= set(isic["image_id"])

    meta = pd.read_csv(TEST_DATA / "derm7pt" / "meta.csv")
    assert set(meta["diagnosis"]) == set(derm7pt.DIAGNOSIS_TO_CLASS) and (meta["clinic"] == meta["derm"]).any()
    assert meta["case_num"].iloc[:10].tolist() == list(range(1, 11))

    slice3d = pd.read_csv(TEST_DATA / "isic2024" / "train-metadata_5rows.csv")
    assert slice3d["target"].tolist().count(1) == 3


@pytest.mark.parametrize("folder, count", [("isic2019", 31), ("isic2020", 8), ("isic2024", 8)])
def test_sample_images_are_all_there(folder, count):
    assert len(list((TEST_DATA / "images" / folder).glob("*.jpg"))) == count
