"""rationale_conditioning="class": "Diagnosis: <class>." between CLS and the rationale, the true class in training and
the class head's argmax at generation; CLS never sees it; the setting survives save/reload."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from configuration_skinclip import SkinClipVLConfig
from datasets_scripts.isic2019 import class_report
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

CLASSES = ("MEL", "NV", "BCC")
METADATA = ["A lesion on the posterior torso of a male patient aged about 55.", "A skin lesion."]
REPORTS = [class_report("MEL"), class_report("NV")]


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def conditioned(make_config):
    config = make_config(class_names=CLASSES, rationale_conditioning="class")
    model = SkinClipVLModel(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: random trained tensors make every path matter
        for tensor in model.trained_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + (1.0 if tensor.ndim == 0 else 0.0))
    return model.eval(), SkinClipVLProcessor.from_pretrained(None, config=config)


def test_condition_table_writes_each_class_left_padded(conditioned):
    _, processor = conditioned
    table = processor.class_condition_inputs()
    ids, mask = table["class_condition_ids"], table["class_condition_attention_mask"]
    assert ids.shape[0] == len(CLASSES) and mask[:, -1].all()  # left-padded: every row ends with a real token
    texts = [processor.tokenizer.decode(row[m.bool()]).strip() for row, m in zip(ids, mask)]
    assert texts == [f"Diagnosis: {name}." for name in CLASSES]


def test_training_batch_holds_the_true_class(conditioned):
    from trainer_cfa import SkinClipVLCollator

    _, processor = conditioned
    rows = [
        {"image": image, "metadata_text": text, "report": report, "label": label}
        for image, text, report, label in zip(_images(3), [*METADATA, ""], [*REPORTS, class_report("BCC")], [2, 0, 1])
    ]
    batch = SkinClipVLCollator(processor)(rows)
    written = [
        processor.tokenizer.decode(ids[mask.bool()]).strip()
        for ids, mask in zip(batch["condition_ids"], batch["condition_attention_mask"])
    ]
    assert written == ["Diagnosis: BCC.", "Diagnosis: MEL.", "Diagnosis: NV."]
    # Without the LM term there is no rationale, so nothing to condition.
    assert "condition_ids" not in SkinClipVLCollator(processor, with_rationale=False)(rows)


def test_class_logits_never_see_the_condition_tokens(conditioned):
    model, processor = conditioned
    images = _images()
    as_true = model(**processor(images, METADATA, rationales=REPORTS, condition_labels=[0, 1]))
    as_other = model(**processor(images, METADATA, rationales=REPORTS, condition_labels=[2, 2]))
    alone = model(**processor(images, METADATA))
    torch.testing.assert_close(as_true.logits, as_other.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_true.logits, alone.logits, rtol=0, atol=1e-6)
    assert not torch.allclose(as_true.lm_loss, as_other.lm_loss)  # the rationale does read them


def test_lm_loss_is_on_rationale_tokens_only(conditioned):
    model, processor = conditioned
    batch = processor(_images(), METADATA, rationales=REPORTS, condition_labels=[0, 1])
    outputs = model(**batch, output_hidden_states=True)
    hidden = outputs.hidden_states
    # [image][prompt][CLS][condition][rationale]: the condition adds its width to the sequence.
    widths = (model.num_image_tokens, batch["prompt_ids"].shape[1], 1, batch["condition_ids"].shape[1])
    assert hidden.shape[1] == sum(widths) + batch["rationale_ids"].shape[1]
    labels = torch.full(hidden.shape[:2], -100)
    labels[:, sum(widths) :] = batch["rationale_ids"].masked_fill(batch["rationale_attention_mask"] == 0, -100)
    logits = model.language_model.get_output_embeddings()(hidden)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(outputs.lm_loss, reference, rtol=1e-5, atol=1e-6)


def test_generation_follows_the_predicted_class(conditioned):
    model, processor = conditioned
    batch = processor(_images(), METADATA)
    table = processor.class_condition_inputs()
    fed = []
    hook = model.language_model.get_input_embeddings().register_forward_hook(lambda m, i, o: fed.append(i[0]))
    try:
        prediction = model.predict(**batch, max_new_tokens=5, eos_token_id=-1, **table)
    finally:
        hook.remove()
    predicted = prediction.logits.argmax(-1)
    # Embedded in order: the prompt, then the predicted class's conditioning tokens, then each generated token.
    assert torch.equal(fed[0], batch["prompt_ids"]) and torch.equal(fed[1], table["class_condition_ids"][predicted])
    # The cached generation equals a full pass over [image][prompt][CLS][predicted class][generated rationale].
    full = model(
        **batch,
        rationale_ids=prediction.rationale_ids,
        condition_ids=table["class_condition_ids"][predicted],
        condition_attention_mask=table["class_condition_attention_mask"][predicted],
        output_hidden_states=True,
    )
    start = full.hidden_states.shape[1] - 5 - 1
    expected = model.language_model.get_output_embeddings()(full.hidden_states[:, start : start + 5]).argmax(-1)
    assert torch.equal(prediction.rationale_ids, expected)
    torch.testing.assert_close(prediction.logits, full.logits, rtol=0, atol=1e-5)


def test_missing_or_unasked_condition_is_an_error(conditioned, make_config):
    model, processor = conditioned
    batch = processor(_images(), METADATA, rationales=REPORTS)
    with pytest.raises(ValueError, match="needs condition_ids"):
        model(**batch)
    with pytest.raises(ValueError, match="needs class_condition_ids"):
        model.predict(**processor(_images(), METADATA), max_new_tokens=2)
    with pytest.raises(ValueError, match="rationale_conditioning"):
        SkinClipVLConfig(rationale_conditioning="label")


def test_setting_survives_save_and_an_old_checkpoint_loads_as_none(tmp_path, conditioned):
    model, _ = conditioned
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["rationale_conditioning"] == "class"
    reloaded = SkinClipVLModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert reloaded.config.rationale_conditioning == "class"
    # A checkpoint written before the field existed: config.json without it.
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del saved["rationale_conditioning"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
    assert SkinClipVLModel.from_pretrained(tmp_path / "ckpt", device="cpu").config.rationale_conditioning == "none"


@pytest.mark.parametrize("conditioning", ["none", "class"])
def test_model_card_says_when_the_rationale_follows_the_class(tmp_path, make_config, conditioning):
    from skinclip.run_io import DataArguments
    from skinclip.training import write_model_card

    config = make_config(rationale_conditioning=conditioning)
    write_model_card(tmp_path, config, {}, DataArguments(dataset_path="data/x"), {"trainable": 1, "lora": 1})
    assert ("`rationale_conditioning: class`" in (tmp_path / "README.md").read_text()) is (conditioning == "class")
