"""What a Hub user meets: the prompt travels with the checkpoint, the checkpoint stands alone, a one-call pipeline.

The end-to-end test copies a checkpoint (tiny bases bundled inside it) to a folder of its own and loads it in a fresh
process that cannot import this checkout (no PYTHONPATH, another working directory, offline, an empty
transformers modules cache): only the checkpoint's remote code runs there.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import modeling_skinclip
from datasets_scripts import derm7pt, isic2019, isic2024
from metadata_skinclip import describe_metadata
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from pipeline_skinclip import conformal_set
from trainer_cfa import SkinClipVLCollator

METADATA = {"age": 55, "sex": "male", "site": "posterior torso"}


def _converter_rows(sample_data) -> list[tuple[dict, str]]:
    """(structured metadata, the training sentence the converter wrote) for real rows of three datasets.

    The structured fields are the converter's own cleaned columns, renamed to the processor's field names.
    """
    rows = []
    table = isic2019.load_table(
        sample_data / "isic2019" / isic2019.GROUND_TRUTH_FILE, sample_data / "isic2019" / isic2019.METADATA_FILE
    )
    for row in table.head(40).to_dict("records"):
        fields = {"age": row["age_approx"], "sex": row["sex"], "site": row["anatom_site_general"]}
        rows.append((fields, row["metadata_text"]))
    table = derm7pt.load_table(sample_data / "derm7pt" / "meta.csv")
    for row in table.head(10).to_dict("records"):
        fields = {"sex": row["sex"], "site": row["location"], "elevation": row["elevation"]}
        rows.append((fields, row["metadata_text"]))
    table = isic2024.load_table(sample_data / "isic2024" / "train-metadata_5rows.csv")
    for row in table.to_dict("records"):
        fields = {
            "age": row["age_approx"],
            "sex": row["sex"],
            "site": row["anatom_site_general"],
            "diameter_mm": row["clin_size_long_diam_mm"],
        }
        rows.append((fields, row["metadata_text"]))
    return [({k: (None if _missing(v) else v) for k, v in fields.items()}, text) for fields, text in rows]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask)]


# ------------------------------------------------------------------------------------------- prompt travels


def test_processor_words_structured_metadata_as_the_converters_did(make_config, sample_data):
    rows = _converter_rows(sample_data)
    texts = {text for _, text in rows}
    assert len(texts) > 10 and any("diameter" in t for t in texts) and any("The lesion is" in t for t in texts)
    processor = SkinClipVLProcessor.from_pretrained(None, config=make_config())
    for fields, text in rows:
        assert processor.metadata_text(fields) == text == describe_metadata(**fields)
    by_fields = processor(metadata=[fields for fields, _ in rows])
    by_texts = processor(metadata_texts=[text for _, text in rows])
    assert torch.equal(by_fields["prompt_ids"], by_texts["prompt_ids"])
    with pytest.raises(ValueError, match="not both"):
        processor(metadata=[METADATA], metadata_texts=["A skin lesion."])
    with pytest.raises(ValueError, match="field names"):
        processor.metadata_text({"patient age": 55})


def test_the_library_takes_the_sentence_from_the_remote_code_module():
    """datasets_scripts, predict.py and the demo word metadata with the function every checkpoint ships."""
    from datasets_scripts import metadata_text
    from skinclip import prediction

    assert metadata_text.describe_metadata is describe_metadata
    case = prediction.Case(Path("x.jpg"), 55.0, "male", "posterior torso")
    assert prediction.metadata_sentence(case) == SkinClipVLProcessor.metadata_text(METADATA)
    repo = Path(__file__).resolve().parents[1]
    library = "".join(path.read_text() for path in (repo / "skinclip").rglob("*.py"))
    assert "datasets_scripts.metadata_text" not in library


# ----------------------------------------------------------------------------------------- conformal sets


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_pipeline_conformal_set_equals_split_conformal(method):
    from skinclip.classification_metrics import SplitConformal

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.6), size=300)
    labels = np.array([rng.choice(5, p=row) for row in probs])  # calibrated: sets of several sizes
    predictor = SplitConformal(method=method, coverage=0.9, raps_lambda=0.05, raps_k_reg=1).fit(probs, labels)
    stored = {"method": method, "coverage": 0.9, "qhat": predictor.qhat, "raps_lambda": 0.05, "raps_k_reg": 1}
    expected = predictor.predict_sets(probs)
    assert [conformal_set(row, stored) for row in probs] == expected
    assert len({len(s) for s in expected}) > 1  # sets of several sizes were compared


# ------------------------------------------------------------------------------------- a checkpoint alone


def _json_texts(folder: Path) -> str:
    return "".join(path.read_text() for path in folder.rglob("*.json") if "tokenizer" not in path.parent.name)


def test_save_warns_push_refuses_and_include_bases_makes_it_stand_alone(make_config, tiny_bases, tmp_path, monkeypatch):
    model = SkinClipVLModel(make_config(), device="cpu")
    warnings = []
    monkeypatch.setattr(modeling_skinclip.logger, "warning", warnings.append)

    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "plain-again")  # a Trainer's next checkpoint: not told twice
    assert len(warnings) == 1 and "names local folders outside it" in warnings[0]
    assert "Hub id" in warnings[0] and "include_bases=True" in warnings[0]
    with pytest.raises(ValueError, match=r"refusing to push.*include_bases=True"):
        model.push_to_hub("someone/skinclip-test")  # refused before any network call

    warnings.clear()
    model.save_pretrained(tmp_path / "alone", include_bases=True)
    assert warnings == []
    config = json.loads((tmp_path / "alone" / "config.json").read_text())
    assert config["vision_config"]["model_name_or_path"] == "bases/vision"
    assert config["decoder_config"]["model_name_or_path"] == "bases/decoder"
    assert (tmp_path / "alone" / "bases" / "decoder" / "model.safetensors.index.json").is_file()
    assert modeling_skinclip.bases_outside(tmp_path / "alone") == {}
    # No path of this machine in what is shared (the LoRA config named the decoder by its absolute path).
    for machine_path in (str(tmp_path), str(Path(tiny_bases["clip"]).parent)):
        assert machine_path not in _json_texts(tmp_path / "alone")
    lora = json.loads((tmp_path / "alone" / "lora" / "adapter_config.json").read_text())
    assert lora["base_model_name_or_path"] == "bases/decoder"


def test_push_with_local_bases_is_refused_before_training():
    from skinclip.errors import UserError
    from skinclip.validation import _check_shareable_bases

    model_args = SimpleNamespace(
        include_bases=False, vision_model="openai/clip-vit-large-patch14", decoder_model="x", tiny_bases_dir="tb"
    )
    with pytest.raises(UserError, match="include_bases: true"):
        _check_shareable_bases(model_args, SimpleNamespace(push_to_hub=True))
    model_args.include_bases = True
    _check_shareable_bases(model_args, SimpleNamespace(push_to_hub=True))


def _card_header(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_model_card_names_hub_bases_dataset_licence_and_metrics(make_config, tmp_path):
    from skinclip.run_io import DataArguments
    from skinclip.training import write_model_card

    config = make_config()
    config.vision_config.model_name_or_path = "openai/clip-vit-large-patch14"
    config.decoder_config.model_name_or_path = "Qwen/Qwen2.5-VL-7B-Instruct"
    metrics = {"validation": {"balanced_accuracy": 0.5}, "test": {"balanced_accuracy": 0.61234, "auroc_macro": 0.8}}
    data_args = DataArguments(dataset_path=str(tmp_path / "data" / "isic2019"))
    write_model_card(tmp_path, config, metrics, data_args, {"trainable": 1, "lora": 1}, "ISIC 2019 challenge ...")
    header = _card_header(tmp_path)
    assert header["base_model"] == ["openai/clip-vit-large-patch14", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert header["license"] == "cc-by-nc-4.0" and header["datasets"] == ["isic2019"]
    (result,) = header["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"balanced_accuracy": 0.6123, "auroc_macro": 0.8}
    assert str(tmp_path) not in (tmp_path / "README.md").read_text()


def test_model_card_of_local_bases_carries_no_machine_path(make_config, tiny_bases, tmp_path):
    from skinclip.run_io import DataArguments
    from skinclip.training import write_model_card

    write_model_card(tmp_path, make_config(), {}, DataArguments(dataset_path="/data/x"), {"trainable": 1, "lora": 1})
    card = (tmp_path / "README.md").read_text()
    assert _card_header(tmp_path)["base_model"] == [] and "model-index" not in _card_header(tmp_path)
    assert str(Path(tiny_bases["clip"]).parent) not in card and "/data/x" not in card
    # Bases copied inside (include_bases): named as config.json names them, and still not Hub bases.
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    saved = {
        "vision_config": {"model_name_or_path": "bases/vision"},
        "decoder_config": {"model_name_or_path": "bases/decoder"},
    }
    (bundled / "config.json").write_text(json.dumps(saved))
    write_model_card(bundled, make_config(), {}, DataArguments(dataset_path="x"), {"trainable": 1, "lora": 1})
    assert _card_header(bundled)["base_model"] == []
    assert "`bases/decoder` (a copy inside this repository)" in (bundled / "README.md").read_text()


# ------------------------------------------------------------------------- fresh process, copied checkpoint

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from transformers import AutoProcessor, pipeline

    request = json.loads(sys.argv[1])
    processor = AutoProcessor.from_pretrained("checkpoint", trust_remote_code=True)
    batch = processor(metadata=request["metadata"])
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["prompt_ids"], batch["prompt_attention_mask"])]
    diagnose = pipeline("skin-lesion-diagnosis", model="checkpoint", trust_remote_code=True, device="cpu")
    result = diagnose(request["image"], metadata=request["one"], max_new_tokens=0)
    with_rationale = diagnose({"image": request["image"], "metadata": request["one"]}, max_new_tokens=3)
    print(json.dumps({
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("skinclip", "datasets_scripts",
                          "modeling_skinclip", "processing_skinclip", "metadata_skinclip")),
        "ids": ids,
        "diagnosis": result["diagnosis"],
        "prediction_set": result["prediction_set"],
        "coverage": result["coverage"],
        "metadata_text": result["metadata_text"],
        "attention_shape": list(np.asarray(result["attention_map"]).shape),
        "rationale": with_rationale["rationale"],
        "rationale_probs": [d["score"] for d in with_rationale["diagnosis"]],
    }))
""")


@pytest.mark.slow  # a fresh Python process loads the copied checkpoint (about 20 s on 2 cores)
def test_copied_checkpoint_in_fresh_process_builds_training_prompts_and_matches_predict(
    make_config, sample_data, tmp_path, capsys
):
    from skinclip import prediction

    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    built = tmp_path / "built"
    model.save_pretrained(built, include_bases=True)
    processor.save_pretrained(built)
    calibration = {"temperature": 1.7, "conformal": {"method": "aps", "coverage": 0.9, "qhat": 0.97}}
    (built / "calibration.json").write_text(json.dumps(calibration))
    alone = tmp_path / "elsewhere"
    shutil.copytree(built, alone / "checkpoint")
    shutil.rmtree(built)

    # What training fed the model for these rows: the collator over the converters' sentences.
    rows = _converter_rows(sample_data)[::4]
    collated = SkinClipVLCollator(processor, with_report=False, with_rationale=False)(
        [{"image": Image.new("RGB", (8, 8)), "metadata_text": text, "label": 0, "report": ""} for _, text in rows]
    )
    trained_ids = _unpadded(collated["prompt_ids"], collated["prompt_attention_mask"])

    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    request = {"metadata": [fields for fields, _ in rows], "image": str(image), "one": METADATA}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(request)],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert fresh["modules"] == []  # nothing of this checkout was imported there
    assert fresh["ids"] == trained_ids
    assert fresh["metadata_text"] == "A lesion on the posterior torso of a male patient aged about 55."

    # predict.py on the same folder and image: the same probabilities (calibration temperature applied) and set.
    metadata_flags = ["--age", "55", "--sex", "male", "--site", METADATA["site"]]
    code = prediction.main(
        [str(image), "--model", str(alone / "checkpoint"), *metadata_flags, "--json", "--no-rationale"]
        + ["--out", str(tmp_path / "predictions"), "--device", "cpu"]
    )
    assert code == 0
    (predicted,) = json.loads(capsys.readouterr().out)
    from_pipeline = {entry["label"]: entry["score"] for entry in fresh["diagnosis"]}
    assert list(from_pipeline) == [name for name, _ in predicted["top"]]
    np.testing.assert_allclose(
        [from_pipeline[name] for name in ("MEL", "NV")],
        [predicted["probabilities"][name] for name in ("MEL", "NV")],
        rtol=0,
        atol=1e-6,
    )
    assert predicted["prediction_set"] == " or ".join(fresh["prediction_set"]) + " (90% coverage)"
    assert fresh["coverage"] == 0.9
    assert fresh["attention_shape"] == list(model.patch_grid)
    assert isinstance(fresh["rationale"], str)
    np.testing.assert_allclose(sorted(fresh["rationale_probs"]), sorted(from_pipeline.values()), atol=1e-6)
