"""SkinClipVLModel: shapes, masking, gradients, generation, save/load round trip, bad input."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from configuration_skinclip import SkinClipVLConfig
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from trainer_cfa import CFALoss

METADATA = ["A lesion on the posterior torso of a male patient aged about 55.", "A skin lesion."]
REPORTS = ["Melanoma: atypical pigment network and blue-whitish veil.", "Nevus: regular network."]


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def _randomize_trained(model, seed=0):
    """LoRA B starts at zero (adapters are a no-op at init): give every trained tensor random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + (1.0 if tensor.ndim == 0 else 0.0))


@pytest.fixture(scope="module")
def model_and_processor(make_config):
    config = make_config()
    model = SkinClipVLModel(config, device="cpu")
    _randomize_trained(model)
    return model.eval(), SkinClipVLProcessor.from_pretrained(None, config=config)


@pytest.fixture(scope="module")
def batch(model_and_processor):
    _, processor = model_and_processor
    return processor(_images(), METADATA, reports=REPORTS, rationales=REPORTS)


def test_config_nested_dicts_roundtrip(tmp_path, make_config):
    config = make_config()
    config.save_pretrained(tmp_path)
    loaded = SkinClipVLConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.vision_config).__name__ == "SkinClipVisionConfig"
    assert loaded.decoder_config.lora_target_modules == ["q_proj", "v_proj"]
    assert loaded.class_names == ["MEL", "NV", "BCC"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_labels=3, id2label={0: "MEL", 1: "NV"}), "num_labels=3 disagrees with id2label"),
        (dict(id2label={0: "MEL", 1: "NV"}, label2id={"MEL": 1, "NV": 0}), "not the inverse"),
        (dict(vision_config={"backend": "timm"}), "vision_config.backend='timm'"),
        (dict(decoder_config={"quantization": "nf3"}), "decoder_config.quantization='nf3'"),
        (dict(focal_dim=0), "focal_dim must be a positive integer"),
        (dict(image_token_pooling=0), "image_token_pooling must be a positive integer"),
        (dict(image_token_pooling=2.0), "image_token_pooling must be a positive integer"),
        (dict(prompt_template="no placeholder"), "{metadata}"),
        (dict(use_metadata="no"), "use_metadata must be true or false"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("[", r"\[")):
        SkinClipVLConfig(**kwargs)


@pytest.mark.parametrize("pooling", [1, 2])
def test_model_card_says_when_image_tokens_are_pooled(tmp_path, make_config, pooling):
    from skinclip.run_io import DataArguments
    from skinclip.training import write_model_card

    config = make_config(image_token_pooling=pooling)
    write_model_card(tmp_path, config, {}, DataArguments(dataset_path="data/x"), {"trainable": 1, "lora": 1})
    assert ("average-pooled 2×2" in (tmp_path / "README.md").read_text()) is (pooling == 2)


def test_use_metadata_false_keeps_the_metadata_out_of_the_prompt(make_config, tmp_path):
    with_metadata = SkinClipVLProcessor.from_pretrained(None, config=make_config())
    config = make_config(use_metadata=False)
    config.save_pretrained(tmp_path)
    assert SkinClipVLConfig.from_pretrained(tmp_path).use_metadata is False  # a checkpoint keeps the switch
    without = SkinClipVLProcessor.from_pretrained(None, config=SkinClipVLConfig.from_pretrained(tmp_path))

    def decoded(processor, texts):
        ids, mask = processor.tokenize_prompts(texts)
        return [processor.tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]

    assert "aged about 55" in decoded(with_metadata, METADATA)[0]
    image_only = decoded(without, METADATA)
    assert image_only == decoded(without, ["", ""]) == decoded(with_metadata, ["", ""])
    assert not any(word in image_only[0] for word in ("posterior", "torso", "male", "55"))
    # The same token ids as a prompt built from no metadata at all: nothing of the sentence is left.
    assert torch.equal(without.tokenize_prompts(METADATA)[0], with_metadata.tokenize_prompts(["", ""])[0])


def test_model_card_says_when_the_prompt_has_no_metadata(tmp_path, make_config):
    from skinclip.run_io import DataArguments
    from skinclip.training import write_model_card

    for use_metadata in (True, False):
        write_model_card(
            tmp_path, make_config(use_metadata=use_metadata), {}, DataArguments(), {"trainable": 1, "lora": 1}
        )
        assert ("no metadata sentence" in (tmp_path / "README.md").read_text()) is not use_metadata


def test_use_metadata_is_a_checked_training_field(tmp_path):
    from skinclip.errors import UserError
    from skinclip.run_io import parse_config
    from skinclip.training import ModelArguments

    config = tmp_path / "c.yaml"
    config.write_text("use_metadata: false\n")
    (model_args,) = parse_config([str(config)], (ModelArguments,))
    assert model_args.use_metadata is False
    with pytest.raises(UserError, match="use_metadata must be"):
        parse_config([str(config), "--use_metadata=no"], (ModelArguments,))


def test_unknown_class_name_is_named(make_config):
    config = make_config()
    assert config.label_ids(["NV", "MEL"]) == [1, 0]
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['SEK'\].*\['MEL', 'NV', 'BCC'\]"):
        config.label_ids(["SEK"])


def test_forward_shapes(model_and_processor, batch):
    model, _ = model_and_processor
    outputs = model(**batch)
    assert outputs.logits.shape == (2, 3)
    assert outputs.v_global.shape == outputs.t_global.shape == (2, 8)
    torch.testing.assert_close(outputs.v_global.norm(dim=-1), torch.ones(2))
    assert outputs.focal_attention.shape == (2, model.vision.num_patches)
    torch.testing.assert_close(outputs.focal_attention.sum(-1), torch.ones(2))
    assert outputs.lm_loss.ndim == 0 and torch.isfinite(outputs.lm_loss)
    assert model.patch_grid == (4, 4)


def test_rationale_tokens_do_not_change_class_logits(model_and_processor, batch):
    model, processor = model_and_processor
    other = processor(_images(), METADATA, rationales=["Something else entirely, and much longer than before.", "x"])
    with_rationale = model(**batch).logits
    with_other = model(**{**batch, **{k: other[k] for k in ("rationale_ids", "rationale_attention_mask")}}).logits
    classification_only = model(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"]).logits
    torch.testing.assert_close(with_rationale, with_other, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_rationale, classification_only, rtol=0, atol=1e-6)


def test_prompt_padding_does_not_change_a_sample(model_and_processor):
    model, processor = model_and_processor
    images = _images()
    alone = processor(images[1:], METADATA[1:])
    padded = processor(images, METADATA)  # the short second prompt is left-padded in this batch
    assert padded["prompt_attention_mask"][1].min() == 0
    torch.testing.assert_close(model(**alone).logits[0], model(**padded).logits[1], rtol=0, atol=1e-5)


def test_lm_loss_ignores_prompt_and_image_positions(model_and_processor, batch):
    model, _ = model_and_processor
    outputs = model(**batch, output_hidden_states=True)
    hidden = outputs.hidden_states
    # Reference: the usual causal-LM loss over the whole sequence, labels -100 except rationale tokens.
    num_prefix = hidden.shape[1] - batch["rationale_ids"].shape[1]
    labels = torch.full(hidden.shape[:2], -100)
    labels[:, num_prefix:] = batch["rationale_ids"].masked_fill(batch["rationale_attention_mask"] == 0, -100)
    logits = model.language_model.get_output_embeddings()(hidden)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(outputs.lm_loss, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", [1, 2])
def test_gradients_reach_trained_parts_and_stop_at_frozen_bases(make_config, pooling):
    config = make_config(image_token_pooling=pooling)
    model = SkinClipVLModel(config, device="cpu").train()
    _randomize_trained(model)
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    batch = processor(_images(), METADATA, reports=REPORTS, rationales=REPORTS)
    loss, _ = CFALoss(lambda_align=1.0, lambda_cal=1.0, lambda_gen=1.0)(model(**batch), torch.tensor([0, 1]))
    loss.backward()
    trained = model.trained_state_dict()
    for name, param in model.named_parameters():
        if name in trained:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert not param.requires_grad and param.grad is None, f"frozen {name} got a gradient"
    names = set(trained)
    for part in (
        "projector.",
        "focal_pooling.query",
        "focal_pooling.k_proj",
        "cls_token",
        "classifier.",
        "image_alignment.",
        "text_alignment.",
        "logit_scale",
        "lora_A",
        "lora_B",
    ):
        assert any(part in name for name in names), part
    assert not any(name.startswith("vision.") for name in names)


@pytest.mark.parametrize("pooling", [1, 2])  # 2: the shorter layout of image_token_pooling
def test_greedy_generation_with_cache_matches_full_recompute(pooled, batch, pooling):
    model = pooled(pooling)
    prediction = model.predict(
        batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"], max_new_tokens=6, eos_token_id=-1
    )
    assert prediction.rationale_ids.shape == (2, 6)
    # Without a cache: feed the generated tokens as a rationale and take the argmax at each position.
    full = model(
        **{k: batch[k] for k in ("prompt_ids", "prompt_attention_mask", "pixel_values")},
        rationale_ids=prediction.rationale_ids,
        output_hidden_states=True,
    )
    start = full.hidden_states.shape[1] - 6 - 1
    expected = model.language_model.get_output_embeddings()(full.hidden_states[:, start : start + 6]).argmax(-1)
    assert torch.equal(prediction.rationale_ids, expected)
    torch.testing.assert_close(prediction.logits, full.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(2))
    assert prediction.attention_map.shape == (2, 4, 4)


@pytest.fixture
def pooled(model_and_processor):
    """The module's model reading its patch tokens k×k-pooled (config.image_token_pooling), restored after."""
    model, _ = model_and_processor

    def set_pooling(k):
        model.config.image_token_pooling = k
        return model

    yield set_pooling
    model.config.image_token_pooling = 1


# (decoder token index, patch rows, patch columns) of some windows of the tiny tower's 4×4 grid; with k=3 the
# windows overhanging the border keep the patches inside (token 4 holds patch (3, 3) alone).
@pytest.mark.parametrize(
    "k, windows",
    [
        (2, [(1, (0, 2), (0, 2)), (2, (0, 2), (2, 4)), (4, (2, 4), (2, 4))]),
        (3, [(1, (0, 3), (0, 3)), (2, (0, 3), (3, 4)), (4, (3, 4), (3, 4))]),
    ],
)
def test_image_token_pooling_averages_patch_windows(pooled, batch, k, windows):
    model = pooled(1)
    full, patches = model.encode_image(batch["pixel_values"])
    grid = patches.unflatten(1, model.patch_grid)  # (batch, rows, columns, hidden)
    model = pooled(k)
    tokens, pooled_patches = model.encode_image(batch["pixel_values"])
    assert tokens.shape[1] == model.num_image_tokens == 1 + 4
    torch.testing.assert_close(tokens[:, 0], full[:, 0], rtol=0, atol=0)  # CLIP's class token passes as it is
    torch.testing.assert_close(pooled_patches, patches, rtol=0, atol=0)  # Focal Pooling sees every patch
    for index, (top, bottom), (left, right) in windows:
        expected = grid[:, top:bottom, left:right].flatten(1, 2).mean(1)
        torch.testing.assert_close(tokens[:, index], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 17, 7), (2, 10, 32)])
def test_vision_features_of_another_shape_are_named(model_and_processor, batch, shape):
    model, _ = model_and_processor
    assert model.vision.hidden_size != 7 and model.vision.num_patches + 1 == 17
    expected = r"the CLIP tower gives 17 tokens \(a 4x4 patch grid and 1 prefix token\(s\)\)"
    with pytest.raises(ValueError, match=expected):
        model(batch["prompt_ids"], batch["prompt_attention_mask"], vision_features=torch.zeros(shape))


def test_image_token_pooling_shortens_the_decoder_sequence_only(pooled, batch):
    unpooled = pooled(1)(**batch, output_hidden_states=True)
    model = pooled(2)
    outputs = model(**batch, output_hidden_states=True)
    assert unpooled.hidden_states.shape[1] - outputs.hidden_states.shape[1] == 16 - 4
    assert outputs.focal_attention.shape == unpooled.focal_attention.shape == (2, 16)
    torch.testing.assert_close(outputs.v_global, unpooled.v_global, rtol=0, atol=0)
    assert not torch.allclose(outputs.logits, unpooled.logits)  # the decoder read other image tokens


def test_a_pooled_checkpoint_loads_with_its_pooling(tmp_path, pooled, batch):
    model = pooled(2)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = SkinClipVLModel.from_pretrained(tmp_path, device="cpu").eval()
    assert loaded.config.image_token_pooling == 2 and loaded.num_image_tokens == 5
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)


def test_prediction_runs_the_decoder_without_a_padding_mask(model_and_processor, batch):
    model, _ = model_and_processor
    assert batch["prompt_attention_mask"].min() == 0  # a left-padded prompt: the mask would be needed
    seen = []
    hook = model.text_stack.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        probs = model.predict(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"]).probs
        model.trailing_padding = False
        masked = model.predict(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"]).probs
    finally:
        model.trailing_padding = True
        hook.remove()
    assert seen[0] is None and seen[1] is not None  # the default (trailing padding), then the masked path
    torch.testing.assert_close(probs, masked, rtol=1e-5, atol=1e-6)


def test_word_grounding_maps(model_and_processor, batch):
    model, processor = model_and_processor
    word_ids, word_mask = processor.tokenize_reports(["veil", "streaks", "network"])
    maps = model.word_grounding(word_ids, word_mask, pixel_values=batch["pixel_values"])
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 3))


@pytest.mark.parametrize("decoder, vision", [("qwen2_5_vl", "open_clip")])
def test_other_bases(make_config, decoder, vision):
    config = make_config(decoder=decoder, vision=vision)
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    batch = processor(_images(), METADATA, reports=REPORTS, rationales=REPORTS)
    outputs = model(**batch)
    assert outputs.logits.shape == (2, 3) and torch.isfinite(outputs.lm_loss)
    assert getattr(model.language_model.model, "visual", None) is None  # Qwen2.5-VL's own ViT is dropped


def test_decoder_without_lora_targets_is_named(make_config):
    with pytest.raises(ValueError, match=r"has no module named \['q_proj', 'v_proj'\] for LoRA"):
        SkinClipVLModel(make_config(decoder="gpt2"), device="cpu")


def test_save_then_automodel_in_fresh_process_gives_same_logits(tmp_path, model_and_processor, batch):
    model, processor = model_and_processor
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    assert (checkpoint / "lora" / "adapter_config.json").is_file()
    assert not (checkpoint / "adapter_config.json").exists()  # at the root it would hijack AutoModel
    assert {"modeling_skinclip.py", "configuration_skinclip.py", "processing_skinclip.py"} <= {
        p.name for p in checkpoint.iterdir()
    }
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.trained_state_dict())
    base_names = {n for n in model.state_dict() if n not in saved}
    assert base_names and not any(".lora_" in n for n in base_names)
    assert sum(t.numel() for t in saved.values()) < 0.2 * sum(t.numel() for t in model.state_dict().values())

    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True, device="cpu")
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(**batch).logits, {str(tmp_path / "logits.pt")!r})
        print(type(model).__name__)
        # The processor ships as remote code too, and resolves the checkpoint's own tokenizer copy.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        processor_class = get_class_from_dynamic_module("processing_skinclip.SkinClipVLProcessor", {str(checkpoint)!r})
        processor = processor_class.from_pretrained({str(checkpoint)!r})
        torch.save(processor.tokenize_prompts(["A lesion on the back."])[0], {str(tmp_path / "prompt.pt")!r})
        print(processor_class.__module__)
    """)
    # cwd outside the repo: the model class must come from the checkpoint's copied code
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SkinClipVLModel" in result.stdout
    assert "transformers_modules" in result.stdout  # the processor class came from the checkpoint's code
    torch.testing.assert_close(
        torch.load(tmp_path / "prompt.pt", weights_only=True), processor.tokenize_prompts(["A lesion on the back."])[0]
    )
    reloaded = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded, model(**batch).logits, rtol=0, atol=1e-6)


def test_checkpoint_with_missing_files_is_named(tmp_path, model_and_processor):
    model, _ = model_and_processor
    model.save_pretrained(tmp_path)
    (tmp_path / "lora" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['lora/adapter_config.json'\]"):
        SkinClipVLModel.from_pretrained(tmp_path, device="cpu")


def test_checkpoint_with_missing_tensor_is_named(tmp_path, model_and_processor):
    from safetensors.torch import save_file

    model, _ = model_and_processor
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("cls_token")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1: \['cls_token'\]"):
        SkinClipVLModel.from_pretrained(tmp_path, device="cpu")


def test_loading_with_other_labels_fails_clearly(tmp_path, model_and_processor, make_config):
    model, _ = model_and_processor
    model.save_pretrained(tmp_path)
    other = make_config(class_names=("MEL", "NV"))
    with pytest.raises(ValueError, match=r"labels \['MEL', 'NV'\] vs checkpoint \['MEL', 'NV', 'BCC'\]"):
        SkinClipVLModel.from_pretrained(tmp_path, config=other, device="cpu")


def test_nf4_decoder_loads_and_trains_on_cpu(make_config):
    pytest.importorskip("bitsandbytes")
    config = make_config(decoder_overrides=dict(quantization="nf4", compute_dtype="float32"))
    model = SkinClipVLModel(config, device="cpu").train()
    linear_types = {type(m).__name__ for m in model.language_model.modules()}
    assert "Linear4bit" in linear_types, linear_types
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    batch = processor(_images(), METADATA, reports=REPORTS, rationales=REPORTS)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    loss, _ = CFALoss()(model(**batch), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, lora_b.detach())


def test_decoder_text_encoder_and_focal_fusion(make_config):
    """`text_encoder="decoder"` embeds the report with the (LoRA-adapted) decoder; fusion layers are optional."""
    config = make_config(text_encoder="decoder", focal_fusion_layers=1)
    model = SkinClipVLModel(config, device="cpu").eval()
    _randomize_trained(model)
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    assert processor.report_tokenizer is processor.tokenizer
    batch = processor(_images(), METADATA, reports=REPORTS)
    outputs = model(**batch)
    assert outputs.t_global.shape == (2, 8)
    torch.testing.assert_close(outputs.t_global.norm(dim=-1), torch.ones(2))
    (outputs.t_global * outputs.v_global).sum().backward()
    assert model.text_alignment.weight.grad.abs().sum() > 0
    assert model.focal_pooling.fusion.layers[0].linear1.weight.grad.abs().sum() > 0
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)  # the report path trains LoRA too


def test_save_filters_a_given_state_dict(tmp_path, model_and_processor):
    """Under FSDP the Trainer passes a gathered state dict: only its trained tensors are written."""
    model, _ = model_and_processor
    gathered = {name: tensor + 1.0 for name, tensor in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=gathered)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.trained_state_dict())
    torch.testing.assert_close(saved["cls_token"], model.cls_token.detach() + 1.0)
    assert "Qwen2_5_VLDecoderLayer" in model._no_split_modules


def test_post_init_initialises_only_the_new_modules(make_config, tiny_bases):
    """`post_init` runs `_init_weights`: the new modules get their init, every base tensor stays as loaded."""
    from safetensors.torch import load_file as load

    model = SkinClipVLModel(make_config(), device="cpu")
    assert model.logit_scale.item() == pytest.approx(model.config.logit_scale_init)
    assert model.calibration_temperature.item() == 1.0
    assert 0.01 < model.cls_token.std().item() < 0.03
    clip = load(str(Path(tiny_bases["clip"]) / "model.safetensors"))
    tower = model.vision.model.state_dict()
    assert all(torch.equal(tower[name], tensor) for name, tensor in clip.items())
    embeddings = model.language_model.get_input_embeddings().weight
    stored = {}
    for shard in Path(tiny_bases["decoder-qwen2_5_vl"]).glob("*.safetensors"):
        stored.update(load(str(shard)))
    assert torch.equal(embeddings, stored["model.embed_tokens.weight"].to(embeddings.dtype))
