"""skinclip/feature_cache.py: cached fp16 CLIP features give the tower's loss; a cache of another tower is refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip.feature_cache import add_vision_features, vision_features_key
from trainer_cfa import CFALoss, SkinClipVLCollator


@pytest.fixture(scope="module")
def setup(make_config):
    datasets = pytest.importorskip("datasets")
    config = make_config()
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    rng = np.random.default_rng(0)
    dataset = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(3)],
            "metadata_text": ["A lesion on the back.", "", "A lesion on the lower extremity of a female patient."],
            "report": [
                "Melanoma: blue-whitish veil.",
                "Nevus: regular network.",
                "Basal cell carcinoma: arborizing vessels.",
            ],
            "label": [0, 1, 2],
        }
    )
    return model, processor, dataset


def test_cached_features_give_the_same_batch_and_loss(setup):
    model, processor, dataset = setup
    cached = add_vision_features(dataset, model, processor, batch_size=2)
    key = vision_features_key(model.config.vision_config)
    assert cached[0]["vision_features_key"] == key
    assert np.asarray(cached[0]["vision_features"]).shape == (model.vision.num_patches + 1, model.vision.hidden_size)

    plain = SkinClipVLCollator(processor, augment=False)([dataset[i] for i in range(3)])
    fast = SkinClipVLCollator(processor, cached_features_key=key)([cached[i] for i in range(3)])
    assert "pixel_values" not in fast and fast["vision_features"].dtype == torch.float16
    for name in ("prompt_ids", "prompt_attention_mask", "rationale_ids", "report_ids", "labels"):
        assert torch.equal(plain[name], fast[name]), name
    loss = CFALoss(lambda_align=1.0, lambda_cal=1.0, lambda_gen=1.0)
    with torch.no_grad():
        tower, _ = loss(model(**{k: v for k, v in plain.items() if k != "labels"}), plain["labels"])
        from_cache, _ = loss(model(**{k: v for k, v in fast.items() if k != "labels"}), fast["labels"])
    torch.testing.assert_close(from_cache, tower, rtol=1e-3, atol=1e-3)  # fp16 rounding of the features only


def test_cache_of_another_tower_or_layer_is_refused(setup):
    model, processor, dataset = setup
    cached = add_vision_features(dataset.select([0]), model, processor)
    other_layer = model.config.vision_config.__class__(**{**model.config.vision_config.to_dict(), "feature_layer": -1})
    assert vision_features_key(other_layer) != vision_features_key(model.config.vision_config)
    with pytest.raises(ValueError, match="recompute them with skinclip.feature_cache.add_vision_features"):
        SkinClipVLCollator(processor, cached_features_key=vision_features_key(other_layer))([cached[0]])
    with pytest.raises(ValueError, match="augment=False"):
        SkinClipVLCollator(processor, cached_features_key=vision_features_key(model.config.vision_config), augment=True)
