"""CFA loss terms against references, and the CFATrainer learning a learnable task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image as ImageFeature, Value
from open_clip.loss import ClipLoss
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLOutput, SkinClipVLProcessor
from trainer_cfa import (
    AlignmentLoss,
    CFALoss,
    CFATrainer,
    CFATrainingArguments,
    SkinClipVLCollator,
    brier_loss,
    class_balanced_alpha,
    compute_classification_metrics,
    focal_loss,
    resolve_focal_alpha,
)


@pytest.fixture
def logits_labels():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=generator) * 3, torch.randint(0, 5, (16,), generator=generator)


def test_focal_with_gamma_zero_uniform_alpha_is_cross_entropy(logits_labels):
    logits, labels = logits_labels
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0, alpha=None), F.cross_entropy(logits, labels))
    uniform = torch.ones(5)
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0, alpha=uniform), F.cross_entropy(logits, labels))


def test_focal_matches_numpy_formula(logits_labels):
    logits, labels = logits_labels
    alpha = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.25])
    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p_true = p[np.arange(len(labels)), labels.numpy()]
    expected = np.mean(-alpha.numpy()[labels.numpy()] * (1 - p_true) ** 2 * np.log(p_true))
    assert focal_loss(logits, labels, gamma=2.0, alpha=alpha).item() == pytest.approx(expected, rel=1e-5)


def test_brier_matches_numpy_formula(logits_labels):
    logits, labels = logits_labels
    z = logits.double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.eye(5)[labels.numpy()]
    assert brier_loss(logits, labels).item() == pytest.approx(np.mean(((p - y) ** 2).sum(1)), rel=1e-5)


def _embeddings(batch=8, dim=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text, torch.tensor(14.3)


def test_alignment_equals_open_clip_clip_loss_and_the_formula():
    image, text, scale = _embeddings()
    ours = AlignmentLoss()(image, text, scale)
    torch.testing.assert_close(ours, ClipLoss()(image, text, scale))
    logits = (scale * image @ text.T).double().numpy()
    def cross_entropy_rows(m):
        m = m - m.max(1, keepdims=True)
        return np.mean(-np.diag(m) + np.log(np.exp(m).sum(1)))
    expected = 0.5 * (cross_entropy_rows(logits) + cross_entropy_rows(logits.T))
    assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_focal_modulated_alignment_reduces_to_clip_loss_at_gamma_zero(logits_labels):
    image, text, scale = _embeddings(batch=16)
    logits, labels = logits_labels
    modulated = AlignmentLoss(focal_modulation=True, gamma=0.0)(image, text, scale, logits, labels)
    torch.testing.assert_close(modulated, ClipLoss()(image, text, scale))
    # With gamma > 0 confident (easy) samples weigh less than with gamma = 0.
    easy = AlignmentLoss(focal_modulation=True, gamma=2.0)(image, text, scale, logits, labels)
    assert easy < modulated


def test_class_balanced_alpha_is_inverse_frequency_with_mean_one():
    alpha = class_balanced_alpha([100, 10, 1, 0])
    assert alpha.mean().item() == pytest.approx(1.0)
    assert alpha[0] < alpha[1] < alpha[2] and alpha[3] == alpha[2]
    assert resolve_focal_alpha("uniform", None, 4) is None
    with pytest.raises(ValueError, match="expected 3 non-negative weights"):
        resolve_focal_alpha("1,2", None, 3)


def test_cfa_loss_composes_named_terms(logits_labels):
    logits, labels = logits_labels
    image, text, scale = _embeddings(batch=16)
    outputs = SkinClipVLOutput(logits=logits, v_global=image, t_global=text, logit_scale=scale, lm_loss=torch.tensor(2.0))
    loss, terms = CFALoss(gamma=2.0, lambda_align=0.3, lambda_cal=0.7, lambda_gen=0.5)(outputs, labels)
    assert set(terms) == {"focal", "align", "cal", "gen"}
    expected = terms["focal"] + 0.3 * terms["align"] + 0.7 * terms["cal"] + 0.5 * 2.0
    torch.testing.assert_close(loss, expected)
    loss_ce_only, terms_ce = CFALoss(gamma=0.0, lambda_align=0, lambda_cal=0, lambda_gen=0)(outputs, labels)
    assert set(terms_ce) == {"focal"}
    torch.testing.assert_close(loss_ce_only, F.cross_entropy(logits, labels))


def test_compute_metrics_on_logits():
    from transformers import EvalPrediction

    logits = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 1.0]])
    metrics = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0, 1])))
    assert metrics["balanced_accuracy"] == 1.0 and metrics["auroc_macro"] == 1.0
    assert 0.0 < metrics["ece"] < 0.5


# ---- a tiny model that learns ------------------------------------------------------------------------

COLOURS = {"MEL": (60, 30, 20), "NV": (200, 150, 90), "BCC": (210, 90, 180)}


def _colour_dataset(per_class, seed):
    """Images whose class is the lesion colour (plus noise and a random background tone)."""
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
        {"image": ImageFeature(), "label": ClassLabel(names=list(COLOURS)), "metadata_text": Value("string"),
         "report": Value("string")}
    )
    return Dataset.from_dict(rows, features=features)


def test_cfa_trainer_learns_a_learnable_task(tmp_path, make_config):
    config = make_config(class_names=tuple(COLOURS), focal_dim=32, alignment_dim=16)
    model = SkinClipVLModel(config, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    train, held_out = _colour_dataset(40, seed=0), _colour_dataset(20, seed=1)
    args = CFATrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=15,
        per_device_train_batch_size=12,
        per_device_eval_batch_size=30,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
        augment=False,
        disable_tqdm=True,
    )
    trainer = CFATrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=SkinClipVLCollator(processor),
        compute_metrics=compute_classification_metrics,
        class_counts=[40, 40, 40],
    )
    trainer.train()
    metrics = trainer.evaluate(held_out)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"loss_focal", "loss_align", "loss_cal", "loss_gen"} <= logged
    assert {"eval_loss_focal", "eval_loss_align", "eval_loss_cal", "eval_loss_gen"} <= set(metrics)
    assert metrics["eval_balanced_accuracy"] >= 0.9, metrics
    first = next(entry for entry in trainer.state.log_history if "loss_gen" in entry)
    last = [entry for entry in trainer.state.log_history if "loss_gen" in entry][-1]
    assert last["loss_gen"] < first["loss_gen"]  # the rationale LM learns too


def test_augmentation_is_keyed_by_seed_epoch_and_image(make_config):
    config = make_config(class_names=tuple(COLOURS))
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    rows = [dict(row, image_id=f"img{i}") for i, row in enumerate(_colour_dataset(4, seed=0))]
    collator = SkinClipVLCollator(processor, augment=True, seed=7)
    first = collator(rows)["pixel_values"]
    torch.manual_seed(123)  # the global stream must not matter
    again = collator(rows)["pixel_values"]
    collator.epoch = 1
    next_epoch = collator(rows)["pixel_values"]
    assert torch.equal(first, again)
    assert not torch.equal(first, next_epoch)
    plain = SkinClipVLCollator(processor, augment=False)(rows)["pixel_values"]
    assert not torch.equal(first, plain)
