"""Shared pytest fixtures.

Real sample data lives in ``../shared/data`` beside the checkout (CI clones main with ``shared/``
beside it). ``SKINCLIP_SHARED_DATA`` overrides the location.
"""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two cores in CI: more intra-op threads only add contention between pytest and the data loaders.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_data_dir() -> Path:
    configured = os.environ.get("SKINCLIP_SHARED_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory with the real ISIC / Derm7pt / HAM10000 sample files (see its SOURCES.md)."""
    path = _shared_data_dir()
    if not (path / "MANIFEST.json").is_file():
        pytest.skip(f"real sample data not found at {path}; set SKINCLIP_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory) -> dict:
    """Tiny random bases derived from the real checkpoints' files (skinclip/tiny_bases.py), saved locally."""
    from skinclip.tiny_bases import build_tiny_bases

    root = tmp_path_factory.mktemp("tiny-bases")
    return build_tiny_bases(root, ("clip", "open_clip", "decoder-qwen2_5_vl", "decoder-gpt2"))


@pytest.fixture(scope="session")
def make_config(tiny_bases):
    """Factory of small `SkinClipVLConfig`s over the tiny bases; keyword arguments override fields."""
    from configuration_skinclip import SkinClipVLConfig

    def factory(decoder="qwen2_5_vl", vision="clip", class_names=("MEL", "NV", "BCC"), decoder_overrides=None, **overrides):
        decoder_config = dict(
            model_name_or_path=tiny_bases[f"decoder-{decoder}"],
            quantization="none",
            compute_dtype="float32",
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
        )
        decoder_config.update(decoder_overrides or {})
        settings = dict(
            vision_config=dict(backend="open_clip" if vision == "open_clip" else "hf", model_name_or_path=tiny_bases[vision]),
            decoder_config=decoder_config,
            focal_dim=16,
            alignment_dim=8,
            id2label=dict(enumerate(class_names)),
        )
        settings.update(overrides)
        return SkinClipVLConfig(**settings)

    return factory
