"""predict.py on the real sample images with a tiny random model; bad image inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_config):
    config = make_config(class_names=("MEL", "NV", "BCC", "SCC"))
    model = SkinClipVLModel(config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    SkinClipVLProcessor.from_pretrained(None, config=config).save_pretrained(directory)
    return directory


def _run(capsys, *argv):
    code = predict.main([*map(str, argv)])
    return code, capsys.readouterr().out


def test_predict_real_images_json(checkpoint, shared_data, tmp_path, capsys):
    images = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[:5]
    code, out = _run(capsys, "--model", checkpoint, *images, "--json", "--out", tmp_path, "--max-new-tokens", "4",
                     "--age", "55", "--sex", "male", "--site", "posterior torso")
    assert code == 0
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result, path in zip(results, images):
        assert set(result["probabilities"]) == {"MEL", "NV", "BCC", "SCC"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["top"][0][1] == max(result["probabilities"].values())
        assert isinstance(result["rationale"], str)
        assert "male" in result["metadata_text"] and "55" in result["metadata_text"]
        with Image.open(result["heatmap"]) as heatmap, Image.open(path) as original:
            assert heatmap.size == original.size


def test_folder_batch_and_no_rationale_skips_generation(checkpoint, shared_data, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generation must not run with --no-rationale")

    monkeypatch.setattr(SkinClipVLModel, "generate_rationale", fail)
    code, out = _run(capsys, "--model", checkpoint, shared_data / "images" / "isic2024", "--no-rationale", "--json",
                     "--out", tmp_path, "--batch-size", "3")
    results = json.loads(out)
    assert code == 0 and len(results) == 8
    assert all("rationale" not in r and "error" not in r for r in results)


def test_csv_input_with_missing_metadata(checkpoint, shared_data, tmp_path, capsys):
    image = sorted((shared_data / "images" / "isic2020").glob("*.jpg"))[0]
    table = tmp_path / "cases.csv"
    table.write_text(f"image,age,sex,site\n{image},,female,\n{image},70,,lower extremity\n")
    code, out = _run(capsys, "--model", checkpoint, table, "--json", "--out", tmp_path / "out", "--no-rationale")
    first, second = json.loads(out)
    assert "female" in first["metadata_text"] and "aged" not in first["metadata_text"]
    assert "70" in second["metadata_text"] and "lower extremity" in second["metadata_text"]


def _write(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_image_modes_and_exif_rotation(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray((rng.integers(0, 65535, (30, 50))).astype(np.uint16)),
        "palette.png": rgb.convert("P"),
    }
    for name, image in cases.items():
        loaded = predict.load_image(_write(tmp_path / name, image))
        assert loaded.mode == "RGB" and loaded.size == (50, 30), name
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = predict.load_image(_write(tmp_path / "exif.jpg", rgb, exif=exif.tobytes()))
    assert rotated.size == (30, 50)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("notes.jpg", lambda p: p.write_text("not an image"), "not a readable image"),
        ("cut.jpg", lambda p: p.write_bytes(_jpeg_bytes()[:200]), "not a readable image"),
        ("tiny.png", lambda p: Image.new("RGB", (4, 4)).save(p), "below 8"),
        ("absent.jpg", lambda p: None, "no such file"),
    ],
)
def test_bad_images_are_named(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(predict.ImageInputError, match=f"{name}.*{message}"):
        predict.load_image(path)


def _jpeg_bytes():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_file_in_a_batch_is_reported_not_fatal(checkpoint, shared_data, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("oops")
    good = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(capsys, "--model", checkpoint, good, bad, "--json", "--out", tmp_path / "o", "--no-rationale")
    results = json.loads(out)
    assert code == 0
    assert "error" not in results[0] if results[0]["image"] == str(good) else True
    errors = [r for r in results if "error" in r]
    assert len(errors) == 1 and "broken.jpg" in errors[0]["error"]


def test_grounding_words_write_maps(checkpoint, shared_data, tmp_path, capsys):
    image = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(capsys, "--model", checkpoint, image, "--json", "--out", tmp_path, "--no-rationale",
                     "--grounding-words", "blue-whitish veil,streaks")
    (result,) = json.loads(out)
    assert set(result["grounding"]) == {"blue-whitish veil", "streaks"}
    for path in result["grounding"].values():
        with Image.open(path) as grounding, Image.open(image) as original:
            assert grounding.size == original.size


def test_heatmap_overlay_follows_attention():
    image = Image.new("RGB", (40, 40), (128, 128, 128))
    attention = np.zeros((4, 4))
    attention[0, 0] = 1.0
    overlay = np.asarray(predict.heatmap_overlay(image, attention)).astype(int)
    # jet maps the peak to red and zero attention to blue: top-left is redder than bottom-right.
    assert overlay[2, 2, 0] > overlay[37, 37, 0] and overlay[2, 2, 2] < overlay[37, 37, 2]


def test_calibrated_checkpoint_prints_prediction_set(checkpoint, shared_data, tmp_path, capsys):
    import shutil

    calibrated = tmp_path / "calibrated"
    shutil.copytree(checkpoint, calibrated)
    (calibrated / "calibration.json").write_text(json.dumps(
        {"temperature": 2.0, "conformal": {"method": "aps", "coverage": 0.9, "qhat": 0.6}}))
    image = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(capsys, "--model", calibrated, image, "--out", tmp_path / "o", "--no-rationale")
    assert code == 0 and "(90% coverage)" in out
    code, out = _run(capsys, "--model", calibrated, image, "--json", "--out", tmp_path / "o", "--no-rationale")
    (result,) = json.loads(out)
    top = [name for name, _ in result["top"]]
    members = result["prediction_set"].split(" (")[0].split(" or ")
    assert members == top[: len(members)]  # APS: the highest-probability classes until 0.6 of the mass
    # Temperature 2 flattens the distribution relative to the uncalibrated checkpoint.
    code, out = _run(capsys, "--model", checkpoint, image, "--json", "--out", tmp_path / "o", "--no-rationale")
    (plain,) = json.loads(out)
    assert max(result["probabilities"].values()) < max(plain["probabilities"].values())


def test_rationale_words_are_grounded(checkpoint, shared_data, tmp_path, capsys, monkeypatch):
    # A random decoder writes noise; fix the decoded rationale to check which words get maps.
    monkeypatch.setattr(SkinClipVLProcessor, "decode",
                        lambda self, ids: ["Atypical pigment network and a blue-whitish veil; irregular streaks."] * len(ids))
    assert predict.rationale_words("Atypical pigment network and a blue-whitish veil; irregular streaks.") == [
        "atypical", "pigment", "network", "blue-whitish", "veil", "irregular"]
    image = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(capsys, "--model", checkpoint, image, "--json", "--out", tmp_path, "--max-new-tokens", "3",
                     "--ground-rationale", "--grounding-words", "veil")
    (result,) = json.loads(out)
    assert list(result["grounding"]) == ["veil", "atypical", "pigment", "network", "blue-whitish", "irregular"]
    for path in result["grounding"].values():
        with Image.open(path) as grounding, Image.open(image) as original:
            assert grounding.size == original.size
