"""Batched inference with a SkinCLIP-VL model: the one loop behind evaluation, OOD scoring, prediction and the demo.

`predict_batch` takes a batch of images and metadata sentences through the processor and `model.predict`
(classification, focal attention map and, with ``max_new_tokens > 0``, a rationale). `iter_split_predictions`
runs it over the rows of a dataset split (``image`` and ``metadata_text`` columns), classification only; from it
`split_logits` gives the raw class logits (what evaluate_skinclip.py calibrates) and `split_probabilities` the
class probabilities with the checkpoint's calibration temperature applied (what `model.predict` returns).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def predict_batch(
    model, processor, images: Sequence[Any], metadata_texts: Sequence[str | None], max_new_tokens: int = 0
):
    """(`SkinClipVLPrediction`, the model inputs on the model's device) for one batch of images."""
    inputs = processor(list(images), [text or "" for text in metadata_texts])
    device = model.cls_token.device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    generation = {}
    if max_new_tokens > 0 and model.config.rationale_conditioning == "class":
        # The rationale follows the tokens of the class the head predicts (each class's tokens, one table).
        generation = {key: value.to(device) for key, value in processor.class_condition_inputs().items()}
    return model.predict(**inputs, max_new_tokens=max_new_tokens, **generation), inputs


def iter_split_predictions(
    model, processor, split, batch_size: int = 16, progress: bool = True, desc: str = "predict"
) -> Iterator:
    """`model.predict` (classification only) of each batch of a dataset split's rows, in order."""
    from tqdm.auto import tqdm

    model.eval()
    for start in tqdm(range(0, len(split), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = split[start : start + batch_size]
        texts = rows["metadata_text"] if "metadata_text" in rows else [""] * len(rows["image"])
        prediction, _ = predict_batch(model, processor, rows["image"], texts)
        yield prediction


def split_logits(model, processor, split, batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Raw class logits `(num_rows, num_labels)` of every row (no calibration temperature)."""
    chunks = [
        prediction.logits.float().cpu()
        for prediction in iter_split_predictions(model, processor, split, batch_size, progress, "evaluate")
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.config.num_labels), dtype=np.float32)


def split_probabilities(model, processor, split, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Class probabilities `(num_rows, num_labels)` of every row, with the checkpoint's calibration temperature."""
    chunks = [
        prediction.probs.float().cpu()
        for prediction in iter_split_predictions(model, processor, split, batch_size, progress)
    ]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, model.config.num_labels), dtype=np.float32)
