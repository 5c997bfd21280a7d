"""The linear probe (skinclip/baselines/linear_probe.py) on cached features, and run_calibration on written files."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinclip import classification_metrics as sm
from skinclip.baselines import linear_probe
from skinclip.errors import UserError
from skinclip.feature_cache import FEATURES_COLUMN, KEY_COLUMN
from skinclip.run_calibration import CALIBRATION_FILE, calibrate_run
from skinclip.run_io import write_predictions

# The key of the config's tower (train.py's default CLIP, layer -2): no weight is read when the rows carry it.
DEFAULT_KEY = "hf|openai/clip-vit-large-patch14|||layer-2"
CLASSES = ["MEL", "NV", "BKL"]
TOKENS, HIDDEN = 5, 4  # 1 CLS + 4 patch tokens


def _cached_split(rng, n_per_class: int, key: str):
    """Rows whose cached tokens separate the classes through both the CLS token and the patch mean."""
    from datasets import Array2D, ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    tokens = rng.normal(size=(len(labels), TOKENS, HIDDEN)).astype(np.float16)
    tokens[:, 0, 0] += 2.0 * labels  # CLS
    tokens[:, 1:, 1] -= 1.5 * labels[:, None]  # patches
    image = Image.new("RGB", (4, 4))
    features = Features(
        image=ImageFeature(),
        label=ClassLabel(names=CLASSES),
        metadata_text=Value("string"),
        report=Value("string"),
        group_id=Value("string"),
        **{FEATURES_COLUMN: Array2D(shape=(TOKENS, HIDDEN), dtype="float16"), KEY_COLUMN: Value("string")},
    )
    return Dataset.from_dict(
        {
            "image": [image] * len(labels),
            "label": labels.tolist(),
            "metadata_text": [""] * len(labels),
            "report": ["r"] * len(labels),
            "group_id": [f"g{i // 2}" for i in range(len(labels))],  # two images per lesion
            FEATURES_COLUMN: list(tokens),
            KEY_COLUMN: [key] * len(labels),
        },
        features=features,
    )


@pytest.fixture
def cached_dataset(tmp_path):
    from datasets import DatasetDict

    rng = np.random.default_rng(0)
    path = tmp_path / "data"
    DatasetDict(
        train=_cached_split(rng, 12, DEFAULT_KEY),
        validation=_cached_split(rng, 6, DEFAULT_KEY),
        test=_cached_split(rng, 6, DEFAULT_KEY),
    ).save_to_disk(str(path))
    return path


def _config(tmp_path, dataset, **extra) -> str:
    values = dict(
        dataset_path=str(dataset),
        output_dir=str(tmp_path / "probe"),
        seed=3,
        probe_c_grid=[0.01, 1.0],
        probe_cv_folds=3,
        # train.py's training fields in the shared config are read and ignored by the probe.
        learning_rate=1e-4,
        num_train_epochs=7,
        lambda_align=0.5,
        **extra,
    )
    path = tmp_path / "probe.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    return str(path)


def test_probe_features_are_cls_and_patch_mean():
    tokens = np.arange(2 * 4 * 3, dtype=np.float16).reshape(2, 4, 3)
    features = linear_probe.probe_features(tokens, num_prefix_tokens=2)
    np.testing.assert_array_equal(features[:, :3], tokens[:, 0])
    np.testing.assert_array_equal(features[:, 3:], tokens[:, 2:].astype(np.float32).mean(1))
    with pytest.raises(ValueError, match="expected"):
        linear_probe.probe_features(tokens[:, :2], num_prefix_tokens=2)


def test_probe_on_cached_features_equals_a_direct_scikit_learn_fit(tmp_path, cached_dataset):
    from datasets import load_from_disk
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    metrics = linear_probe.main([_config(tmp_path, cached_dataset)])
    out = tmp_path / "probe"
    data = load_from_disk(str(cached_dataset))

    def features(split):
        tokens = np.asarray(data[split][FEATURES_COLUMN], dtype=np.float32)
        return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=1)

    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)),
        {"logisticregression__C": [0.01, 1.0]},
        scoring="balanced_accuracy",
        cv=StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=3),
    ).fit(features("train"), data["train"]["label"], groups=data["train"]["group_id"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["chosen_c"] == search.best_params_["logisticregression__C"]
    assert info["trainable_parameters"] == 3 * (2 * HIDDEN) + 3
    for split in ("validation", "test"):
        expected = search.predict_proba(features(split))
        frame = pd.read_csv(out / f"{split}_predictions.csv")
        assert list(frame.columns) == ["image_id", "label", *CLASSES]
        np.testing.assert_allclose(frame[CLASSES].to_numpy(), expected, rtol=0, atol=1e-12)
        labels = np.asarray(data[split]["label"])
        written = json.loads((out / f"{split}_metrics.json").read_text())
        assert written == metrics[split]
        assert written["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, expected.argmax(1)))
        assert written["auroc_macro"] == pytest.approx(roc_auc_score(labels, expected, multi_class="ovr"))
    assert (out / "probe.safetensors").is_file()


def test_probe_refuses_features_of_another_tower_and_unknown_fields(tmp_path, cached_dataset):
    from datasets import load_from_disk

    data = load_from_disk(str(cached_dataset))
    data["test"] = data["test"].map(lambda row: {KEY_COLUMN: "hf|other-clip|||layer-2"})
    other = tmp_path / "other"
    data.save_to_disk(str(other))
    with pytest.raises(UserError, match="other-clip"):
        linear_probe.main([_config(tmp_path, other)])
    with pytest.raises(UserError, match="probe_c_grid"):
        linear_probe.main([_config(tmp_path, cached_dataset), "--probe_c_grid=[0]"])
    with pytest.raises(UserError, match="probe_cv_fold"):
        linear_probe.main([_config(tmp_path, cached_dataset, probe_cv_fold=3)])


def test_run_calibration_fits_the_temperature_of_the_logits_from_the_probabilities(tmp_path):
    rng = np.random.default_rng(1)
    labels = {split: rng.integers(0, 3, size=n) for split, n in (("validation", 60), ("test", 50))}
    # Over-confident logits: right class favoured, everything scaled up.
    logits = {split: 4.0 * (rng.normal(size=(len(y), 3)) + 1.2 * np.eye(3)[y]) for split, y in labels.items()}
    for split in labels:
        probs = sm.apply_temperature(logits[split], 1.0)
        write_predictions(tmp_path / f"{split}_predictions.csv", range(len(probs)), labels[split], probs, CLASSES)

    report = calibrate_run(tmp_path, n_bootstrap=50, seed=0)
    expected_t = sm.fit_temperature(logits["validation"], labels["validation"])
    assert report["temperature"] == pytest.approx(expected_t, rel=1e-4)
    assert report["temperature"] > 1.5  # it found the over-confidence
    calibrated = sm.apply_temperature(logits["test"], report["temperature"])
    assert report["calibrated"]["ece"] == pytest.approx(
        sm.expected_calibration_error(labels["test"], calibrated, n_bins=15), abs=1e-6
    )
    raw = sm.apply_temperature(logits["test"], 1.0)
    assert report["uncalibrated"]["ece"] == pytest.approx(sm.expected_calibration_error(labels["test"], raw), abs=1e-12)
    low, high = report["calibrated"]["ece_ci"]
    assert 0 <= low < high <= 1 and report["calibrated"]["ci"]["n_resamples"] == 50
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["temperature"] == report["temperature"]


def test_run_calibration_names_a_missing_prediction_file(tmp_path):
    with pytest.raises(UserError, match="validation_predictions.csv does not exist"):
        calibrate_run(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("image_id,label,A,B\n1,A,0.9,0.1\n2,B,,\n", r"1 row\(s\) hold a probability that is empty.*first on line 3\)"),
        ('image_id,label,A,B\n"1\n",A,0.9,0.1\n2,B,nan,0.5\n', r"1 row\(s\) .*first on line 4\)"),
        ("image_id,label,A,B\n1,A,0.9,0.1\n2,B,0.2,0.8,7\n", r"not a readable CSV \(line 3: 5 fields where"),
        ("id,A,B\n1,0.9,0.1\n", r"expected the columns image_id, label and 2\+ classes"),
    ],
)
def test_run_calibration_reads_predictions_back_like_user_input(tmp_path, text, message):
    """A predictions file cut short or edited by hand is named with its line, not a traceback or NaN metrics."""
    (tmp_path / "validation_predictions.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        calibrate_run(tmp_path)
