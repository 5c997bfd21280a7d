"""metrics/skin_lesion_classification: `evaluate.load` by path, offline, equal to skinclip.classification_metrics
bit for bit."""

import json
import math
import os
import socket
import subprocess
import sys

import evaluate
import numpy as np
import pytest

from skinclip import classification_metrics as clf_metrics
from skinclip.metrics import METRIC_DIR, evaluate_compute_metrics, load_skin_lesion_metric
from tests.conftest import REPO_ROOT

KEYS = ("balanced_accuracy", "auroc_macro", "ece", "brier", "nll")


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[:2]}")


@pytest.fixture(scope="module")
def offline_evaluate(tmp_path_factory):
    """evaluate's module cache in tmp, its offline switches on, and every socket connection an error."""
    modules = tmp_path_factory.mktemp("hf-modules")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_EVALUATE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            patch.setenv(name, "1")
        patch.setenv("HF_MODULES_CACHE", str(modules))
        # evaluate reads these at import; the process may have imported it already.
        patch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        patch.setattr(evaluate.config, "HF_MODULES_CACHE", modules)
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        patch.setattr(socket, "getaddrinfo", _no_network)
        yield modules


def _reference(labels, probs):
    """classification_metrics on the same float64 probabilities: what the metric must return, exactly."""
    result = clf_metrics.classification_metrics(labels, probs, [str(k) for k in range(probs.shape[1])])
    return {key: result[key] for key in KEYS}


def _same(got: dict, want: dict):
    assert set(got) == set(want)
    for key in want:
        assert (math.isnan(got[key]) and math.isnan(want[key])) or got[key] == want[key], (key, got[key], want[key])


def _data(n=240, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 1.5  # informative, not perfect
    logits[:3] = 40.0 * np.eye(classes, dtype=np.float32)[labels[:3]]  # confidence 1.0: ECE's bin of its own
    return labels, logits


def test_probabilities_by_path_equal_classification_metrics(offline_evaluate):
    labels, logits = _data()
    probs = clf_metrics.apply_temperature(logits).astype(np.float32)  # a model's float32 softmax
    metric = evaluate.load(str(METRIC_DIR))  # default configuration: probabilities
    got = metric.compute(predictions=probs, references=labels)
    _same(got, _reference(labels, probs.astype(np.float64)))
    # Batches add up to the same thing (the Arrow round trip keeps float64 values exact).
    for start in range(0, len(labels), 100):
        metric.add_batch(predictions=probs[start : start + 100], references=labels[start : start + 100])
    _same(metric.compute(), _reference(labels, probs.astype(np.float64)))
    assert list(offline_evaluate.rglob("skin_lesion_classification.py"))  # the copy went to the tmp cache


def test_logits_configuration_is_the_float64_softmax_of_apply_temperature(offline_evaluate):
    labels, logits = _data(seed=1)
    got = evaluate.load(str(METRIC_DIR), "logits").compute(predictions=logits, references=labels)
    _same(got, _reference(labels, clf_metrics.apply_temperature(logits.astype(np.float64))))


def test_hand_computed_values(offline_evaluate):
    """Two classes, three rows: every number by hand."""
    probs, labels = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1])
    got = evaluate.load(str(METRIC_DIR)).compute(predictions=probs, references=labels)
    assert got["balanced_accuracy"] == 0.75  # class 0: 1/1, class 1: 1/2
    assert got["auroc_macro"] == 1.0  # column 1 scores both class-1 rows (0.8, 0.4) above the class-0 row (0.1)
    assert got["brier"] == pytest.approx((0.02 + 0.08 + 0.72) / 3)
    assert got["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)
    # bins [0.8667, 0.9333): 0.9 right; [0.8, 0.8667): 0.8 right; [0.6, 0.6667): 0.6 wrong -> (0.1 + 0.2 + 0.6) / 3
    assert got["ece"] == pytest.approx(0.3, abs=1e-6)


def test_inputs_that_are_not_what_the_configuration_says_are_refused(offline_evaluate):
    labels, logits = _data(n=16, classes=4)
    with pytest.raises(ValueError, match="not per-class probabilities.*'logits' configuration"):
        evaluate.load(str(METRIC_DIR)).compute(predictions=logits, references=labels)
    with pytest.raises(ValueError, match="configuration 'probs'"):
        evaluate.load(str(METRIC_DIR), "probs")


def test_trainer_compute_metrics_on_an_eval_prediction(offline_evaluate):
    from transformers import EvalPrediction

    labels, logits = _data(n=60, classes=3, seed=2)
    compute_metrics = evaluate_compute_metrics()  # logits, as Trainer hands them over
    want = _reference(labels, clf_metrics.apply_temperature(logits.astype(np.float64)))
    _same(compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)), want)
    # A model that returns more than its logits gives Trainer a tuple; the logits come first.
    extra = np.zeros((60, 5), dtype=np.float32)
    _same(compute_metrics(EvalPrediction(predictions=(logits, extra), label_ids=labels.reshape(-1, 1))), want)
    probabilities = load_skin_lesion_metric("probabilities")
    assert probabilities.config_name == "probabilities"


def test_cfa_trainer_evaluates_with_it(offline_evaluate, make_config, tmp_path):
    """CFATrainer.evaluate with this compute_metrics logs eval_<metric> for each of the five."""
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from tests.conftest import COLOURS, colour_dataset
    from trainer_cfa import CFATrainer, CFATrainingArguments, SkinClipVLCollator

    config = make_config(class_names=tuple(COLOURS))
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    args = CFATrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=6,
        report_to=[],
        use_cpu=True,
        augment=False,
        disable_tqdm=True,
    )
    trainer = CFATrainer(
        model=SkinClipVLModel(config, device="cpu"),
        args=args,
        data_collator=SkinClipVLCollator(processor),
        compute_metrics=evaluate_compute_metrics(),
        class_counts=[2, 2, 2],
    )
    metrics = trainer.evaluate(colour_dataset(2, seed=3))
    for key in KEYS:
        assert isinstance(metrics[f"eval_{key}"], float), key
    assert 0.0 <= metrics["eval_balanced_accuracy"] <= 1.0 and metrics["eval_nll"] > 0


def test_a_fresh_offline_process_loads_it_without_the_network(tmp_path):
    """A new interpreter (evaluate imported under the offline switches), sockets refused, HOME and HF_HOME in tmp:
    the metric loads by path, computes, and writes only under HF_HOME (its script copied to HF_MODULES_CACHE)."""
    home, hf_home = tmp_path / "home", tmp_path / "hf"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "HF_HOME": str(hf_home),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    script = (
        "import json, socket, sys\n"
        "def refuse(*a, **k): raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse; socket.getaddrinfo = refuse\n"
        "import evaluate\n"
        "metric = evaluate.load(sys.argv[1], 'logits')\n"
        "print(json.dumps(metric.compute(predictions=[[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]],"
        " references=[0, 2, 1])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(METRIC_DIR)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    labels = np.array([0, 2, 1])
    probs = clf_metrics.apply_temperature(np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]]))
    _same(json.loads(result.stdout.strip().splitlines()[-1]), _reference(labels, probs))
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(name.startswith("hf/") for name in written), written
    assert any(name.startswith("hf/modules/") and name.endswith("/skin_lesion_classification.py") for name in written)
