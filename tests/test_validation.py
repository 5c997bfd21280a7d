"""skinclip.validation: config fields, split labels, output folders; skinclip.classification_metrics.to_strict_json."""

import contextlib
import json
import math

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features

from skinclip import classification_metrics as sm
from skinclip import validation
from skinclip.errors import UserError, run_entry_point

# --------------------------------------------------------------------------------------------------------
# Config fields
# --------------------------------------------------------------------------------------------------------


def _parse(*overrides):
    from skinclip import training

    return training.parse_arguments(["configs/demo.yaml", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--learning_rate=fast", "learning_rate must be a number, got 'fast'"),
        ('--lambda_cal="nan"', "lambda_cal must be a number, got 'nan'"),
        ("--lambda_cal=.nan", "lambda_cal must be a finite number"),
        ("--learning_rate=.inf", "learning_rate must be a finite number"),
        ("--lambda_cal=-5", "lambda_cal must be >= 0, got -5"),
        ("--lambda_align=-1", "lambda_align must be >= 0, got -1"),
        ("--lambda_gen=-0.5", "lambda_gen must be >= 0"),
        ("--focal_gamma=-1", "focal_gamma must be >= 0"),
        ("--learning_rate=0", "learning_rate must be > 0"),
        ("--num_train_epochs=0", r"num_train_epochs must be > 0 \(or set max_steps > 0\)"),
        ("--max_steps=0", "max_steps must be > 0, or -1"),
        ("--max_steps=2.5", "max_steps must be an integer"),
        ("--per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1"),
        ("--per_device_eval_batch_size=0", "per_device_eval_batch_size must be >= 1"),
        ("--gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
        ("--max_consecutive_nonfinite=0", "max_consecutive_nonfinite must be >= 1"),
        ("--lora_dropout=1.0", "lora_dropout must be < 1"),
        ("--lora_r=abc", "lora_r must be an integer"),
        ("--image_token_pooling=0", "image_token_pooling must be >= 1"),
        ("--image_token_pooling=1.5", "image_token_pooling must be an integer"),
        ("--augment=maybe", "augment must be true or false"),
        ("--train_fraction=0", "train_fraction must be > 0"),
        ("--train_fraction=1.5", "train_fraction must be <= 1"),
        ("--demo_num_per_class=2", "demo_num_per_class must be >= 5"),
        ("--quantization=nf3", "quantization='nf3' is not supported"),
        ("--rationale_conditioning=label", r"rationale_conditioning='label' is not supported; choose one of \['none'"),
        ("--focal_alpha=1,x", "focal_alpha must be"),
        ("--focal_alpha=1,-2", "focal_alpha must be"),
        ("--no_such_field=1", r"Some keys are not used.*no_such_field"),
        ("--eval_strategy=sometimes", "sometimes is not a valid IntervalStrategy"),
    ],
)
def test_bad_config_values_are_user_errors_naming_the_field(override, message):
    with pytest.raises(UserError, match=message):
        _parse(override)


def test_the_shipped_demo_config_and_an_explicit_step_count_pass():
    _parse()
    _, _, training_args = _parse("--num_train_epochs=0", "--max_steps=3")
    assert training_args.max_steps == 3
    _, data_args, _ = _parse("--overwrite_output_dir")  # a bare flag is true
    assert data_args.overwrite_output_dir is True


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(UserError, match="overwrite_output_dir and resume_from_checkpoint contradict"):
        _parse("--overwrite_output_dir=true", "--resume_from_checkpoint=true")


def test_cli_arguments_without_a_yaml_file_are_range_checked():
    from skinclip import training

    with pytest.raises(UserError, match="lambda_cal must be >= 0"):
        training.parse_arguments(["--output_dir=x", "--lambda_cal=-5"])
    with pytest.raises(UserError, match="lambda_cal must be a finite number"):
        training.parse_arguments(["--output_dir=x", "--lambda_cal=nan"])  # argparse's float() accepts 'nan'


def test_field_types_accept_ints_for_floats_and_none_for_optional_fields():
    from skinclip import training

    types = (training.ModelArguments, training.DataArguments)
    validation.check_field_types(
        {"lora_dropout": 0, "vision_pretrained": None, "lora_target_modules": ["q"]}, types, "cfg"
    )
    with pytest.raises(UserError, match="cfg: lora_dropout must be a number, got True"):
        validation.check_field_types({"lora_dropout": True}, types, "cfg")
    with pytest.raises(UserError, match="cfg: decoder_model must be a single value"):
        validation.check_field_types({"decoder_model": ["a", "b"]}, types, "cfg")


# --------------------------------------------------------------------------------------------------------
# Labels of the splits
# --------------------------------------------------------------------------------------------------------

NAMES = ["MEL", "NV", "BCC"]


def _split(labels, names=NAMES):
    return Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(names=names)}))


def _dataset(**splits):
    return DatasetDict({name: split for name, split in splits.items()})


def test_matching_splits_return_the_training_classes():
    dataset = _dataset(train=_split([0, 1, 2]), validation=_split([0, 2]), test=_split([1]))
    assert validation.check_split_labels(dataset, "train", ("validation", "test"), "data") == NAMES


def test_classes_in_another_order_are_an_error_naming_the_split():
    dataset = _dataset(train=_split([0, 1, 2]), validation=_split([0, 1], names=["NV", "MEL", "BCC"]))
    with pytest.raises(
        UserError,
        match=r"split 'validation' lists the classes .* in another order than the "
        r"training split 'train'",
    ):
        validation.check_split_labels(dataset, "train", ("validation",), "data")


def test_other_class_names_are_an_error_naming_the_split():
    dataset = _dataset(train=_split([0, 1, 2]), test=_split([0, 3], names=NAMES + ["SCC"]))
    with pytest.raises(UserError, match=r"data split 'test' has the classes \['MEL', 'NV', 'BCC', 'SCC'\]"):
        validation.check_split_labels(dataset, "train", (None, "test"), "data")


def test_a_class_absent_from_training_is_an_error():
    dataset = _dataset(train=_split([0, 0, 1]), validation=_split([0, 2]))
    with pytest.raises(UserError, match=r"split 'validation' holds class\(es\) \['BCC'\] that the training split"):
        validation.check_split_labels(dataset, "train", ("validation",), "data")


@pytest.mark.parametrize("empty", ["train", "test"])
def test_an_empty_split_is_an_error(empty):
    splits = {"train": _split([0, 1, 2]), "test": _split([0])}
    splits[empty] = _split([])
    with pytest.raises(UserError, match=f"data split '{empty}' is empty"):
        validation.check_split_labels(_dataset(**splits), "train", ("test",), "data")


def test_a_label_column_without_class_names_is_an_error():
    dataset = _dataset(train=Dataset.from_dict({"label": [0, 1]}))
    with pytest.raises(UserError, match="column 'label' must be a ClassLabel"):
        validation.check_split_labels(dataset, "train", (), "data")


def test_focal_alpha_weights_must_match_the_classes():
    validation.check_focal_alpha_count("1,2,3", 3)
    validation.check_focal_alpha_count("inverse_frequency", 3)
    with pytest.raises(UserError, match="focal_alpha gives 2 weights for 3 classes"):
        validation.check_focal_alpha_count("1,2", 3)


# --------------------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------------------


def _finished_run(folder, manifest=True):
    """A run's files; with ``manifest`` they are written under `OutputFolder`, which lists them as the run's."""
    from skinclip.output_folder import OutputFolder

    folder.mkdir(parents=True, exist_ok=True)
    with OutputFolder(folder, "test") if manifest else contextlib.nullcontext():
        (folder / "checkpoint-4").mkdir(parents=True)
        (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
        (folder / "lora").mkdir()
        (folder / "lora" / "adapter_config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text('{"model_type": "skinclip_vl"}')
        (folder / "README.md").write_text("# SkinCLIP-VL checkpoint\n")
        (folder / "test_metrics.json").write_text('{"balanced_accuracy": 0.5}')
        (folder / "test_predictions.csv").write_text("image_id,label,MEL\n")
    return folder


def test_a_missing_or_empty_output_dir_is_fine(tmp_path):
    assert validation.check_output_dir(tmp_path / "new", False, None) == []
    assert validation.check_output_dir(tmp_path, False, None) == []


@pytest.mark.parametrize("manifest", [True, False])
def test_a_finished_run_is_refused_without_overwrite(tmp_path, manifest):
    _finished_run(tmp_path, manifest)
    with pytest.raises(UserError, match=r"already holds a finished run; .*--overwrite_output_dir=true"):
        validation.check_output_dir(tmp_path, False, None)
    assert validation.check_output_dir(tmp_path, False, "true") == []  # resuming into it is fine


def test_unfinished_checkpoints_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(UserError, match="checkpoints of an unfinished run .*--resume_from_checkpoint=true"):
        validation.check_output_dir(tmp_path, False, None)
    (tmp_path / "checkpoint-3").rmdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files not written by SkinCLIP-VL \(notes.txt\)"):
        validation.check_output_dir(tmp_path, False, None)


def test_overwrite_returns_exactly_the_files_the_manifest_lists(tmp_path):
    _finished_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-old").mkdir()  # not checkpoint-<number>: not Trainer's
    (tmp_path / "runs" / "other_experiment").mkdir(parents=True)  # TensorBoard's folder, but not this run's
    (tmp_path / "runs" / "other_experiment" / "events").write_text("someone else's")
    assert validation.check_output_dir(tmp_path, True, None) == [
        "README.md",
        "checkpoint-4/trainer_state.json",
        "config.json",
        "lora/adapter_config.json",
        "model.safetensors",
        "test_metrics.json",
        "test_predictions.csv",
    ]


def test_overwrite_refuses_what_no_manifest_lists_where_the_run_writes(tmp_path):
    _finished_run(tmp_path, manifest=False)  # a folder named like a run's, not written by SkinCLIP-VL
    with pytest.raises(UserError, match=r"not listed in its manifest.*would overwrite or mix"):
        validation.check_output_dir(tmp_path, True, None)


def test_overwrite_refuses_a_listed_file_changed_since_the_run(tmp_path):
    _finished_run(tmp_path)
    (tmp_path / "README.md").write_text("# My notes on this experiment\n")  # the model card would replace it
    with pytest.raises(UserError, match=r"README.md.*would overwrite"):
        validation.check_output_dir(tmp_path, True, None)


def test_a_symlink_in_the_output_dir_is_refused_even_with_overwrite(tmp_path):
    _finished_run(tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "checkpoint-8").symlink_to(tmp_path / "elsewhere")
    for overwrite, resume in ((True, None), (False, "true"), (False, None)):
        with pytest.raises(UserError, match=r"symlinks that this command would write through.*checkpoint-8 ->"):
            validation.check_output_dir(tmp_path / "out", overwrite, resume)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        validation.check_output_dir(tmp_path / "out", False, None)


# --------------------------------------------------------------------------------------------------------
# Strict JSON and the entry-point contract
# --------------------------------------------------------------------------------------------------------


def _reject_constant(name):
    raise AssertionError(f"not strict JSON: {name}")


def test_strict_json_writes_null_for_undefined_values():
    import numpy as np

    text = sm.to_strict_json(
        {
            "auroc": float("nan"),
            "n": np.int64(3),
            "x": np.float32(0.5),
            "inf": math.inf,
            "per_class": {"MEL": [np.nan, 1.0]},
            "array": np.array([1.0, np.nan]),
        }
    )
    assert json.loads(text, parse_constant=_reject_constant) == {
        "auroc": None,
        "n": 3,
        "x": 0.5,
        "inf": None,
        "per_class": {"MEL": [None, 1.0]},
        "array": [1.0, None],
    }


def test_entry_point_exit_codes(capsys):
    def failing(argv):
        raise UserError("lambda_cal must be >= 0, got -5")

    assert run_entry_point(lambda argv: {"metrics": 1}, []) == 0  # main returning its metrics is a success
    assert run_entry_point(failing, []) == 1
    assert capsys.readouterr().err == "error: lambda_cal must be >= 0, got -5\n"
    with pytest.raises(UserError):
        run_entry_point(failing, ["--debug"])


# --------------------------------------------------------------------------------------------------------
# Files read back: validated like user input, the file named
# --------------------------------------------------------------------------------------------------------

GOOD_CALIBRATION = {"temperature": 1.5, "conformal": {"method": "aps", "coverage": 0.9, "qhat": 0.8}}


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"temperature": 1.5', "is not valid JSON: Expecting"),
        ('{"temperature": NaN}', "is not valid JSON: NaN is not a number"),
        ("[1.5]", "must hold a JSON object, got list"),
        ('{"temperature": "1.5"}', "temperature must be a finite number, got '1.5'"),
        ('{"temperature": 0}', "temperature must be > 0, got 0"),
        ('{"temperature": 1, "conformal": {"method": "top1", "coverage": 0.9, "qhat": 1}}', "conformal.method must"),
        ('{"temperature": 1, "conformal": {"method": "aps", "coverage": 1.2, "qhat": 1}}', "coverage must be < 1"),
        ('{"temperature": 1, "conformal": {"method": "aps", "coverage": 0.9}}', "conformal.qhat must be a finite"),
        ('{"temperature": 1, "conformal": {"method": "raps", "coverage": 0.9, "qhat": 1, "raps_k_reg": -1}}', "k_reg"),
    ],
)
def test_a_bad_calibration_file_is_a_user_error_naming_it(tmp_path, text, message):
    from skinclip.prediction import load_calibration

    (tmp_path / "calibration.json").write_text(text)
    with pytest.raises(UserError) as error:
        load_calibration(tmp_path)
    assert str(tmp_path / "calibration.json") in str(error.value) and message in str(error.value)


def test_a_good_calibration_file_reads_back_as_written(tmp_path):
    from skinclip.prediction import load_calibration

    (tmp_path / "calibration.json").write_text(json.dumps(GOOD_CALIBRATION))
    assert load_calibration(tmp_path) == GOOD_CALIBRATION
    (tmp_path / "calibration.json").write_bytes(b'{"temperature": 1.5, "note": "\xff"}')
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_calibration(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("- learning_rate: 1\n", "must be a mapping of field: value, got list"),
        ("1: 2\n", r"field names must be text, got \[1\]"),
        ("extends: [a.yaml, b.yaml]\n", r"extends must name one YAML file, got \['a.yaml', 'b.yaml'\]"),
        ("extends: missing.yaml\n", "extends .*missing.yaml, which does not exist"),
        ("a: [1\n", "is not valid YAML"),
    ],
)
def test_yaml_shapes_the_reader_does_not_expect_are_user_errors_naming_the_file(tmp_path, text, message):
    from skinclip.run_io import load_yaml_config

    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError, match=f"training config {tmp_path / 'run.yaml'}.*{message}"):
        load_yaml_config(tmp_path / "run.yaml")


def test_cli_numbers_are_range_checked_when_parsed():
    import argparse

    batch = validation.cli_number(int, 1)
    coverage = validation.cli_number(float, 0, 1, low_open=True, high_open=True)
    assert batch("8") == 8 and coverage("0.9") == 0.9
    for parse, text, message in [
        (batch, "0", "must be >= 1, got 0"),
        (batch, "2.5", "must be an integer, got '2.5'"),
        (coverage, "1", "must be < 1, got 1"),
        (coverage, "nan", "must be a finite number, got 'nan'"),
        (coverage, "0", "must be > 0, got 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("skinclip.prediction", ["--model", "m", "x.png", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        ("skinclip.prediction", ["--model", "m", "x.png", "--top-k", "0"], "argument --top-k: must be >= 1"),
        ("skinclip.evaluation", ["--model", "m", "--dataset", "d", "--out", "o", "--coverage", "1.5"], "< 1"),
        ("skinclip.evaluation", ["--model", "m", "--dataset", "d", "--out", "o", "--bootstrap", "-1"], ">= 0"),
        ("datasets_scripts.demo", ["--output-dir", "o", "--num-per-class", "2"], "--num-per-class: must be >= 5"),
        ("datasets_scripts.isic2019", ["--output-dir", "o", "--val-fraction", "1"], "--val-fraction: must be < 1"),
    ],
)
def test_every_entry_point_refuses_out_of_range_numbers_when_parsing(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_code:
        importlib.import_module(module).main(argv)
    assert exit_code.value.code == 2 and message in capsys.readouterr().err
