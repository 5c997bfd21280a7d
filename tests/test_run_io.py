"""skinclip.run_io: one set of config rules for train.py and the baselines; split files."""

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from skinclip.errors import UserError
from skinclip.run_io import DataArguments, load_yaml_config, parse_config, read_yaml, write_split_outputs


@dataclass
class _Run:
    save_strategy: str = field(default="epoch")
    learning_rate: float = field(default=1e-4)
    augment: bool = field(default=True)
    labels: list[str] = field(default_factory=list)


def test_values_are_yaml_1_2():
    assert read_yaml("no") == "no" and read_yaml("off") == "off"  # YAML 1.1 would give False
    assert read_yaml("3e-3") == pytest.approx(0.003)  # YAML 1.1 would give the string "3e-3"
    assert read_yaml("true") is True and read_yaml("False") is False


def test_extends_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("save_strategy: steps\nlearning_rate: 3e-3\naugment: true\n")
    (tmp_path / "run.yaml").write_text("extends: base.yaml\naugment: false\n")
    assert load_yaml_config(tmp_path / "run.yaml") == {
        "save_strategy": "steps",
        "learning_rate": 0.003,
        "augment": False,
    }
    (run,) = parse_config([str(tmp_path / "run.yaml"), "--save_strategy=no", "--augment", "--labels=[a, b]"], (_Run,))
    assert (run.save_strategy, run.learning_rate, run.augment, run.labels) == ("no", 0.003, True, ["a", "b"])


def test_bad_values_are_user_errors_naming_the_field(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(UserError, match="learning_rate must be a number, got 'fast'"):
        parse_config([str(tmp_path / "run.yaml")], (_Run,))
    (tmp_path / "ok.yaml").write_text("augment: false\n")
    with pytest.raises(UserError, match="must look like --field=value"):
        parse_config([str(tmp_path / "ok.yaml"), "learning_rate=1"], (_Run,))
    with pytest.raises(UserError, match="ok.yaml"):
        parse_config([str(tmp_path / "ok.yaml"), "--no_such_field=1"], (_Run,))


def test_baselines_read_a_field_as_train_py_does():
    """`--save_strategy=no` was the string "no" through train.py but False through the baselines' own reader."""
    from skinclip import training
    from skinclip.baselines.timm_finetune import TimmArguments

    argv = ["--train_split=no", "--eval_split=off", "--learning_rate=3e-3"]
    timm_args, timm_data = parse_config(
        ["configs/baselines/resnet34_isic2019.yaml", *argv], (TimmArguments, DataArguments)
    )
    _, train_data, train_args = training.parse_arguments(["configs/demo.yaml", *argv])
    assert (timm_data.train_split, timm_data.eval_split) == ("no", "off")
    assert (train_data.train_split, train_data.eval_split) == ("no", "off")
    assert timm_args.learning_rate == train_args.learning_rate == 0.003


def test_split_outputs_are_train_py_files_with_strict_json(tmp_path):
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    write_split_outputs(
        tmp_path,
        "test",
        ["a", "b"],
        np.array([0, 1]),
        probs,
        ["MEL", "NV"],
        {"balanced_accuracy": 1.0, "auroc_macro": math.nan},
    )
    frame = pd.read_csv(tmp_path / "test_predictions.csv")
    assert list(frame.columns) == ["image_id", "label", "MEL", "NV"] and list(frame["label"]) == ["MEL", "NV"]
    assert json.loads((tmp_path / "test_metrics.json").read_text()) == {"balanced_accuracy": 1.0, "auroc_macro": None}
