"""Shared pieces of datasets_scripts: metadata text, splits, bad input, atomic saving, the demo set."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datasets_scripts import isic2019
from datasets_scripts.common import DataError, read_csv
from datasets_scripts.demo import DEMO_CLASSES, build_demo_dataset
from datasets_scripts.metadata_text import NEUTRAL_TEXT, describe_metadata, load_offline_descriptions
from datasets_scripts.splits import make_splits, subsample_train

# ----------------------------------------------------------------------------------------- metadata text


def test_template_full_and_contract_example():
    assert (
        describe_metadata(age=55, sex="male", site="posterior torso")
        == "A lesion on the posterior torso of a male patient aged about 55."
    )
    assert (
        describe_metadata(age=55.0, sex="FEMALE", site="head/neck")
        == "A lesion on the head or neck of a female patient aged about 55."
    )


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(age=None, sex="male", site="back"), "A lesion on the back of a male patient."),
        (dict(age=float("nan"), sex="", site="back"), "A lesion on the back."),
        (dict(age=40, sex="unknown", site=None), "A lesion of a patient aged about 40."),
        (dict(age="", sex="female", site="nan"), "A lesion of a female patient."),
        (dict(age=None, sex=None, site=None), NEUTRAL_TEXT),
        (dict(age="  ", sex="Unknown", site="unknown"), NEUTRAL_TEXT),
        (dict(), NEUTRAL_TEXT),
    ],
)
def test_template_leaves_out_blank_fields(kwargs, expected):
    assert describe_metadata(**kwargs) == expected


def test_template_extras_and_determinism():
    text = describe_metadata(
        sex="male", site="lower limbs", elevation="Palpable", diameter_mm=3.14159, elevation_note=None
    )
    assert (
        text == "A lesion on the lower limbs of a male patient. The lesion is palpable. "
        "Its longest diameter is about 3.1 mm."
    )
    assert describe_metadata(elevation="flat") == "A skin lesion. The lesion is flat."
    assert describe_metadata(age=55, sex="male", site="palms/soles") == describe_metadata(
        age=55, sex="male", site="palms/soles"
    )


def test_offline_descriptions_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "descriptions.jsonl"
    jsonl.write_text(
        json.dumps({"image_id": "ISIC_0000000", "text": "Rewritten."})
        + "\n\n"
        + json.dumps({"image_id": "ISIC_0000001", "text": "Other."})
        + "\n"
    )
    assert load_offline_descriptions(jsonl) == {"ISIC_0000000": "Rewritten.", "ISIC_0000001": "Other."}
    csv_path = tmp_path / "descriptions.csv"
    pd.DataFrame({"image_id": ["a"], "text": ["x"]}).to_csv(csv_path, index=False)
    assert load_offline_descriptions(csv_path) == {"a": "x"}
    jsonl.write_text(
        json.dumps({"image_id": "a", "text": "x"}) + "\n" + json.dumps({"image_id": "a", "text": "y"}) + "\n"
    )
    with pytest.raises(ValueError, match="line 2 repeats image_id 'a'"):
        load_offline_descriptions(jsonl)
    pd.DataFrame({"image_id": ["a"], "description": ["x"]}).to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="'text'"):
        load_offline_descriptions(csv_path)


# ------------------------------------------------------------------------------------------------ splits


def test_make_splits_seeded_grouped_stratified():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=2000, p=[0.5, 0.3, 0.15, 0.05])
    groups = np.array([f"g{index // 3}" for index in range(2000)])  # groups of 3 rows; one class per group
    labels = labels[np.arange(2000) // 3 * 3]
    first = make_splits(labels, groups, 0.15, 0.15, seed=3)
    again = make_splits(labels, groups, 0.15, 0.15, seed=3)
    other = make_splits(labels, groups, 0.15, 0.15, seed=4)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["test"], other["test"])
    seen = {name: set(groups[rows]) for name, rows in first.items()}
    assert not (seen["train"] & seen["validation"] or seen["train"] & seen["test"] or seen["validation"] & seen["test"])
    overall = np.bincount(labels, minlength=4) / len(labels)
    for rows in first.values():
        assert np.abs(np.bincount(labels[rows], minlength=4) / len(rows) - overall).max() < 0.03


def test_subsample_train_only_and_stratified():
    dataset = build_demo_dataset(num_per_class=25, image_size=16, seed=0)
    train = dataset["train"]
    small = subsample_train(train, 0.12, seed=0)
    counts_before = np.bincount(train["label"], minlength=4)
    counts_after = np.bincount(small["label"], minlength=4)
    assert (counts_after == np.maximum(1, np.round(0.12 * counts_before))).all()
    assert subsample_train(train, 0.12, seed=0)["image_id"] == small["image_id"]
    positions = subsample_train(np.repeat([0, 1], [100, 900]), 0.12, seed=1)
    assert np.bincount(np.repeat([0, 1], [100, 900])[positions]).tolist() == [12, 108]
    with pytest.raises(ValueError, match="train_fraction"):
        subsample_train(train, 0.0)


# -------------------------------------------------------------------------------------------- bad input


@pytest.fixture()
def tiny_isic(sample_data, tmp_path):
    """Official ISIC 2019 layout for 12 real rows with stand-in images."""
    root = tmp_path / "isic"
    (root / isic2019.IMAGE_DIR).mkdir(parents=True)
    truth = pd.read_csv(sample_data / "isic2019" / isic2019.GROUND_TRUTH_FILE, dtype=str).iloc[:12]
    metadata = pd.read_csv(sample_data / "isic2019" / isic2019.METADATA_FILE, dtype=str).iloc[:12]
    truth.to_csv(root / isic2019.GROUND_TRUTH_FILE, index=False)
    metadata.to_csv(root / isic2019.METADATA_FILE, index=False)
    for image_id in truth["image"]:
        Image.new("RGB", (8, 8), (180, 120, 90)).save(root / isic2019.IMAGE_DIR / f"{image_id}.jpg")
    return root, truth, metadata


def test_missing_column_names_file_and_column(tiny_isic):
    root, truth, _ = tiny_isic
    truth.drop(columns=["BKL"]).to_csv(root / isic2019.GROUND_TRUTH_FILE, index=False)
    with pytest.raises(DataError, match=r"ISIC_2019_Training_GroundTruth\.csv: missing required column\(s\) \['BKL'\]"):
        isic2019.convert(root, root.parent / "out")
    other = root / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"other\.csv: missing required column\(s\) \['nope'\]"):
        read_csv(other, ["a", "nope"])


def test_label_outside_class_list_names_the_id(tiny_isic):
    root, truth, _ = tiny_isic
    truth.loc[3, isic2019.CLASS_NAMES] = "0.0"
    truth.loc[3, "UNK"] = "1.0"
    truth.to_csv(root / isic2019.GROUND_TRUTH_FILE, index=False)
    with pytest.raises(DataError, match=truth.loc[3, "image"]):
        isic2019.convert(root, root.parent / "out")


def test_duplicated_id_named(tiny_isic):
    root, truth, _ = tiny_isic
    pd.concat([truth, truth.iloc[[5]]]).to_csv(root / isic2019.GROUND_TRUTH_FILE, index=False)
    with pytest.raises(DataError, match=f"duplicated image id.*{truth.loc[5, 'image']}"):
        isic2019.convert(root, root.parent / "out")


def test_image_absent_on_disk_named(tiny_isic):
    root, truth, _ = tiny_isic
    (root / isic2019.IMAGE_DIR / f"{truth.loc[7, 'image']}.jpg").unlink()
    with pytest.raises(DataError, match=f"absent on disk.*{truth.loc[7, 'image']}"):
        isic2019.convert(root, root.parent / "out")


def test_truncated_and_non_image_files_skipped_or_strict(tiny_isic):
    from datasets import load_from_disk

    root, truth, _ = tiny_isic
    truncated, not_image = truth.loc[2, "image"], truth.loc[9, "image"]
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / isic2019.IMAGE_DIR / f"{truncated}.jpg", quality=95)
    data = (root / isic2019.IMAGE_DIR / f"{truncated}.jpg").read_bytes()
    (root / isic2019.IMAGE_DIR / f"{truncated}.jpg").write_bytes(data[: len(data) // 2])
    (root / isic2019.IMAGE_DIR / f"{not_image}.jpg").write_text("<html>not an image</html>")

    dataset = isic2019.convert(root, root.parent / "out", val_fraction=0.2, test_fraction=0.2)
    assert sorted(dataset.skip_report.image_ids) == sorted([truncated, not_image])
    skipped = pd.read_csv(root.parent / "out" / "skipped_images.csv")
    assert sorted(skipped["image_id"]) == sorted([truncated, not_image])
    loaded = load_from_disk(str(root.parent / "out"))
    assert sum(len(split) for split in loaded.values()) == 10
    for split in loaded.values():
        for row in split:  # every kept row decodes: no crash deep inside training
            assert row["image"].size == (8, 8)

    with pytest.raises(DataError, match=f"{truncated}|{not_image}"):
        isic2019.convert(root, root.parent / "strict", strict=True)
    assert not (root.parent / "strict").exists()


def test_failed_run_leaves_previous_output_intact(tiny_isic):
    from datasets import load_from_disk

    root, truth, _ = tiny_isic
    isic2019.convert(root, root.parent / "out", val_fraction=0.2, test_fraction=0.2)
    before = sorted((root.parent / "out").rglob("*"))
    with pytest.raises(FileExistsError):
        isic2019.convert(root, root.parent / "out")
    (root / isic2019.IMAGE_DIR / f"{truth.loc[0, 'image']}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError):
        isic2019.convert(root, root.parent / "out", overwrite=True, strict=True)
    assert sorted((root.parent / "out").rglob("*")) == before
    assert sum(len(split) for split in load_from_disk(str(root.parent / "out")).values()) == 12
    assert not [path for path in root.parent.iterdir() if path.name.startswith(".out.tmp-")]


def test_offline_descriptions_replace_template(tiny_isic):
    root, truth, _ = tiny_isic
    descriptions = root / "descriptions.jsonl"
    descriptions.write_text(json.dumps({"image_id": truth.loc[0, "image"], "text": "An offline text."}) + "\n")
    dataset = isic2019.convert(
        root, None, descriptions=descriptions, val_fraction=0.2, test_fraction=0.2, verify_images=False
    )
    texts = {
        row["image_id"]: row["metadata_text"]
        for split in dataset.values()
        for row in split.select_columns(["image_id", "metadata_text"])
    }
    assert texts[truth.loc[0, "image"]] == "An offline text."
    assert texts[truth.loc[1, "image"]] == "A lesion on the anterior torso of a female patient aged about 30."


# ------------------------------------------------------------------------------------------------- demo


def test_demo_schema_determinism_and_groups(tmp_path):
    from datasets import load_from_disk

    first = build_demo_dataset(num_per_class=24, image_size=32, seed=0, output_dir=str(tmp_path / "demo"))
    again = build_demo_dataset(num_per_class=24, image_size=32, seed=0)
    assert sorted(first) == ["test", "train", "validation"]
    assert first["train"].features["label"].names == DEMO_CLASSES
    for name in first:
        assert first[name]["image_id"] == again[name]["image_id"]
        assert first[name]["metadata_text"] == again[name]["metadata_text"]
    assert np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(again["train"][0]["image"]))
    assert sum(len(split) for split in first.values()) == 96
    all_groups = [group for split in first.values() for group in split["group_id"]]
    assert pd.Series(all_groups).value_counts().max() == 2
    seen = {name: set(split["group_id"]) for name, split in first.items()}
    assert not (seen["train"] & seen["validation"] or seen["train"] & seen["test"] or seen["validation"] & seen["test"])
    for split in first.values():
        assert set(split["label"]) == set(range(4))
    loaded = load_from_disk(str(tmp_path / "demo"))
    assert loaded["train"][0]["report"].startswith("Diagnosis: ")


def test_demo_classes_learnable_from_image():
    """A nearest-centroid rule on mean colour already separates the classes: a tiny model can learn them."""
    dataset = build_demo_dataset(num_per_class=24, image_size=32, seed=1)

    def colour_features(split):
        images = np.stack([np.asarray(image, dtype=np.float32) for image in split["image"]])
        dark = images.mean(axis=3) < 120
        return np.concatenate(
            [images.mean(axis=(1, 2)), images.std(axis=(1, 2)), dark.mean(axis=(1, 2))[:, None] * 255], axis=1
        )

    train_x, train_y = colour_features(dataset["train"]), np.asarray(dataset["train"]["label"])
    test_x, test_y = colour_features(dataset["test"]), np.asarray(dataset["test"]["label"])
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    assert (model.predict(test_x) == test_y).mean() >= 0.85


# ------------------------------------------------------------------------ output safety (issue 12)


def _hashes(folder):
    """sha256 of every file under ``folder`` (relative path → digest): a byte-identical check of the raw data."""
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_destructive_output_folder_is_refused_and_data_untouched(tiny_isic):
    """`--output-dir` = the download folder with --overwrite used to delete the CSVs, the images and all else."""
    root, _, _ = tiny_isic
    (root / "my_notes.txt").write_text("unrelated file the user keeps here")
    before = _hashes(root.parent)
    repo = Path(__file__).resolve().parents[1]
    for output in (root, root.parent, root / isic2019.IMAGE_DIR):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "datasets_scripts.isic2019",
                "--data-dir",
                str(root),
                "--output-dir",
                str(output),
                "--overwrite",
                "--no-verify-images",
            ],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        relation = {root: "is", root.parent: "contains", root / isic2019.IMAGE_DIR: "lies inside"}[output]
        assert run.returncode == 1, run.stderr
        assert run.stderr.splitlines() == [
            f"error: output folder {output} {relation} the input folder {root}; "
            "choose a folder outside the input (--output-dir)"
        ]
        assert _hashes(root.parent) == before


def test_overwrite_replaces_only_a_previous_conversion(tiny_isic, capsys):
    from skinclip.errors import run_entry_point

    root, _, _ = tiny_isic
    mine = root.parent / "my_folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    before = _hashes(mine)
    argv = [
        "--data-dir",
        str(root),
        "--output-dir",
        str(mine),
        "--overwrite",
        "--no-verify-images",
        "--val-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
    ]
    assert run_entry_point(isic2019.main, argv) == 1
    assert capsys.readouterr().err == (
        f"error: {mine} is not the output of a previous conversion (no "
        ".skinclip-conversion.json); --overwrite replaces only those: delete it "
        "yourself or choose another --output-dir\n"
    )
    assert _hashes(mine) == before

    output = root.parent / "converted"
    argv[3] = str(output)
    assert run_entry_point(isic2019.main, argv) == 0
    marker = json.loads((output / ".skinclip-conversion.json").read_text())
    assert marker["written_by"] == "skinclip datasets_scripts" and "ISIC 2019" in marker["description"]
    (output / "stale.txt").write_text("from the previous conversion")
    assert run_entry_point(isic2019.main, argv) == 0  # a marked folder is replaced whole
    assert not (output / "stale.txt").exists() and (output / ".skinclip-conversion.json").is_file()
    assert run_entry_point(isic2019.main, argv[:4] + argv[5:]) == 1  # exists, no --overwrite
    assert capsys.readouterr().err.endswith(
        f"error: {output} exists; pass overwrite=True (--overwrite) to replace it\n"
    )


def test_isic2024_output_may_not_contain_its_input_files(tmp_path, capsys):
    from datasets_scripts import isic2024
    from skinclip.errors import run_entry_point

    (tmp_path / "train-metadata.csv").write_text("isic_id,target,patient_id\nISIC_1,0,P1\n")
    (tmp_path / "train-image.hdf5").write_bytes(b"not read")
    before = _hashes(tmp_path)
    code = run_entry_point(
        isic2024.main,
        [
            "--metadata-csv",
            str(tmp_path / "train-metadata.csv"),
            "--hdf5",
            str(tmp_path / "train-image.hdf5"),
            "--output-dir",
            str(tmp_path),
            "--overwrite",
        ],
    )
    assert code == 1 and _hashes(tmp_path) == before
    assert capsys.readouterr().err == (
        f"error: output folder {tmp_path} contains the input file "
        f"{tmp_path / 'train-metadata.csv'}; choose another folder (--output-dir)\n"
    )


# ---------------------------------------------------------------------- hostile metadata (issue 12)


def test_bad_ages_and_long_texts_are_dropped_per_row_with_warnings(tiny_isic, capsys):
    from datasets import load_from_disk

    root, truth, metadata = tiny_isic
    ids = truth["image"].tolist()
    metadata.loc[0, "age_approx"] = "abc"
    metadata.loc[1, "age_approx"] = "inf"
    metadata.loc[2, "age_approx"] = "-5"
    metadata.loc[3, "age_approx"] = "1e400"
    metadata.loc[4, "anatom_site_general"] = "posterior torso " * 50
    metadata.to_csv(root / isic2019.METADATA_FILE, index=False)
    output = root.parent / "out"
    dataset = isic2019.convert(root, output, val_fraction=0.2, test_fraction=0.2, verify_images=False)
    meta_csv = root / isic2019.METADATA_FILE
    expected = [
        f"{meta_csv} image {ids[0]}: age_approx 'abc' is not a number; left out",
        f"{meta_csv} image {ids[1]}: age_approx 'inf' is not a finite number; left out",
        f"{meta_csv} image {ids[2]}: age_approx '-5' is outside 0-120 years; left out",
        f"{meta_csv} image {ids[3]}: age_approx '1e400' is not a finite number; left out",
    ]
    assert [str(issue) for issue in dataset.metadata_issues][:4] == expected
    assert str(dataset.metadata_issues[4]).endswith("is longer than 100 characters; cut")
    assert len(dataset.metadata_issues) == 5
    err = capsys.readouterr().err
    assert all(f"warning: {line}" in err for line in expected)
    saved = pd.read_csv(output / "metadata_warnings.csv")
    assert saved["row"].tolist() == [f"{meta_csv} image {image_id}" for image_id in ids[:5]]
    rows = {row["image_id"]: row for split in load_from_disk(str(output)).values() for row in split}
    assert all(rows[image_id]["age_approx"] is None for image_id in ids[:4])
    assert rows[ids[0]]["metadata_text"] == describe_metadata(
        sex=metadata.loc[0, "sex"], site=metadata.loc[0, "anatom_site_general"]
    )
    assert len(rows[ids[4]]["anatom_site_general"]) <= 100 and len(rows) == 12


def test_non_utf8_csv_names_file_and_line(tiny_isic, capsys):
    from skinclip.errors import run_entry_point

    root, _, _ = tiny_isic
    meta_csv = root / isic2019.METADATA_FILE
    lines = meta_csv.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b",", b",\xe9", 1)  # a Latin-1 byte in the fourth data row (line 5)
    meta_csv.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"line 5, column \d+ is not UTF-8 text"):
        isic2019.load_table(root / isic2019.GROUND_TRUTH_FILE, meta_csv)
    assert run_entry_point(isic2019.main, ["--data-dir", str(root), "--csv-only"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {meta_csv}: line 5, column ") and err.endswith("save the file as UTF-8\n")
    assert err.count("\n") == 1


def test_describe_metadata_never_raises_on_hostile_values():
    hostile = ["abc", "inf", "-inf", "nan", "1e400", 1e308, float("inf"), -3, 10**400, "\x00", "x" * 10**6, b"\xff"]
    for value in hostile:
        text = describe_metadata(age=value, sex=value, site=value, elevation=value, diameter_mm=value)
        assert isinstance(text, str) and len(text) < 400
        assert "aged" not in text and "diameter" not in text  # no such value is an age or a measurement


def test_converters_store_large_images_downscaled_and_record_the_bound(tiny_isic):
    """A huge image stored as it was set a training run's peak memory (issue 22): it is stored downscaled."""
    from datasets import load_from_disk

    from datasets_scripts.common import MARKER_NAME

    root, truth, _ = tiny_isic
    image_dir = root / isic2019.IMAGE_DIR
    wide, tall = truth.loc[0, "image"], truth.loc[1, "image"]
    Image.new("RGB", (3000, 120), (200, 40, 40)).save(image_dir / f"{wide}.jpg", quality=90)
    Image.new("L", (90, 1500), 77).save(image_dir / f"{tall}.jpg")
    small = (image_dir / f"{truth.loc[2, 'image']}.jpg").read_bytes()
    out = root.parent / "out"
    isic2019.convert(root, out, val_fraction=0.2, test_fraction=0.2, max_image_side=300)
    rows = {
        row["image_id"]: row["image"]
        for split in load_from_disk(str(out)).values()
        for row in split.cast_column("image", split.features["image"].__class__(decode=False))
    }
    sizes = {image_id: Image.open(io.BytesIO(image["bytes"])).size for image_id, image in rows.items()}
    assert sizes[wide] == (300, 12) and sizes[tall] == (18, 300)
    assert all(max(size) <= 300 for size in sizes.values())
    assert rows[truth.loc[2, "image"]]["bytes"] == small  # an image within the bound is stored as it is
    assert Image.open(io.BytesIO(rows[wide]["bytes"])).getpixel((150, 6)) == pytest.approx((200, 40, 40), abs=8)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["max_image_side"] == 300 and marker["images_downscaled"] == 2
    assert not [path for path in root.parent.iterdir() if path.name.startswith(".bounded-images-")]


def test_the_image_bound_is_range_checked_on_the_command_line(tiny_isic, capsys):
    root, _, _ = tiny_isic
    with pytest.raises(SystemExit):
        isic2019.main(["--data-dir", str(root), "--output-dir", str(root.parent / "out"), "--max-image-side", "10"])
    assert "argument --max-image-side: must be >= 224, got 10" in capsys.readouterr().err
    assert not (root.parent / "out").exists()


# A CSV error names the file line it happens on (header = line 1; a quoted field may span lines) and what is lost.
@pytest.mark.parametrize(
    "text, message",
    [
        (
            'image,MEL,NV\nA,"two\nlines",0\nB,1,0\nC,1,0,9\nD,1,0\n\nE,1,0\n',
            "line 5: 4 fields where the header (line 1) has 3; not read: that row and the 2 after it (lines 5-8)",
        ),
        (
            'image,MEL,NV\nA,"two\nlines",0\nB,"never closed,0\nC,1,0\nD,1,0\n',
            "line 4: a quoted field opened in this row is never closed, so it runs to the end of the file; "
            "not read: that row (lines 4-6)",
        ),
    ],
)
def test_a_csv_error_names_the_file_line_and_the_rows_not_read(tmp_path, text, message):
    table = tmp_path / "ground_truth.csv"
    table.write_text(text)
    with pytest.raises(DataError) as raised:
        read_csv(table, ["image"])
    assert str(raised.value) == f"{table}: not a readable CSV ({message})"


def test_offline_descriptions_name_the_line_a_row_starts_on(tmp_path):
    table = tmp_path / "descriptions.csv"
    table.write_text('image_id,text\na,"A text\nover two lines."\nb,Other.\na,Again.\n')
    with pytest.raises(ValueError, match=r"line 5 repeats image_id 'a'$"):
        load_offline_descriptions(table)
