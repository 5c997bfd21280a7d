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
