"""CFA loss terms against references, and the CFATrainer learning a learnable task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from transformers import TrainerCallback

from modeling_skinclip import SkinClipVLModel, SkinClipVLOutput, SkinClipVLProcessor
from tests.conftest import COLOURS
from tests.conftest import colour_dataset as _colour_dataset
from trainer_cfa import (
    ALIGNMENT_ONLY_MODULES,
    AlignmentLoss,
    CFALoss,
    CFATrainer,
    CFATrainingArguments,
    SkinClipVLCollator,
    TermAverages,
    brier_loss,
    class_balanced_alpha,
    compute_classification_metrics,
    focal_loss,
    report_keys,
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


def _multi_positive_infonce_numpy(image, text, scale, keys):
    """Symmetric InfoNCE whose rows count every sample with the same key as correct: -log sum_P p (the reference)."""
    logits = (scale * image @ text.T).double().numpy()
    keys = np.asarray(keys)
    positives = keys[:, None] == keys[None, :]

    def pooled_nll(m):
        p = np.exp(m - m.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return np.mean(-np.log((p * positives).sum(1)))

    return 0.5 * (pooled_nll(logits) + pooled_nll(logits.T))


def test_multi_positive_alignment_without_duplicates_is_clip_loss():
    image, text, scale = _embeddings()
    ours = AlignmentLoss()(image, text, scale, report_keys=torch.arange(8) * 7919)
    torch.testing.assert_close(ours, ClipLoss()(image, text, scale))


def test_multi_positive_alignment_with_duplicates_matches_the_formula(logits_labels):
    image, text, scale = _embeddings(batch=8)
    keys = torch.tensor([3, 1, 3, 5, 1, 3, 9, 0])  # three of key 3, two of key 1
    ours = AlignmentLoss()(image, text, scale, report_keys=keys)
    assert ours.item() == pytest.approx(_multi_positive_infonce_numpy(image, text, scale, keys), rel=1e-6)
    assert not torch.allclose(ours, ClipLoss()(image, text, scale))
    # Focal modulation composes with it: at gamma 0 every weight is 1.
    logits, labels = logits_labels
    modulated = AlignmentLoss(focal_modulation=True, gamma=0.0)(
        image, text, scale, logits[:8], labels[:8], report_keys=keys
    )
    torch.testing.assert_close(modulated, ours)


def test_multi_positive_removes_the_log_k_floor_of_duplicate_reports():
    """k identical reports embed identically; one-hot InfoNCE cannot go below log k however well images align,
    the pooled multi-positive loss goes to 0 (images of one report aligned with it, others far)."""
    keys = torch.tensor([3, 3, 3, 5, 5, 9])
    directions = F.normalize(torch.eye(6)[[0, 0, 0, 1, 1, 2]], dim=-1)  # one direction per distinct report
    image, text, scale = directions.clone(), directions.clone(), torch.tensor(100.0)
    one_hot = ClipLoss()(image, text, scale)
    expected_floor = (3 * np.log(3) + 2 * np.log(2)) / 6
    assert one_hot.item() == pytest.approx(expected_floor, rel=1e-4)
    assert AlignmentLoss()(image, text, scale, report_keys=keys).item() < 1e-6
    # Between identical reports the gradient no longer pushes the duplicates' images apart.
    image = image.requires_grad_()
    AlignmentLoss()(image, text, scale, report_keys=keys).backward()
    assert image.grad.abs().max() < 1e-6


def test_report_keys_ignore_padding_and_tell_reports_apart(make_config):
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 0], [5, 6, 0, 0, 0], [5, 6, 7, 0, 0]])
    mask = (ids != 0).long()
    keys = report_keys(ids, mask)
    assert keys[0] == keys[3] and len(set(keys.tolist())) == 3
    torch.testing.assert_close(report_keys(ids[:, :3], mask[:, :3])[[0, 2]], keys[[0, 2]])  # other padding
    # Token id 0 inside a report is a token, not padding.
    assert report_keys(torch.tensor([[0, 4]]), torch.ones(1, 2))[0] != report_keys(torch.tensor([[4]]))[0]
    # The same report in two batches padded differently by the real processor gets the same key.
    processor = SkinClipVLProcessor.from_pretrained(None, config=make_config())
    short = processor.tokenize_reports(["Nevus.", "Melanoma."])
    long = processor.tokenize_reports(["Melanoma: atypical network, blue-whitish veil and regression.", "Nevus."])
    assert report_keys(*short)[0] == report_keys(*long)[1]
    assert report_keys(*short)[1] != report_keys(*long)[0]


def test_term_averages_weight_values_and_skip_non_finite():
    averages = TermAverages()
    averages.add("gen", torch.tensor(2.0), 10)
    averages.add("gen", torch.tensor(5.0), 30)
    averages.add("gen", torch.tensor(float("nan")), 5)
    averages.add("cal", torch.tensor(float("inf")), 4)
    result = averages.compute(["focal", "gen", "cal"], "cpu")
    assert set(result) == {"gen", "cal"}  # nothing was added for focal
    assert result["gen"] == pytest.approx((2.0 * 10 + 5.0 * 30) / 40)
    assert np.isnan(result["cal"])
    assert averages.compute(["gen"], "cpu") == {}  # reading clears


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
    outputs = SkinClipVLOutput(
        logits=logits, v_global=image, t_global=text, logit_scale=scale, lm_loss=torch.tensor(2.0)
    )
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


# ---- a tiny model that learns (on conftest's colour images) ----------------------------------------------


def test_cfa_trainer_learns_a_learnable_task(tmp_path, make_config):
    config = make_config(class_names=tuple(COLOURS), focal_dim=32, alignment_dim=16)
    model = SkinClipVLModel(config, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    train, held_out = _colour_dataset(40, seed=0), _colour_dataset(20, seed=1)
    args = CFATrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=6,  # held-out B-ACC 0.983 measured at 6 epochs (15 took 269 s with the real vocabulary)
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


def test_evaluation_and_prediction_use_the_eval_data_collator(tmp_path, make_config):
    config = make_config(class_names=tuple(COLOURS))
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    rows = _colour_dataset(2, seed=0)
    training, evaluation = SkinClipVLCollator(processor, augment=True), SkinClipVLCollator(processor)
    args = CFATrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, dataloader_num_workers=0)
    trainer = CFATrainer(
        model=SkinClipVLModel(config, device="cpu"),
        args=args,
        train_dataset=rows,
        data_collator=training,
        eval_data_collator=evaluation,
        class_counts=[2, 2, 2],
    )
    assert trainer.get_eval_dataloader(rows).collate_fn is evaluation
    assert trainer.get_test_dataloader(rows).collate_fn is evaluation
    assert trainer.get_train_dataloader().collate_fn is training and trainer.data_collator is training
    plain = CFATrainer(
        model=trainer.model, args=args, train_dataset=rows, data_collator=training, class_counts=[2, 2, 2]
    )
    assert plain.get_eval_dataloader(rows).collate_fn is training  # no eval collator: the training one


def test_checkpoints_get_the_processor_files_of_one_serialisation(tmp_path, make_config, monkeypatch):
    """Every save writes the same files, byte for byte, as processor.save_pretrained, serialising the processor
    only once; another processor object is serialised afresh."""
    config = make_config(class_names=tuple(COLOURS))
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    processor.save_pretrained(tmp_path / "direct")
    args = CFATrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = CFATrainer(
        model=SkinClipVLModel(config, device="cpu"),
        args=args,
        train_dataset=_colour_dataset(2, seed=0),
        data_collator=SkinClipVLCollator(processor),
        processing_class=processor,
        class_counts=[2, 2, 2],
    )
    calls = []
    original = SkinClipVLProcessor.save_pretrained
    monkeypatch.setattr(
        SkinClipVLProcessor, "save_pretrained", lambda self, *a, **k: calls.append(self) or original(self, *a, **k)
    )

    def processor_files(folder):
        direct = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("*") if p.is_file())
        return {name: (folder / name).read_bytes() for name in direct}

    expected = processor_files(tmp_path / "direct")
    assert any(name.name == "tokenizer.json" for name in expected)
    for folder in ("first", "second"):
        trainer.save_model(str(tmp_path / folder))
        assert processor_files(tmp_path / folder) == expected
    assert calls == [processor]
    trainer.processing_class = SkinClipVLProcessor.from_pretrained(None, config=config)
    trainer.save_model(str(tmp_path / "third"))
    assert calls == [processor, trainer.processing_class]


# ---- gradient accumulation and the frozen alignment modules ---------------------------------------------


class _CaptureGradients(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _uneven_rationale_dataset():
    """8 rows whose report lengths grow by distinct powers of two: any two halves hold different token counts."""
    data = _colour_dataset(3, seed=2).select(range(8))
    repeats = [0, 1, 2, 4, 8, 16, 32, 64]
    return data.map(lambda row, i: {"report": row["report"] + " irregular" * repeats[i]}, with_indices=True)


def _one_optimizer_step(tmp_path, config, dataset, batch_size, accumulation, **cfa_settings):
    torch.manual_seed(0)  # the same new heads in every run
    model = SkinClipVLModel(config, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    args = CFATrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
        augment=False,
        disable_tqdm=True,
        **cfa_settings,
    )
    capture = _CaptureGradients()
    trainer = CFATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SkinClipVLCollator(processor),
        callbacks=[capture],
        class_counts=[3, 3, 2],
    )
    trainer.train()
    return capture.gradients, trainer.state.log_history[0]


def test_gradient_accumulation_equals_one_large_batch(tmp_path, make_config):
    """2 micro-batches of 4 give the loss, the logged terms and the gradients of one batch of 8.

    Alignment off: with it, each micro-batch's InfoNCE has only its own negatives (CFATrainer's docstring).
    Before the fix the gradients were summed (Trainer took forward(**kwargs) for a loss-scaling model) and the LM
    term was a mean of per-micro-batch token means.
    """
    config = make_config(class_names=tuple(COLOURS), max_rationale_tokens=256)
    dataset = _uneven_rationale_dataset()
    settings = dict(lambda_align=0.0, lambda_cal=1.0, lambda_gen=0.5)
    big_gradients, big_log = _one_optimizer_step(tmp_path / "8", config, dataset, 8, 1, **settings)
    accumulated_gradients, accumulated_log = _one_optimizer_step(tmp_path / "4x2", config, dataset, 4, 2, **settings)

    assert set(accumulated_gradients) == set(big_gradients) and any(".lora_" in n for n in big_gradients)
    for name, gradient in big_gradients.items():
        torch.testing.assert_close(accumulated_gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    for key in ("loss", "loss_focal", "loss_cal", "loss_gen"):
        assert accumulated_log[key] == pytest.approx(big_log[key], rel=1e-4), key


def test_lambda_align_zero_freezes_exactly_what_gets_no_gradient(tmp_path, make_config):
    """Under DDP (find_unused_parameters=False) every trained tensor must get a gradient at every step."""
    config = make_config(class_names=tuple(COLOURS))
    model = SkinClipVLModel(config, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    batch = SkinClipVLCollator(processor, with_report=False)(list(_colour_dataset(2, seed=0)))
    labels = batch.pop("labels")
    loss, _ = CFALoss(lambda_align=0.0)(model(**batch), labels)
    loss.backward()
    no_gradient = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert no_gradient and {n.split(".")[0] for n in no_gradient} == set(ALIGNMENT_ONLY_MODULES)
    model.zero_grad(set_to_none=True)

    def trainer(lambda_align):
        args = CFATrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, lambda_align=lambda_align)
        return CFATrainer(model=model, args=args, train_dataset=_colour_dataset(2, seed=0), class_counts=[2, 2, 2])

    trainer(0.5)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in model.trained_state_dict())
    trainer(0.0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and n in model.trained_state_dict()}
    assert frozen == no_gradient  # and, named in trained_state_dict, they are still saved and loaded
