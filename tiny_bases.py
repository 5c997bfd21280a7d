"""Tiny random stand-ins for the frozen bases, built and saved locally.

Tests, the CPU demo and the CPU benchmark cannot download CLIP ViT-L/14 or Qwen2.5-VL-7B, so they build
bases of the same architectures with random weights, save them like Hub repos, and point
``SkinClipVLConfig`` at the saved directories. The real loading code then runs unchanged.

    python tiny_bases.py outputs/tiny-bases
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# A byte-level BPE trained on this text covers any input (unknown words fall back to bytes).
_TOKENIZER_CORPUS = [
    "Dermoscopic image of a skin lesion. A lesion on the posterior torso of a male patient aged about 55.",
    "A lesion on the lower extremity of a female patient aged about 40. A lesion on the head/neck. A skin lesion.",
    "Diagnosis and rationale: melanoma, nevus, basal cell carcinoma, actinic keratosis, benign keratosis,",
    "dermatofibroma, vascular lesion, squamous cell carcinoma. Atypical pigment network, irregular streaks,",
    "blue-whitish veil, regression structures, irregular dots and globules, asymmetric pigmentation,",
    "arborizing vessels, milia-like cysts, comedo-like openings, central white patch, lacunae.",
]
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<unk>"]  # ids 0, 1, 2: CLIP pools at the eos id (1)


def build_tiny_tokenizer(vocab_size: int = 400):
    """A fast byte-level BPE tokenizer that appends the eos token when ``add_special_tokens=True``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_tiny_clip(out_dir: Path, tokenizer, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A transformers ``CLIPModel`` (both towers), its image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_open_clip(out_dir: Path, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """An open_clip model saved for ``local-dir:`` loading (config + safetensors); its tokenizer is open_clip's."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": image_size, "layers": 3, "width": 32, "head_width": 16, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def build_tiny_decoder(out_dir: Path, tokenizer, architecture: str = "qwen2", seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM, or a tiny Qwen2.5-VL (``architecture="qwen2_5_vl"``) whose text stack is used."""
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if architecture == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**text))
    elif architecture == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif architecture == "gpt2":
        # A decoder whose attention has no q_proj/v_proj: for the LoRA-target error test.
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        ))
    else:
        raise ValueError(f"unknown tiny decoder architecture {architecture!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_bases(root: str | Path, decoder_architectures=("qwen2",), open_clip: bool = False) -> dict[str, str]:
    """Build every tiny base under ``root`` (skipping those already there) and return their paths by name."""
    root = Path(root)
    with torch.random.fork_rng():  # seeded builds must not move the caller's random state
        return _build_tiny_bases(root, decoder_architectures, open_clip)


def _build_tiny_bases(root: Path, decoder_architectures, open_clip: bool) -> dict[str, str]:
    tokenizer = build_tiny_tokenizer()
    paths: dict[str, str] = {}
    clip_dir = root / "clip"
    if not (clip_dir / "config.json").is_file():
        build_tiny_clip(clip_dir, tokenizer)
    paths["clip"] = str(clip_dir)
    if open_clip:
        oc_dir = root / "open_clip"
        if not (oc_dir / "open_clip_model.safetensors").is_file():
            build_tiny_open_clip(oc_dir)
        paths["open_clip"] = f"local-dir:{oc_dir}"
    for architecture in decoder_architectures:
        dec_dir = root / f"decoder-{architecture}"
        if not (dec_dir / "config.json").is_file():
            build_tiny_decoder(dec_dir, tokenizer, architecture)
        paths[f"decoder-{architecture}"] = str(dec_dir)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--open-clip", action="store_true", help="also build a tiny open_clip tower")
    args = parser.parse_args()
    print(json.dumps(build_tiny_bases(args.output_dir, open_clip=args.open_clip), indent=2))


if __name__ == "__main__":
    main()
