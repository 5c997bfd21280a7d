"""Non-finite guard, checkpoint mismatch and dataset-column errors."""

import pytest
import torch
from datasets import DatasetDict

from modeling_skinclip import SkinClipVLModel
from tests.conftest import COLOURS
from tests.conftest import colour_dataset as _colour_dataset


class PoisonAtSteps:
    """Wraps the model's forward: on chosen training steps (1-based) the class logits become NaN."""

    def __init__(self, model, steps):
        self.model, self.steps, self.calls = model, set(steps), 0
        self.original = model.forward

    def __call__(self, *args, **kwargs):
        outputs = self.original(*args, **kwargs)
        if self.model.training:
            self.calls += 1
            if self.calls in self.steps:
                outputs.logits = outputs.logits * float("nan")
        return outputs


def _trained_snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.trained_state_dict().items()}


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, colour_trainer):
    trainer, model = colour_trainer(tmp_path, max_steps=4)
    poison = PoisonAtSteps(model, steps={2})
    model.forward = poison
    snapshots = []
    original_step = trainer.create_optimizer().step

    def recording_step(*args, **kwargs):
        snapshots.append(_trained_snapshot(model))
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train()
    after = _trained_snapshot(model)
    assert trainer.nonfinite_guard.skipped == 1
    assert all(torch.isfinite(t).all() for t in after.values())
    # Step 2's optimizer call saw no gradients: the weights after it equal those before it.
    for name in after:
        torch.testing.assert_close(snapshots[1][name], snapshots[2][name], rtol=0, atol=0)
    # ...while the finite steps around it did train.
    assert not torch.equal(snapshots[0]["classifier.1.weight"], snapshots[1]["classifier.1.weight"])
    assert not torch.equal(snapshots[2]["classifier.1.weight"], after["classifier.1.weight"])
    logged = [
        entry["nonfinite_steps_skipped"] for entry in trainer.state.log_history if "nonfinite_steps_skipped" in entry
    ]
    assert logged[0] == 0 and logged[-1] == 1


class NaNConstantInLossAtSteps(PoisonAtSteps):
    """A NaN that reaches the loss but not the gradients (a constant added to the LM term)."""

    def __call__(self, *args, **kwargs):
        outputs = self.original(*args, **kwargs)
        if self.model.training:
            self.calls += 1
            if self.calls in self.steps:
                outputs.lm_loss = outputs.lm_loss + torch.tensor(float("nan"))
        return outputs


def test_a_nonfinite_loss_with_finite_gradients_is_skipped_too(tmp_path, colour_trainer):
    trainer, model = colour_trainer(tmp_path, max_steps=3)
    model.forward = NaNConstantInLossAtSteps(model, steps={2})
    snapshots = []
    original_step = trainer.create_optimizer().step

    def recording_step(*args, **kwargs):
        snapshots.append(_trained_snapshot(model))
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())  # finite grads
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 1
    for name, tensor in snapshots[2].items():
        torch.testing.assert_close(snapshots[1][name], tensor, rtol=0, atol=0)


def test_skip_counts_survive_a_resume(tmp_path, colour_trainer):
    trainer, model = colour_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    model.forward = PoisonAtSteps(model, steps={1})
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 1

    resumed, _ = colour_trainer(tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert resumed.nonfinite_guard.skipped == 1  # restored from checkpoint-2's trainer_state.json
    assert resumed.state.log_history[-2]["nonfinite_steps_skipped"] == 1


def test_run_stops_after_consecutive_nonfinite_steps(tmp_path, colour_trainer):
    trainer, model = colour_trainer(tmp_path, max_steps=10, max_consecutive=3)
    model.forward = PoisonAtSteps(model, steps={3, 4, 5, 6, 7})
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite loss or gradient"):
        trainer.train()
    assert trainer.nonfinite_guard.skipped == 3
    assert trainer.state.global_step == 4  # steps 1, 2 trained; 3, 4 skipped; the 5th stopped the run
    assert all(torch.isfinite(t).all() for t in model.trained_state_dict().values())


def test_training_data_missing_a_column_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from skinclip import training

    dataset = DatasetDict(
        {split: _colour_dataset(2, seed=0).remove_columns("report") for split in ("train", "validation", "test")}
    )
    dataset.save_to_disk(str(tmp_path / "data"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(training, "SkinClipVLModel", must_not_build)
    with pytest.raises(ValueError, match=r"split 'train' lacks required column\(s\) \['report'\]"):
        training.main(
            [
                "configs/demo.yaml",
                f"--dataset_path={tmp_path / 'data'}",
                "--demo_dataset=false",
                f"--output_dir={tmp_path / 'out'}",
            ]
        )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("decoder", "gpt2", "decoder"),
        ("vision", "open_clip", "vision tower"),
    ],
)
def test_loading_a_checkpoint_with_other_bases_fails_clearly(tmp_path, make_config, field, value, message):
    config = make_config()
    model = SkinClipVLModel(config, device="cpu")
    model.save_pretrained(tmp_path)
    other = make_config(**{field: value})
    with pytest.raises(ValueError, match=f"config does not match checkpoint .*{message}"):
        SkinClipVLModel.from_pretrained(tmp_path, config=other, device="cpu")


# --------------------------------------------------------------------------------------------------------
# User values refused before data or model is built (skinclip.validation)
# --------------------------------------------------------------------------------------------------------


def _must_not_build(*args, **kwargs):
    raise AssertionError("data or model was built before the values were checked")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--lambda_cal=-5", "lambda_cal must be >= 0"),  # trained to chance, exit 0
        ("--num_train_epochs=0", "num_train_epochs must be > 0"),  # shipped an untrained checkpoint
        ("--learning_rate=fast", "learning_rate must be a number"),  # failed inside torch, unnamed
        ('--lambda_cal="nan"', "lambda_cal must be a number"),
        ("--lambda_align=-1", "lambda_align must be >= 0"),  # said "lambda_align > 0 needs report_ids"
    ],
)
def test_bad_training_values_fail_before_data_or_model(tmp_path, monkeypatch, override, message):
    from skinclip import training
    from skinclip.errors import UserError

    monkeypatch.setattr(training, "load_training_data", _must_not_build)
    monkeypatch.setattr(training, "SkinClipVLModel", _must_not_build)
    with pytest.raises(UserError, match=message):
        training.main(["configs/demo.yaml", f"--output_dir={tmp_path / 'out'}", override])


def _colour_splits(validation=None, train_split=None):
    return DatasetDict(
        {
            "train": train_split or _colour_dataset(2, seed=0),
            "validation": validation or _colour_dataset(1, seed=1),
            "test": _colour_dataset(1, seed=2),
        }
    )


def _train_on(tmp_path, monkeypatch, dataset):
    from skinclip import training

    dataset.save_to_disk(str(tmp_path / "data"))
    monkeypatch.setattr(training, "SkinClipVLModel", _must_not_build)
    training.main(
        [
            "configs/demo.yaml",
            f"--dataset_path={tmp_path / 'data'}",
            "--demo_dataset=false",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )


def test_validation_classes_in_another_order_fail_before_the_model_is_built(tmp_path, monkeypatch):
    from datasets import ClassLabel

    from skinclip.errors import UserError

    names = list(COLOURS)
    reordered = _colour_dataset(1, seed=1).cast_column("label", ClassLabel(names=names[::-1]))
    with pytest.raises(UserError, match=r"split 'validation' lists the classes .* in another order"):
        _train_on(tmp_path, monkeypatch, _colour_splits(validation=reordered))


def test_a_validation_class_absent_from_training_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from skinclip.errors import UserError

    without_bcc = _colour_dataset(2, seed=0).filter(lambda row: row["label"] != 2)
    with pytest.raises(UserError, match=r"split 'validation' holds class\(es\) \['BCC'\] that the training split"):
        _train_on(tmp_path, monkeypatch, _colour_splits(train_split=without_bcc))


def test_a_checkpoint_with_a_nonfinite_tensor_is_refused_at_load(tmp_path, make_config):
    config = make_config()
    model = SkinClipVLModel(config, device="cpu")
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors\): trained tensor classifier.1.weight holds NaN or inf"):
        SkinClipVLModel.from_pretrained(tmp_path, device="cpu")


@pytest.mark.parametrize(
    "text, message",
    [('{"temperature": 1.5', "not valid JSON"), ('{"temperature": "hot"}', "temperature must be a positive number")],
)
def test_a_checkpoints_calibration_file_is_checked_and_named(tmp_path, make_config, text, message):
    from skinclip import validation
    from skinclip.errors import UserError

    SkinClipVLModel(make_config(), device="cpu").save_pretrained(tmp_path)
    (tmp_path / "calibration.json").write_text(text)
    with pytest.raises(UserError, match=f"{tmp_path / 'calibration.json'}: {message}"):
        validation.load_checkpoint(tmp_path, device="cpu")


def test_continuing_from_a_corrupt_checkpoint_names_the_file(tmp_path, make_config, monkeypatch):
    from skinclip import training
    from skinclip.errors import UserError

    checkpoint = tmp_path / "checkpoint"
    SkinClipVLModel(make_config(class_names=tuple(COLOURS)), device="cpu").save_pretrained(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")
    _colour_splits().save_to_disk(str(tmp_path / "data"))
    with pytest.raises(UserError, match=r"checkpoint/model.safetensors:? (is )?not a readable safetensors file"):
        training.main(
            [
                "configs/demo.yaml",
                f"--dataset_path={tmp_path / 'data'}",
                "--demo_dataset=false",
                f"--output_dir={tmp_path / 'out'}",
                f"--model_name_or_path={checkpoint}",
            ]
        )
