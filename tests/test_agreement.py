"""skinclip.agreement: which class a rationale names, read on the real report texts the converters write."""

import math

import pytest

from datasets_scripts import derm7pt, ham10000, isic2019, isic2024
from skinclip.agreement import AMBIGUOUS, NONE, RationaleReader, class_phrases, named_phrase
from skinclip.labels import OOD_CLASSES


def _converted_tables(sample_data):
    """(class names, report table) of every converter run on the real sample files in tests/data."""
    isic = sample_data / "isic2019"
    return [
        (isic2019.CLASS_NAMES, isic2019.load_table(isic / isic2019.GROUND_TRUTH_FILE, isic / isic2019.METADATA_FILE)),
        (ham10000.CLASS_NAMES, ham10000.load_table(sample_data / "ham10000" / "HAM10000_metadata.csv")),
        (derm7pt.CLASS_NAMES, derm7pt.load_table(sample_data / "derm7pt" / "meta.csv")),
        (list(OOD_CLASSES), isic2024.load_table(sample_data / "isic2024" / "train-metadata_5rows.csv")),
    ]


def test_every_converted_report_names_its_own_class(sample_data):
    seen = 0
    for class_names, table in _converted_tables(sample_data):
        reader = RationaleReader.for_classes(class_names)
        assert reader is not None, class_names
        for report, label in zip(table["report"], table["label"]):
            assert reader.named_class(report) == class_names[label], report
            seen += 1
        # Every class of the converter that has a row here was read at least once.
        assert {class_names[label] for label in table["label"]} <= set(reader.class_names)
    assert seen > 100


def test_phrases_come_from_the_report_texts():
    assert named_phrase(isic2019.class_report("NV")) == "melanocytic nevus"
    assert class_phrases(["MEL", "NV", "BCC", "BKL"]) == {
        "MEL": ("melanoma",),
        "NV": ("melanocytic nevus",),
        "BCC": ("basal cell carcinoma",),
        "BKL": ("benign keratosis",),
    }
    derm = class_phrases(derm7pt.CLASS_NAMES)
    assert "reed or spitz nevus" in derm["NEV"] and "melanoma metastasis" in derm["MEL"]
    assert class_phrases(["MEL", "XYZ"]) is None and RationaleReader.for_classes(["XYZ"]) is None
    with pytest.raises(ValueError, match="no 'Diagnosis"):
        named_phrase("A lesion.")


def test_none_ambiguous_and_word_boundaries():
    reader = RationaleReader.for_classes(["MEL", "NV", "BCC", "BKL"])
    assert reader.named_class("") == reader.named_class("Dermoscopy typically shows a network.") == NONE
    assert reader.named_class("Diagnosis: melanoma or melanocytic nevus.") == AMBIGUOUS
    # "melanocytic" is not "melanoma"; a phrase cut in the middle names nothing.
    assert reader.named_class("a malignant melanocytic tumour") == NONE
    assert reader.named_class("Diagnosis: MELANOMA, twice: melanoma.") == "MEL"
    # The longest phrase wins at a position (Derm7pt: "melanoma metastasis" and "melanoma" are both MEL).
    derm = RationaleReader.for_classes(derm7pt.CLASS_NAMES)
    assert derm.named_class("Diagnosis: melanoma metastasis.") == "MEL"
    assert derm.named_class("Diagnosis: clark nevus.") == "NEV"


def test_agreement_counts_and_notes():
    class_names = ["MEL", "NV", "BCC", "BKL"]
    reader = RationaleReader.for_classes(class_names)
    rationales = [isic2019.class_report(name) for name in ("MEL", "NV", "BCC")] + ["gibberish", "melanoma, nevus"]
    # "nevus" alone is no class phrase of these reports: the last row names melanoma only.
    result = reader.agreement(rationales, [0, 0, 2, 3, 1])
    assert result == {
        "rate": 2 / 5,
        "rows": 5,
        "agree": 2,
        "disagree": 2,
        "none": 1,
        "ambiguous": 0,
        "named_classes": ["MEL", "NV", "BCC", NONE, "MEL"],
    }
    assert math.isnan(reader.agreement([], [])["rate"])
    with pytest.raises(ValueError, match="2 rationales but 1"):
        reader.agreement(["a", "b"], [0])
    assert reader.disagreement_note(isic2019.class_report("MEL"), "MEL") is None
    assert (
        reader.disagreement_note(isic2019.class_report("NV"), "MEL")
        == "Note: the rationale names NV but the classifier's top class is MEL"
    )
    assert "names no class" in reader.disagreement_note("text", "BKL")
    assert "several classes" in reader.disagreement_note("melanoma and benign keratosis", "BKL")
