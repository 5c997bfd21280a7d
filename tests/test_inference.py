"""skinclip.inference: the one batch loop gives the model's own forward logits and calibrated probabilities."""

import numpy as np
import pytest
import torch

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip.inference import predict_batch, split_logits, split_probabilities
from tests.conftest import colour_dataset


@pytest.fixture(scope="module")
def model_and_split(make_config):
    config = make_config()
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    split = colour_dataset(per_class=2, seed=0)
    split = split.map(
        lambda row, index: {"metadata_text": None if index == 1 else row["metadata_text"]}, with_indices=True
    )  # a missing metadata text is an empty one
    return model, processor, split


def test_split_logits_are_the_forward_logits_in_row_order(model_and_split):
    model, processor, split = model_and_split
    logits = split_logits(model, processor, split, batch_size=4, progress=False)
    inputs = processor(split["image"], [text or "" for text in split["metadata_text"]])
    with torch.no_grad():
        expected = model(**inputs).logits.float().numpy()
    assert logits.shape == (len(split), model.config.num_labels)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert split_logits(model, processor, split.select([]), progress=False).shape == (0, model.config.num_labels)


def test_split_probabilities_apply_the_calibration_temperature(model_and_split):
    model, processor, split = model_and_split
    logits = split_logits(model, processor, split, batch_size=3, progress=False)
    model.calibration_temperature.fill_(2.0)
    try:
        probs = split_probabilities(model, processor, split, batch_size=5)
    finally:
        model.calibration_temperature.fill_(1.0)
    expected = torch.softmax(torch.as_tensor(logits) / 2.0, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_predict_batch_generates_a_rationale_only_when_asked(model_and_split):
    model, processor, split = model_and_split
    images, texts = split["image"][:2], split["metadata_text"][:2]
    prediction, inputs = predict_batch(model, processor, images, texts)
    assert prediction.rationale_ids is None and inputs["pixel_values"].shape[0] == 2
    assert prediction.attention_map.shape == (2, *model.patch_grid)
    with_rationale, _ = predict_batch(model, processor, images, texts, max_new_tokens=3)
    assert with_rationale.rationale_ids.shape[0] == 2
    torch.testing.assert_close(with_rationale.probs, prediction.probs, rtol=1e-4, atol=1e-5)
