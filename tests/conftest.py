"""Shared pytest fixtures and helpers.

Real sample data: ``tests/data`` (fixture ``sample_data``) holds small cuts of the real ISIC 2019 / HAM10000 /
Derm7pt / ISIC 2024 files and the real sample images, so a fresh clone tests itself (tests/data/NOTICE.md).
The complete files live in ``../shared/data`` beside the checkout (fixture ``shared_data``; CI clones main with
``shared/`` beside it; ``SKINCLIP_SHARED_DATA`` overrides the location); only tests of properties of the
complete files (their exact class counts, say) need it, and they skip, saying so, where it is absent.
"""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"

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
def sample_data() -> Path:
    """tests/data: the same layout as ../shared/data, cut to a few hundred rows (tests/data/NOTICE.md)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The complete real sample files (their SOURCES.md), for tests that a cut cannot serve."""
    path = _shared_data_dir()
    if not (path / "MANIFEST.json").is_file():
        pytest.skip(
            f"needs the complete sample data (../shared/data), not found at {path}: this test reads the "
            "complete files, which the tests/data cut cannot stand in for; set SKINCLIP_SHARED_DATA"
        )
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

    def factory(
        decoder="qwen2_5_vl", vision="clip", class_names=("MEL", "NV", "BCC"), decoder_overrides=None, **overrides
    ):
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
            vision_config=dict(
                backend="open_clip" if vision == "open_clip" else "hf", model_name_or_path=tiny_bases[vision]
            ),
            decoder_config=decoder_config,
            focal_dim=16,
            alignment_dim=8,
            id2label=dict(enumerate(class_names)),
        )
        settings.update(overrides)
        return SkinClipVLConfig(**settings)

    return factory


# ---- helpers shared by several test modules (here, so that no test module imports another) ----------------

COLOURS = {"MEL": (60, 30, 20), "NV": (200, 150, 90), "BCC": (210, 90, 180)}


def colour_dataset(per_class, seed):
    """Images whose class is the lesion colour (plus noise and a random background tone)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = {"image": [], "label": [], "metadata_text": [], "report": []}
    for label, (name, colour) in enumerate(COLOURS.items()):
        for _ in range(per_class):
            background = rng.integers(150, 230)
            pixels = np.full((32, 32, 3), background, dtype=np.float32)
            y, x = rng.integers(8, 24, size=2)
            radius = rng.integers(5, 9)
            yy, xx = np.ogrid[:32, :32]
            pixels[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = colour
            pixels += rng.normal(0, 12, pixels.shape)
            rows["image"].append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
            rows["label"].append(label)
            rows["metadata_text"].append("A skin lesion.")
            rows["report"].append(f"{name}: a lesion of typical {name} colour.")
    features = Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=list(COLOURS)),
            "metadata_text": Value("string"),
            "report": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)


@pytest.fixture
def colour_trainer(make_config):
    """Factory of a CFATrainer over a tiny model and 4 colour images per class; returns (trainer, model).

    Settings that make non-finite and checkpoint behaviour visible in a few steps (lr 1e-2, every step logged).
    """
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from trainer_cfa import CFATrainer, CFATrainingArguments, SkinClipVLCollator

    def factory(output_dir, max_steps, max_consecutive=3, **overrides):
        config = make_config(class_names=tuple(COLOURS))
        model = SkinClipVLModel(config, device="cpu")
        processor = SkinClipVLProcessor.from_pretrained(None, config=config)
        args = CFATrainingArguments(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=6,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            augment=False,
            disable_tqdm=True,
            max_consecutive_nonfinite=max_consecutive,
            max_grad_norm=1.0,
        )
        for name, value in overrides.items():
            setattr(args, name, value)
        trainer = CFATrainer(
            model=model,
            args=args,
            train_dataset=colour_dataset(4, seed=0),
            data_collator=SkinClipVLCollator(processor),
            class_counts=[4, 4, 4],
        )
        return trainer, model

    return factory


def write_palette_png(path, side, bit_depth=1):
    """A valid 1-bit palette PNG of side x side whose rows are all zero, compressed row by row (never in memory).

    20000 px gives a 48 KB file that declares 400 megapixels.
    """

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes((side * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, bit_depth, 3, 0, 0, 0)))
        handle.write(chunk(b"PLTE", bytes([200, 150, 120, 40, 30, 20])))
        handle.write(chunk(b"IDAT", data))
        handle.write(chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def palette_png():
    """`write_palette_png`: decompression-bomb PNGs that cost a few KB on disk."""
    return write_palette_png
