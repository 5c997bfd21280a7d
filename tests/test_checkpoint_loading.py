"""Checkpoints that load anywhere: base paths relative to the checkpoint, Hub arguments honoured or refused,
and a repo id served offline from a Hugging Face cache folder (with a pinned revision)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"

# Run in a fresh process from `cwd`: load with AutoModel (remote code), write the logits of a fixed batch.
LOAD_AND_PREDICT = """
import sys, json
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
source, batch_file, out_file, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = AutoModel.from_pretrained(source, trust_remote_code=True, **kwargs)
import importlib
processor = importlib.import_module(type(model).__module__).SkinClipVLProcessor.from_pretrained(source, **kwargs)
batch = load_file(batch_file)
with torch.no_grad():
    logits = model(**batch).logits
ids = processor.tokenize_prompts(["A lesion on the back."])[0]
save_file({"logits": logits.contiguous(), "prompt_ids": ids.contiguous()}, out_file)
print(type(model).__name__, model.config.vision_config.model_name_or_path)
"""


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_bases, make_config):
    """A checkpoint whose bases sit beside it (bases/ and checkpoint/ in one folder), with a fixed batch."""
    root = tmp_path_factory.mktemp("portable")
    bases = root / "bases"
    shutil.copytree(tiny_bases["clip"], bases / "clip")
    shutil.copytree(tiny_bases["decoder-qwen2_5_vl"], bases / "decoder")
    config = make_config(
        vision_config=dict(backend="hf", model_name_or_path=str(bases / "clip")),
        decoder_overrides=dict(model_name_or_path=str(bases / "decoder")),
    )
    torch.manual_seed(0)
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    batch = processor(
        [Image.new("RGB", (60, 50), (180, 90, 70)), Image.new("RGB", (40, 40), (40, 50, 60))],
        ["A lesion on the back.", "A lesion on the scalp of a female patient aged about 70."],
    )
    with torch.no_grad():
        reference = model(**batch).logits
    save_file({k: v.contiguous() for k, v in batch.items()}, str(root / "batch.safetensors"))
    return root, reference


def _run_loader(source: str, root: Path, cwd: Path, env_extra: dict | None = None, **kwargs) -> torch.Tensor:
    env = {**os.environ, "HF_HOME": str(root / "hf-home"), "PYTHONPATH": "", **(env_extra or {})}
    out = root / f"out-{abs(hash((source, str(cwd), json.dumps(kwargs))))}.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, source, str(root / "batch.safetensors"), str(out), json.dumps(kwargs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))


def test_local_bases_are_saved_relative_to_the_checkpoint(saved_checkpoint):
    root, _ = saved_checkpoint
    saved = json.loads((root / "checkpoint" / "config.json").read_text())
    assert saved["vision_config"]["model_name_or_path"] == os.path.join("..", "bases", "clip")
    assert saved["decoder_config"]["model_name_or_path"] == os.path.join("..", "bases", "decoder")


def test_a_moved_checkpoint_loads_from_any_directory(saved_checkpoint, tmp_path):
    root, reference = saved_checkpoint
    moved = tmp_path / "moved"
    shutil.copytree(root / "bases", moved / "bases")
    shutil.copytree(root / "checkpoint", moved / "checkpoint")
    shutil.copy(root / "batch.safetensors", moved / "batch.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outputs = _run_loader(str(moved / "checkpoint"), moved, cwd=elsewhere)
    torch.testing.assert_close(outputs["logits"], reference, rtol=1e-5, atol=1e-6)


def test_missing_relative_base_names_both_places(saved_checkpoint, tmp_path):
    root, _ = saved_checkpoint
    alone = tmp_path / "alone"
    shutil.copytree(root / "checkpoint", alone)
    with pytest.raises(FileNotFoundError, match=r"base '\.\./bases/clip'.*no folder .*and not a Hub repo id"):
        SkinClipVLModel.from_pretrained(alone, device="cpu")


def _hub_cache(root: Path, repo_id: str, revision: str) -> Path:
    """A Hugging Face cache folder serving the checkpoint as `repo_id` at `revision` (and as `main`)."""
    cache = root / "hub-cache"
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / revision
    if not snapshot.is_dir():
        shutil.copytree(root / "checkpoint", snapshot)
        (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
        (repo_folder / "refs" / "main").write_text(revision)
        # A Hub checkpoint names its bases by absolute path or Hub id, never relative to a snapshot.
        config = json.loads((snapshot / "config.json").read_text())
        config["vision_config"]["model_name_or_path"] = str(root / "bases" / "clip")
        config["decoder_config"]["model_name_or_path"] = str(root / "bases" / "decoder")
        (snapshot / "config.json").write_text(json.dumps(config))
    return cache


def test_repo_id_from_an_offline_hub_cache_with_a_pinned_revision(saved_checkpoint, tmp_path):
    root, reference = saved_checkpoint
    cache = _hub_cache(root, "skinclip/tiny-demo", REVISION)
    offline = {"HF_HUB_OFFLINE": "1"}
    outputs = _run_loader(
        "skinclip/tiny-demo", root, cwd=tmp_path, env_extra=offline, cache_dir=str(cache), revision=REVISION
    )
    torch.testing.assert_close(outputs["logits"], reference, rtol=1e-5, atol=1e-6)
    # The processor resolved through the same rule: the checkpoint's own tokenizer copy.
    assert outputs["prompt_ids"].numel() > 0
    # local_files_only is honoured too (no network needed, none tried).
    outputs = _run_loader(
        "skinclip/tiny-demo", root, cwd=tmp_path, env_extra=offline, cache_dir=str(cache), local_files_only=True
    )
    torch.testing.assert_close(outputs["logits"], reference, rtol=1e-5, atol=1e-6)


def test_an_unknown_revision_is_an_error_naming_it(saved_checkpoint, monkeypatch):
    root, _ = saved_checkpoint
    cache = _hub_cache(root, "skinclip/tiny-demo", REVISION)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"skinclip/tiny-demo.*revision f{40}"):
        SkinClipVLModel.from_pretrained("skinclip/tiny-demo", cache_dir=str(cache), revision="f" * 40, device="cpu")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(device_map="auto"), ValueError, "device_map='auto' is not supported"),
        (dict(device_map={"": 0}), ValueError, "is not supported"),
        (dict(subfolder="v2"), ValueError, "subfolder='v2' is not supported"),
        (dict(use_safetensors=False), ValueError, "safetensors only"),
        (dict(proxies={"https": "x"}), ValueError, "HTTPS_PROXY"),
        (dict(dtype="float64"), ValueError, "dtype='float64' is not supported"),
        (dict(no_such_argument=1), TypeError, "no_such_argument"),
    ],
)
def test_hub_arguments_it_cannot_honour_are_refused(saved_checkpoint, kwargs, error, message):
    root, _ = saved_checkpoint
    with pytest.raises(error, match=message):
        SkinClipVLModel.from_pretrained(root / "checkpoint", **kwargs)


def test_dtype_and_device_map_are_honoured(saved_checkpoint):
    root, _ = saved_checkpoint
    model = SkinClipVLModel.from_pretrained(root / "checkpoint", torch_dtype=torch.bfloat16, device_map="cpu")
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.config.decoder_config.compute_dtype == "bfloat16"
    assert model.cls_token.device.type == "cpu"
