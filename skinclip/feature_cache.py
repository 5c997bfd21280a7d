"""Frozen CLIP patch features, computed once and stored in the dataset (training without augmentation).

The CLIP tower is frozen, so without augmentation its output for an image never changes: computing it
every epoch is pure overhead (issue 7; benchmarks/RESULTS.md measures it). ``add_vision_features`` runs the
tower once over a Hugging Face dataset and stores the tokens in fp16 next to a key naming the tower (backend,
model id, revision, pretrained tag, feature layer); ``trainer_cfa.SkinClipVLCollator(cached_features_key=...)``
feeds them to ``SkinClipVLModel.forward(vision_features=...)`` and refuses rows whose key names another tower.

    dataset = add_vision_features(dataset, model, processor)          # once; save_to_disk keeps it
    collator = SkinClipVLCollator(processor, cached_features_key=vision_features_key(model.config.vision_config))
"""

from __future__ import annotations

from typing import Any

import torch

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


def add_vision_features(dataset, model, processor, batch_size: int = 32, image_column: str = "image"):
    """A copy of `dataset` with `vision_features` (fp16, `(num_tokens, vision_hidden)` per row) and their key."""
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
    return dataset.map(encode, batched=True, batch_size=batch_size, features=features, desc=f"CLIP features ({key})")


__all__ = ["FEATURES_COLUMN", "KEY_COLUMN", "add_vision_features", "vision_features_key"]
