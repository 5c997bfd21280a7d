"""Frozen CLIP patch features, computed once and stored in the dataset (training without augmentation).

The CLIP tower is frozen, so without augmentation its output for an image never changes: computing it
every epoch is pure overhead (issue 7; benchmarks/RESULTS.md measures it). ``add_vision_features`` runs the
tower once over a Hugging Face dataset and stores the tokens in fp16 next to a key naming the tower (backend,
model id, revision, pretrained tag, feature layer); ``trainer_cfa.SkinClipVLCollator(cached_features_key=...)``
feeds them to ``SkinClipVLModel.forward(vision_features=...)`` and refuses rows whose key names another tower.

    dataset = add_vision_features(dataset, model, processor)          # once; save_to_disk keeps it
    collator = SkinClipVLCollator(processor, cached_features_key=vision_features_key(model.config.vision_config))

``train.py`` (``cache_vision_features: true``) goes through ``with_stored_vision_features``: the featurised splits
are saved beside the dataset (``<dataset_path>-vision-features/<tower>/<split>-<rows>/``) and read back by every
later run with the same tower, layer and rows: the runs of a comparison table pay for the tower once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from skinclip.output_folder import current_umask

FEATURES_COLUMN = "vision_features"
KEY_COLUMN = "vision_features_key"


def vision_features_key(vision_config) -> str:
    """What determines the cached tokens: the tower (backend, id, revision, pretrained tag) and the layer."""
    return "|".join(
        str(part)
        for part in (
            vision_config.backend,
            vision_config.model_name_or_path,
            vision_config.revision or "",
            vision_config.pretrained or "",
            f"layer{vision_config.feature_layer}",
        )
    )


def add_vision_features(
    dataset, model, processor, batch_size: int = 32, image_column: str = "image", cache_file_name: str | None = None
):
    """A copy of `dataset` with `vision_features` (fp16, `(num_tokens, vision_hidden)` per row) and their key.

    ``cache_file_name``: where `datasets.Dataset.map` writes the result (default: a ``cache-*.arrow`` file in the
    dataset's own folder, as large as the features).
    """
    from datasets import Array2D, Value

    key = vision_features_key(model.config.vision_config)
    device = model.cls_token.device
    num_tokens = None

    def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pixels = processor.preprocess_images(rows[image_column]).to(device)
        with torch.no_grad():
            tokens = model.vision.patch_tokens(pixels).to(torch.float16).cpu().numpy()
        return {FEATURES_COLUMN: list(tokens), KEY_COLUMN: [key] * len(tokens)}

    with torch.no_grad():
        probe = processor.preprocess_images(dataset[:1][image_column]).to(device)
        num_tokens = model.vision.patch_tokens(probe).shape[1]
    features = dataset.features.copy()
    features[FEATURES_COLUMN] = Array2D(shape=(num_tokens, model.vision.hidden_size), dtype="float16")
    features[KEY_COLUMN] = Value("string")
    # An explicit fingerprint: without it datasets hashes `encode`, i.e. pickles the whole model, to name its cache.
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}|{key}".encode()).hexdigest()[:32]
    return dataset.map(
        encode,
        batched=True,
        batch_size=batch_size,
        features=features,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        desc=f"vision features ({key})",
    )


def stored_features_folder(dataset_path: str | os.PathLike, key: str, split: str, row_ids: list) -> Path:
    """Where `with_stored_vision_features` keeps one split: named by the tower's key and the split's rows."""
    tower = hashlib.sha256(key.encode()).hexdigest()[:16]
    rows = hashlib.sha256("\n".join(map(str, row_ids)).encode()).hexdigest()[:16]
    return Path(f"{os.fspath(dataset_path).rstrip('/')}-vision-features") / tower / f"{split}-{rows}"


def with_stored_vision_features(dataset_dict, splits, dataset_path, model, processor, row_ids_of) -> None:
    """Give each named split of ``dataset_dict`` its vision features, computed once and stored beside the dataset.

    ``row_ids_of(split_dataset)`` names the rows (image ids): a store is reused only for the same tower, layer
    and rows in the same order (a train fraction subsample gets its own). Each store is written to a temporary
    folder and renamed into place, so a killed run never leaves a half-written one that a later run would read.
    """
    from datasets import load_from_disk

    key = vision_features_key(model.config.vision_config)
    for split in splits:
        folder = stored_features_folder(dataset_path, key, split, row_ids_of(dataset_dict[split]))
        if not (folder / "state.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            # map's own cache goes here, not into the user's dataset folder (where it would stay, as large as the
            # store: 12 GiB for ISIC 2019's training split), and is deleted once the store is written.
            map_cache = Path(tempfile.mkdtemp(prefix=f".{folder.name}-map-", dir=folder.parent))
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would outlive the rename
            try:
                computed = add_vision_features(
                    dataset_dict[split], model, processor, cache_file_name=str(map_cache / "features.arrow")
                )
                computed.save_to_disk(str(staging))
                del computed  # it maps the cache file
                if not (folder / "state.json").is_file():  # another run may have finished the same store first
                    shutil.rmtree(folder, ignore_errors=True)
                    os.replace(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(map_cache, ignore_errors=True)
        stored = load_from_disk(str(folder))
        if set(stored.unique(KEY_COLUMN)) != {key} or len(stored) != len(dataset_dict[split]):
            raise ValueError(
                f"{folder} does not hold {key} features for the {len(dataset_dict[split])} rows of {split}"
            )
        dataset_dict[split] = stored


__all__ = [
    "FEATURES_COLUMN",
    "KEY_COLUMN",
    "add_vision_features",
    "stored_features_folder",
    "vision_features_key",
    "with_stored_vision_features",
]
