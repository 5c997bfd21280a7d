"""The real checkpoints' files: tiny bases derived from them, and the paper's shapes on the meta device.

The tiny bases keep every key of the real configs and shrink only sizes; these tests hold them to that, then
check at the paper's size (CLIP ViT-L/14 + Qwen2.5-VL-7B, no weights) what the first real run would build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors
import torch

from configuration_skinclip import SkinClipVLConfig
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip import tiny_bases as tiny_bases_module

QWEN_FILES = tiny_bases_module.QWEN_VL_FILES
CLIP_FILES = tiny_bases_module.CLIP_L_FILES
REAL_INDEX = json.loads((QWEN_FILES / "model.safetensors.index.json").read_text())["weight_map"]
SIZE_KEYS = set(tiny_bases_module.TINY_QWEN_TEXT) | {"rope_scaling", "vision_config"}


def test_shipped_real_files_have_their_sources_sha256(sample_data):
    """skinclip/base_files holds the real files unchanged: the sha256 that shared/data/MANIFEST.json recorded from
    the source repository, copied into tests/data/MANIFEST.json so that a lone clone checks it too."""
    import hashlib

    recorded = json.loads((sample_data / "MANIFEST.json").read_text())["qwen2.5-vl-7b-instruct_base_files_sha256"]
    shipped = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in QWEN_FILES.iterdir()}
    assert shipped == recorded


def test_shipped_real_files_equal_the_shared_copies(shared_data):
    """...and byte for byte the shared copies (which are checked against their sources)."""
    for path in QWEN_FILES.iterdir():
        assert path.read_bytes() == (shared_data / "bases" / "qwen2.5-vl-7b-instruct" / path.name).read_bytes(), path


def test_tiny_qwen_keeps_every_real_key_and_shrinks_only_sizes(tiny_bases):
    real = json.loads((QWEN_FILES / "config.json").read_text())
    tiny_dir = Path(tiny_bases["decoder-qwen2_5_vl"])
    tiny = json.loads((tiny_dir / "config.json").read_text())
    assert set(tiny) == set(real)
    assert {key: tiny[key] for key in real if key not in SIZE_KEYS} == {
        k: v for k, v in real.items() if k not in SIZE_KEYS
    }
    assert "pad_token_id" not in tiny and tiny["rope_scaling"]["type"] == "mrope"  # the real flat layout
    assert set(tiny["vision_config"]) == set(real["vision_config"])
    head_dim = tiny["hidden_size"] // tiny["num_attention_heads"]
    assert sum(tiny["rope_scaling"]["mrope_section"]) == head_dim // 2
    # Tokenizer, chat template, generation and preprocessor configs are the real files, byte for byte.
    for name in tiny_bases_module.QWEN_VL_COPIED_FILES:
        assert (tiny_dir / name).read_bytes() == (QWEN_FILES / name).read_bytes(), name


def test_tiny_qwen_is_stored_like_the_hub_repo(tiny_bases):
    tiny_dir = Path(tiny_bases["decoder-qwen2_5_vl"])
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # sharded, with an index

    def layout(names):
        return {re.sub(r"\.\d+\.", ".N.", name) for name in names}

    assert layout(index["weight_map"]) == layout(REAL_INDEX)
    stored = set()
    for shard in set(index["weight_map"].values()):
        with safetensors.safe_open(str(tiny_dir / shard), "pt") as handle:
            stored |= set(handle.keys())
            assert all(handle.get_slice(k).get_dtype() == "BF16" for k in handle.keys())  # the real torch_dtype
    assert stored == set(index["weight_map"])


def test_tiny_qwen_tokenizer_is_the_real_one(tiny_bases):
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(tiny_bases["decoder-qwen2_5_vl"])
    real = AutoTokenizer.from_pretrained(str(QWEN_FILES))
    text = "Dermoscopy: atypical network, blue-whitish veil; café-au-lait <|im_end|> 55 years"
    assert tiny(text)["input_ids"] == real(text)["input_ids"]
    assert (len(tiny), tiny.eos_token_id, tiny.pad_token_id) == (151665, 151645, 151643)


def test_tiny_clip_keeps_the_real_keys_and_its_own_bpe(tiny_bases):
    import open_clip
    from transformers import AutoTokenizer, CLIPConfig

    real = json.loads((CLIP_FILES / "config.json").read_text())
    tiny_dir = Path(tiny_bases["clip"])
    tiny = json.loads((tiny_dir / "config.json").read_text())
    assert set(tiny) == set(real) and set(tiny["text_config"]) == set(real["text_config"])
    for section in ("text_config", "vision_config"):
        assert tiny[section]["hidden_act"] == "quick_gelu"
    assert tiny["text_config"]["max_position_embeddings"] == 77
    assert {k: tiny["text_config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }  # the real (legacy) ids
    assert CLIPConfig.from_pretrained(str(tiny_dir)).vision_config.patch_size == 14
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    texts = ["An atypical pigment network and irregular streaks.", "Arborizing vessels; milia-like cysts (BCC?)"]
    reference = open_clip.get_tokenizer("ViT-L-14")(texts)
    for text, expected in zip(texts, reference):
        ids = tokenizer(text)["input_ids"]
        assert ids == expected[: len(ids)].tolist() and len(tokenizer) == 49408


# ---- the decoder load at tiny size: what is built and read --------------------------------------------------


class _ReadSpy:
    """Wraps safetensors.safe_open and records which tensors are materialised (not just listed)."""

    def __init__(self, original, read: list):
        self.original, self.read = original, read

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __init__(self):
                self.handle = spy.original(*args, **kwargs)
                self.file = str(args[0] if args else kwargs.get("filename"))

            def __enter__(self):
                self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def get_tensor(self, key):
                spy.read.append((self.file, key))
                return self.handle.get_tensor(key)

            def get_slice(self, key):
                inner = self.handle.get_slice(key)
                file = self.file

                class Slice:
                    def __getitem__(self, index):
                        spy.read.append((file, key))
                        return inner[index]

                    def __getattr__(self, name):
                        return getattr(inner, name)

                return Slice()

            def __getattr__(self, name):
                return getattr(self.handle, name)

        return Handle()


def test_decoder_load_reads_only_the_language_stack(tiny_bases, make_config, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    def no_vit(*args, **kwargs):
        raise AssertionError("the Qwen2.5-VL vision tower was built")

    monkeypatch.setattr(modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel, "__init__", no_vit)
    read: list[str] = []
    monkeypatch.setattr(modeling_utils, "safe_open", _ReadSpy(modeling_utils.safe_open, read))
    model = SkinClipVLModel(make_config(), device="cpu")
    index = json.loads((Path(tiny_bases["decoder-qwen2_5_vl"]) / "model.safetensors.index.json").read_text())
    decoder_reads = {key for file, key in read if file.startswith(tiny_bases["decoder-qwen2_5_vl"])}
    assert sorted(decoder_reads) == sorted(name for name in index["weight_map"] if not name.startswith("visual."))
    # ... and every tensor arrived with the stored values, under transformers 5's names.
    from safetensors.torch import load_file

    stored = {}
    for shard in set(index["weight_map"].values()):
        stored.update(load_file(str(Path(tiny_bases["decoder-qwen2_5_vl"]) / shard)))
    loaded = model.language_model.state_dict()
    for hub_name, tensor in stored.items():
        if hub_name.startswith("visual."):
            continue
        name = hub_name.replace("model.", "model.language_model.", 1) if hub_name.startswith("model.") else hub_name
        base_name = name.replace(".weight", ".base_layer.weight") if name not in loaded else name
        base_name = base_name.replace(".bias", ".base_layer.bias") if base_name not in loaded else base_name
        torch.testing.assert_close(loaded[base_name].float(), tensor.float(), rtol=0, atol=0, msg=hub_name)


def test_language_only_stack_equals_the_full_model_text_path(tiny_bases):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from modeling_skinclip import load_decoder

    config = SkinClipVLConfig(
        vision_config=dict(model_name_or_path=tiny_bases["clip"]),
        decoder_config=dict(
            model_name_or_path=tiny_bases["decoder-qwen2_5_vl"], quantization="none", compute_dtype="float32"
        ),
    )
    language_only = load_decoder(config.decoder_config, "cpu").eval()
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_bases["decoder-qwen2_5_vl"], dtype=torch.float32
    ).eval()
    ids = torch.tensor([[151644, 872, 198, 32, 92117, 389, 279, 1182, 13, 151645]])
    with torch.no_grad():
        torch.testing.assert_close(language_only(input_ids=ids).logits, full(input_ids=ids).logits)


def test_generation_ids_come_from_the_generation_config(make_config):
    """The real config has no top-level eos/pad: ids come from generation_config.json, every eos id stops a row."""
    model = SkinClipVLModel(make_config(), device="cpu").eval()
    assert not hasattr(model.language_model.config, "eos_token_id") or model.language_model.config.eos_token_id is None
    assert (model.eos_token_ids, model.pad_token_id) == ([151645, 151643], 151643)
    processor = SkinClipVLProcessor.from_pretrained(None, config=model.config)
    from PIL import Image

    batch = processor([Image.new("RGB", (40, 40), (200, 120, 90))] * 2, ["A lesion.", "A lesion on the back."])
    calls = {"n": 0}

    def force(module, inputs, output):
        # Row 0 emits <|endoftext|> (the second eos id) at step 2, row 1 <|im_end|> at step 4.
        calls["n"] += 1
        output = output.clone()
        if calls["n"] == 2:
            output[0, ..., 151643] = 1e4
        if calls["n"] == 4:
            output[1, ..., 151645] = 1e4
        return output

    handle = model.language_model.get_output_embeddings().register_forward_hook(force)
    try:
        prediction = model.predict(**batch, max_new_tokens=10)
    finally:
        handle.remove()
    ids = prediction.rationale_ids
    assert ids.shape[1] == 4  # both rows stopped: no step after the last eos
    assert ids[0, 1].item() == 151643 and (ids[0, 2:] == 151643).all()  # padded after its eos
    assert ids[1, 3].item() == 151645
    texts = processor.decode(ids)
    assert "<|im_end|>" not in texts[1] and "<|endoftext|>" not in texts[0]


def test_a_decoder_without_eos_is_refused_before_weights_load(tiny_bases, make_config, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "no-eos"
    shutil.copytree(tiny_bases["decoder-qwen2_5_vl"], broken)
    (broken / "generation_config.json").unlink()
    config = json.loads((broken / "config.json").read_text())
    config.pop("eos_token_id")
    (broken / "config.json").write_text(json.dumps(config))
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(b"not read")  # any weight read would fail differently
    with pytest.raises(ValueError, match=r"no-eos.*gives no eos token id.*generation_config.json"):
        SkinClipVLModel(make_config(decoder_overrides={"model_name_or_path": str(broken)}), device="cpu")


def test_lora_targets_are_checked_before_weights_load(make_config, tiny_bases, tmp_path):
    import shutil

    broken = tmp_path / "gpt2"
    shutil.copytree(tiny_bases["decoder-gpt2"], broken)
    (broken / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"has no module named \['q_proj', 'v_proj'\] for LoRA"):
        SkinClipVLModel(make_config(decoder_overrides={"model_name_or_path": str(broken)}), device="cpu")


def test_4bit_decoder_keeps_embeddings_head_and_residual_stream_in_the_compute_dtype(make_config):
    """peft's k-bit preparation would upcast embeddings and LM head to fp32 (4.4 GB at 7B) and the stream follows."""
    pytest.importorskip("bitsandbytes")
    config = make_config(decoder_overrides=dict(quantization="nf4", compute_dtype="bfloat16"))
    model = SkinClipVLModel(config, device="cpu")
    lm = model.language_model
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert lm.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype in (torch.bfloat16, torch.uint8) for n, p in lm.named_parameters() if "lora_" not in n)
    seen = []
    layer = model.text_stack.layers[-1]
    handle = layer.register_forward_hook(
        lambda module, inputs, output: seen.append((output[0] if isinstance(output, tuple) else output).dtype)
    )
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    from PIL import Image

    batch = processor([Image.new("RGB", (40, 40), (90, 60, 50))], ["A lesion on the back."])
    try:
        prediction = model.eval().predict(**batch)  # no autocast anywhere on this path
    finally:
        handle.remove()
    assert seen == [torch.bfloat16] and torch.isfinite(prediction.probs).all()


# ---- the paper's shapes on the meta device ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_model():
    """configs/isic2019.yaml's model, built on the meta device from the real files (no weights)."""
    import yaml

    settings = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "isic2019.yaml").read_text())
    config = SkinClipVLConfig(
        vision_config=dict(
            backend="hf", model_name_or_path=str(CLIP_FILES), feature_layer=settings["vision_feature_layer"]
        ),
        decoder_config=dict(
            model_name_or_path=str(QWEN_FILES),
            quantization=settings["quantization"],
            compute_dtype=settings["compute_dtype"],
            lora_r=settings["lora_r"],
            lora_alpha=settings["lora_alpha"],
            lora_dropout=settings["lora_dropout"],
            lora_target_modules=settings["lora_target_modules"],
        ),
        focal_dim=settings["focal_dim"],
        alignment_dim=settings["alignment_dim"],
        id2label=dict(enumerate(["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"])),
    )
    return SkinClipVLModel(config, device="meta")


def test_paper_decoder_has_exactly_the_real_language_tensors(paper_model):
    names = set()
    for name, _ in paper_model.language_model.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        names.add(name.replace("model.language_model.", "model.", 1))
    assert names == {name for name in REAL_INDEX if not name.startswith("visual.")}
    assert paper_model.language_model.model.visual is None
    assert not any("Vision" in type(module).__name__ for module in paper_model.language_model.modules())


def test_paper_trained_tensors_and_their_bytes(paper_model):
    counts = paper_model.parameter_counts()
    # LoRA r=64 on q_proj (3584 -> 3584) and v_proj (3584 -> 512) in 28 layers: 28 * 64 * (3584+3584 + 3584+512).
    assert counts["lora"] == 28 * 64 * (3584 + 3584 + 3584 + 512) == 20_185_088
    hidden, vision, focal, align, text, classes = 3584, 1024, 1024, 512, 768, 8
    heads = (
        vision * hidden
        + hidden  # projector
        + hidden
        + 3 * hidden * focal  # focal pooling: query, W_q, W_k, W_v (no bias)
        + hidden  # CLS
        + hidden * classes
        + classes  # classifier
        + focal * align
        + align
        + text * align
        + align  # alignment projections
        + 1  # logit scale
    )
    assert counts["heads"] == heads
    trained = paper_model.trained_state_dict()
    assert sum(t.numel() for t in trained.values()) == counts["trainable"] == heads + 20_185_088
    assert sum(t.numel() * t.element_size() for t in trained.values()) == 4 * (heads + 20_185_088)  # fp32 tensors


def test_paper_decoder_stays_in_bf16(paper_model):
    lm = paper_model.language_model
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert lm.get_output_embeddings().weight.dtype == torch.bfloat16
    assert tuple(lm.get_output_embeddings().weight.shape) == (152064, 3584)
    assert {p.dtype for n, p in lm.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_paper_vision_tower_shapes(paper_model):
    assert paper_model.vision.hidden_size == 1024 and paper_model.vision.grid == (16, 16)
    assert paper_model.vision.model.config.vision_config.hidden_act == "quick_gelu"


def test_open_clip_tower_with_openai_weights_uses_quick_gelu():
    """open_clip's ViT-L-14 config builds GELU; OpenAI's weights need QuickGELU (built here on meta: no download)."""
    import open_clip

    from modeling_skinclip import build_vision_tower

    config = SkinClipVLConfig(
        vision_config=dict(backend="open_clip", model_name_or_path="ViT-L-14", pretrained="openai"),
        decoder_config=dict(model_name_or_path=str(QWEN_FILES)),
    )
    tower = build_vision_tower(config.vision_config, torch.float32, "meta")
    activations = {type(m).__name__ for m in tower.model.visual.modules()}
    assert "QuickGELU" in activations and "GELU" not in activations
    assert open_clip.get_model_config("ViT-L-14").get("quick_gelu") is not True  # the trap this guards against
