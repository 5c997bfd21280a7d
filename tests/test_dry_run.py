"""``train.py CONFIG --dry_run`` on configs/isic2019.yaml: the paper's bases (their real config and tokenizer files,
no weight file anywhere) and a small ISIC 2019 dataset converted from the real CSVs with stand-in images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import transformers
from PIL import Image

from skinclip import tiny_bases
from skinclip.errors import run_entry_point
from tests.conftest import REPO_ROOT

CONFIG = "configs/isic2019.yaml"
CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
REVISION = "0123456789abcdef0123456789abcdef01234567"
GIB = 1024**3
# Qwen2.5-VL-7B's language stack and CLIP ViT-L/14 (their config.json files).
HIDDEN, INTERMEDIATE, LAYERS, KV, VOCAB, LORA_R = 3584, 18944, 28, 512, 152064, 64


# ---- fixtures: the bases' files and a small ISIC 2019 dataset ---------------------------------------------------


def _copy_base_files(folder):
    """The real Qwen2.5-VL-7B-Instruct and CLIP ViT-L/14 files this project ships: configs and tokenizers only."""
    qwen, clip = folder / "qwen", folder / "clip"
    shutil.copytree(tiny_bases.QWEN_VL_FILES, qwen)
    shutil.copytree(tiny_bases.CLIP_L_FILES, clip)
    tiny_bases.save_clip_tokenizer(clip)
    return qwen, clip


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    return _copy_base_files(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, base_dirs):
    """A Hugging Face cache serving configs/isic2019.yaml's Hub ids offline, as a user's earlier download would."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    for repo, files in (("Qwen/Qwen2.5-VL-7B-Instruct", base_dirs[0]), ("openai/clip-vit-large-patch14", base_dirs[1])):
        folder = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(files, folder / "snapshots" / REVISION)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(REVISION)
    return cache


@pytest.fixture(scope="module")
def isic_small(sample_data, tmp_path_factory):
    """Six rows per class of the real ISIC 2019 CSVs, stand-in images, converted by datasets_scripts.isic2019."""
    from datasets_scripts import isic2019

    source, raw = sample_data / "isic2019", tmp_path_factory.mktemp("isic2019-raw")
    truth = pd.read_csv(source / isic2019.GROUND_TRUTH_FILE, dtype=str)
    metadata = pd.read_csv(source / isic2019.METADATA_FILE, dtype=str)
    label = truth[isic2019.CLASS_NAMES].astype(float).to_numpy().argmax(axis=1)
    truth = truth.assign(_label=label).groupby("_label").head(6).drop(columns="_label")
    (raw / isic2019.IMAGE_DIR).mkdir()
    for index, image_id in enumerate(truth["image"]):
        Image.new("RGB", (40, 30), (index * 7 % 255, 90, 60)).save(raw / isic2019.IMAGE_DIR / f"{image_id}.png")
    truth.to_csv(raw / isic2019.GROUND_TRUTH_FILE, index=False)
    metadata[metadata["image"].isin(truth["image"])].to_csv(raw / isic2019.METADATA_FILE, index=False)
    output = tmp_path_factory.mktemp("isic2019") / "data"
    isic2019.convert(raw, output, val_fraction=0.2, test_fraction=0.2, seed=0)
    return output


def _weight_files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))


@pytest.fixture(scope="module")
def cli_run(isic_small, hub_cache, tmp_path_factory):
    """What a user runs: the paper config, its Hub ids resolved from the cache, offline."""
    root = tmp_path_factory.mktemp("dry-run")
    env = {**os.environ, "HF_HOME": str(hub_cache.parent), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "train.py",
        CONFIG,
        "--dry_run",
        f"--dataset_path={isic_small}",
        f"--output_dir={root / 'out'}",
        f"--dry_run_json={root / 'plan.json'}",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, result, json.loads((root / "plan.json").read_text())


# ---- the paper config from a Hub cache ------------------------------------------------------------------------


@pytest.mark.slow  # train.py --dry_run in a subprocess (cli_run)
def test_paper_config_dry_run_from_a_hub_cache_loads_no_weights(cli_run, hub_cache):
    root, result, plan = cli_run
    assert _weight_files(hub_cache) == []  # nothing to load: the run could not have read a weight
    assert not (root / "out").exists()  # a dry run writes no output folder
    assert plan["weights_loaded"] is False
    assert plan["config"]["decoder_model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert plan["dataset"]["classes"] == CLASSES and plan["dataset"]["images_checked"] > 0
    for text in (
        "batch layout (8 training rows",
        "image      257 tokens per image",
        "LoRA",
        "152,064 x 3,584",
        "GPU memory plan",
        "TOTAL, checkpointing on",
        "<- configured",
        "16 GB",
    ):
        assert text in result.stdout, text


@pytest.mark.slow  # train.py --dry_run in a subprocess (cli_run)
def test_batch_layout_at_paper_shapes(cli_run):
    batch = cli_run[2]["batch"]
    assert batch["rows"] == 8 and batch["pixel_values"] == [8, 3, 224, 224]
    assert batch["image_tokens"] == 16 * 16 + 1  # ViT-L/14 at 224 px, block -2 with its CLS token
    for part, limit in (("prompt", 64), ("rationale", 128), ("report", 77)):
        assert batch[part]["limit"] == limit and batch[part]["truncated"] == 0
        assert max(batch[part]["lengths"]) == batch[part]["padded"] <= limit
        assert min(batch[part]["lengths"]) > 5  # the metadata sentence / the class description
    assert batch["decoder_tokens"] == {
        "this_batch": 257 + batch["prompt"]["padded"] + 1 + batch["rationale"]["padded"],
        "maximum": 257 + 64 + 1 + 128,
    }
    assert cli_run[2]["train_split_truncation"]["rationale"]["truncated"] == 0


def _nf4_bytes(n):
    # 4-bit codes, one 8-bit absmax per 64 values, one fp32 absmax per 256 blocks, fp32 offset, 16-value fp32 code
    return n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 + 64


@pytest.mark.slow  # train.py --dry_run in a subprocess (cli_run)
def test_parameter_table_at_paper_shapes(cli_run):
    parameters = cli_run[2]["parameters"]
    rows = {row["group"]: row for row in parameters["rows"]}
    assert parameters["lora"] == rows["LoRA"]["trained"] == 28 * 64 * (3584 + 3584 + 3584 + 512) == 20_185_088
    assert parameters["lm_head_shape"] == [VOCAB, HIDDEN]
    assert rows["CLIP vision"]["parameters"] + rows["CLIP text (reports)"]["parameters"] == 427_616_513  # CLIP-L
    heads = (
        1024 * HIDDEN
        + HIDDEN
        + HIDDEN
        + 3 * HIDDEN * 1024
        + HIDDEN
        + HIDDEN * 8
        + 8
        + 1024 * 512
        + 512
        + 768 * 512
        + 512
        + 1
    )  # as tests/test_real_bases.py counts them
    assert parameters["trained"] == heads + 20_185_088 and rows["new modules"]["trained"] == heads
    linear = [HIDDEN * HIDDEN, KV * HIDDEN, KV * HIDDEN, HIDDEN * HIDDEN] + [INTERMEDIATE * HIDDEN] * 3
    assert rows["decoder linear"]["parameters"] == LAYERS * sum(linear)
    assert rows["decoder linear"]["storage"] == {"nf4": LAYERS * sum(_nf4_bytes(n) for n in linear)}
    assert 0.515 < rows["decoder linear"]["bytes"] / rows["decoder linear"]["parameters"] < 0.517
    assert rows["LM head"]["storage"] == {"bfloat16": 2 * VOCAB * HIDDEN}  # never quantised
    assert rows["decoder embeddings"]["storage"] == {"bfloat16": 2 * VOCAB * HIDDEN}
    assert rows["LoRA"]["storage"] == {"float32": 4 * 20_185_088}
    assert parameters["frozen"] + parameters["trained"] == parameters["total"]


@pytest.mark.slow  # train.py --dry_run in a subprocess (cli_run)
def test_memory_plan_at_paper_shapes(cli_run):
    plan = cli_run[2]
    memory, trained = plan["memory"], plan["parameters"]["trained"]
    terms = memory["terms"]
    assert terms["gradients"] == 4 * trained and terms["optimizer"] == 8 * trained  # adamw_torch: 2 fp32 moments
    # Per token per layer: 2 RMSNorms 2(4h+2h+2h), attention 5·2h, MLP 4·2i, LoRA on q,v 2(4h+h+4r).
    per_token = 16 * HIDDEN + 10 * HIDDEN + 8 * INTERMEDIATE + 2 * (5 * HIDDEN + 4 * LORA_R)
    assert memory["activation_bytes_per_token_per_layer"] == per_token == 281_088
    tokens = 8 * 450
    activations = terms["activations"]
    assert activations["without_checkpointing"] > LAYERS * tokens * per_token
    assert activations["with_checkpointing"] < activations["without_checkpointing"] / 8
    assert activations["with_checkpointing"] > LAYERS * tokens * 2 * HIDDEN + tokens * per_token
    assert terms["lm_head_logits"] == 8 * 128 * VOCAB * (2 + 4 + 4)
    fixed = sum(terms["weights"].values()) + terms["gradients"] + terms["optimizer"] + terms["lm_head_logits"]
    assert memory["total"] == {key: fixed + value for key, value in activations.items()}
    assert memory["configured"] == "with_checkpointing"
    assert 9 * GIB < memory["total"]["with_checkpointing"] < 12 * GIB
    assert memory["cards"]["with_checkpointing"] == dict.fromkeys(("16GB", "24GB", "40GB", "80GB"), "fits")
    assert memory["cards"]["without_checkpointing"]["24GB"] == "does not fit"
    assert memory["cards"]["without_checkpointing"]["80GB"] == "fits"


# ---- in process: other settings, and bad inputs ---------------------------------------------------------------


def _argv(data, base_dirs, output, *extra):
    qwen, clip = base_dirs
    return [
        CONFIG,
        "--dry_run",
        f"--dataset_path={data}",
        f"--output_dir={output}",
        f"--decoder_model={qwen}",
        f"--vision_model={clip}",
        *extra,
    ]


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any model weight load (every base goes through PreTrainedModel.from_pretrained) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def test_8bit_optimizer_no_checkpointing_and_truncation(isic_small, base_dirs, tmp_path, no_weight_loading):
    from skinclip import training

    report = training.main(
        _argv(
            isic_small,
            base_dirs,
            tmp_path / "out",
            "--optim=paged_adamw_8bit",
            "--activation_checkpointing=false",
            "--per_device_train_batch_size=3",
            "--max_prompt_tokens=4",
            "--max_rationale_tokens=8",
        )
    )
    batch, memory, trained = report["batch"], report["memory"], report["parameters"]["trained"]
    assert batch["prompt"]["lengths"] == [4, 4, 4] and batch["prompt"]["truncated"] == 3
    assert batch["rationale"]["lengths"] == [8, 8, 8] and batch["rationale"]["truncated"] == 3
    assert batch["decoder_tokens"]["maximum"] == 257 + 4 + 1 + 8
    assert report["train_split_truncation"]["rationale"]["truncated"] == report["dataset"]["rows"]["train"]
    # Two 8-bit moments (+ an fp32 absmax per 256 values; tensors under 4096 values stay fp32).
    assert 2 * trained < memory["terms"]["optimizer"] < 2.1 * trained
    assert memory["configured"] == "without_checkpointing"
    assert memory["terms"]["lm_head_logits"] == 3 * 8 * VOCAB * 10
    assert not (tmp_path / "out").exists()


def test_image_token_pooling_shortens_the_planned_sequence(isic_small, base_dirs, tmp_path, no_weight_loading):
    from skinclip import training

    argv = _argv(isic_small, base_dirs, tmp_path / "out", "--max_prompt_tokens=4", "--max_rationale_tokens=8")
    unpooled = training.main(argv)
    pooled = training.main([*argv, "--image_token_pooling=2"])
    # ViT-L/14 at 224 px: CLS + 16×16 patches, or CLS + 8×8 pooled ones.
    assert pooled["batch"]["image_tokens"] == 1 + 8 * 8 and pooled["batch"]["image_token_pooling"] == 2
    assert pooled["batch"]["decoder_tokens"]["maximum"] == 65 + 4 + 1 + 8
    activations = [report["memory"]["terms"]["activations"]["with_checkpointing"] for report in (pooled, unpooled)]
    assert activations[0] < activations[1]


def test_rationale_conditioning_adds_its_tokens_to_the_planned_sequence(
    isic_small, base_dirs, tmp_path, no_weight_loading
):
    from transformers import AutoTokenizer

    from skinclip import training

    argv = _argv(isic_small, base_dirs, tmp_path / "out", "--max_prompt_tokens=4", "--max_rationale_tokens=8")
    plain = training.main(argv)
    conditioned = training.main([*argv, "--rationale_conditioning=class"])
    tokenizer = AutoTokenizer.from_pretrained(base_dirs[0])
    # Every row is padded to the longest class's " Diagnosis: <class>." in the Qwen2.5 tokenizer.
    width = max(len(tokenizer(f" Diagnosis: {name}.", add_special_tokens=False)["input_ids"]) for name in CLASSES)
    assert plain["batch"]["condition"] is None and conditioned["batch"]["condition"]["padded"] == width
    for key in ("this_batch", "maximum"):
        assert conditioned["batch"]["decoder_tokens"][key] == plain["batch"]["decoder_tokens"][key] + width


def _save_variant(isic_small, folder, change):
    from datasets import load_from_disk

    dataset = load_from_disk(str(isic_small))
    change(dataset)
    dataset.save_to_disk(str(folder))
    return folder


def _drop_report(dataset):
    for split in dataset:
        dataset[split] = dataset[split].remove_columns("report")


def _foreign_validation_labels(dataset):
    from datasets import ClassLabel

    dataset["validation"] = dataset["validation"].cast_column("label", ClassLabel(names=CLASSES + ["UNK"]))


def _broken_first_image(dataset):
    from datasets import Image as ImageFeature

    rows = dataset["train"].cast_column("image", ImageFeature(decode=False))
    rows = rows.map(
        lambda row, i: {"image": {"bytes": b"not an image" if i == 0 else row["image"]["bytes"], "path": None}},
        with_indices=True,
    )
    dataset["train"] = rows.cast_column("image", ImageFeature())


def _missing_second_report(dataset):
    dataset["train"] = dataset["train"].map(
        lambda row, i: {"report": None if i == 1 else row["report"]}, with_indices=True
    )


BAD_INPUTS = {
    "missing column": (_drop_report, [], "split 'train' lacks required column(s) ['report']"),
    "labels the training split does not have": (
        _foreign_validation_labels,
        [],
        f"split 'validation' has the classes {CLASSES + ['UNK']}",
    ),
    "focal_alpha for other classes": (None, ["--focal_alpha=1,1,1"], "focal_alpha gives 3 weights for 8 classes"),
    "unreadable image": (_broken_first_image, [], "split 'train' row 0 (image_id "),
    "a report that is not text": (_missing_second_report, [], "split 'train' rows [1]: column 'report' must hold text"),
    "dry_run_json without a path": (None, ["--dry_run_json"], "dry_run_json needs a file path"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_error_line_before_any_weight(
    case, isic_small, base_dirs, tmp_path, capsys, monkeypatch, no_weight_loading
):
    import modeling_skinclip
    from skinclip import training

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(modeling_skinclip.SkinClipVLModel, "__init__", refuse)
    change, extra, message = BAD_INPUTS[case]
    data = _save_variant(isic_small, tmp_path / "data", change) if change else isic_small
    code = run_entry_point(training.main, _argv(data, base_dirs, tmp_path / "out", *extra))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, errors
    assert message in errors[0]
    if change:
        assert str(data) in errors[0]  # names the dataset
    assert not (tmp_path / "out").exists()
