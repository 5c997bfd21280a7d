"""predict.py on the real sample images with a tiny random model; bad image inputs, bad CSV rows, exit codes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip import prediction
from skinclip.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, run_entry_point
from tests.conftest import write_palette_png

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    code = prediction.main([*map(str, argv)])
    return code, capsys.readouterr().out


def test_predict_real_images_json(checkpoint, sample_data, tmp_path, capsys):
    images = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[:5]
    code, out = _run(
        capsys,
        "--model",
        checkpoint,
        *images,
        "--json",
        "--out",
        tmp_path,
        "--max-new-tokens",
        "4",
        "--age",
        "55",
        "--sex",
        "male",
        "--site",
        "posterior torso",
    )
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


def test_folder_batch_and_no_rationale_skips_generation(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generation must not run with --no-rationale")

    monkeypatch.setattr(SkinClipVLModel, "generate_rationale", fail)
    code, out = _run(
        capsys,
        "--model",
        checkpoint,
        sample_data / "images" / "isic2024",
        "--no-rationale",
        "--json",
        "--out",
        tmp_path,
        "--batch-size",
        "3",
    )
    results = json.loads(out)
    assert code == 0 and len(results) == 8
    assert all("rationale" not in r and "error" not in r for r in results)


def test_csv_input_with_missing_metadata(checkpoint, sample_data, tmp_path, capsys):
    image = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[0]
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
        loaded = prediction.load_image(_write(tmp_path / name, image))
        assert loaded.mode == "RGB" and loaded.size == (50, 30), name
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = prediction.load_image(_write(tmp_path / "exif.jpg", rgb, exif=exif.tobytes()))
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
    with pytest.raises(prediction.ImageInputError, match=f"{name}.*{message}"):
        prediction.load_image(path)


def _jpeg_bytes():
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_file_in_a_batch_is_reported_not_fatal(checkpoint, sample_data, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_text("oops")
    good = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    code = prediction.main(
        [str(a) for a in ("--model", checkpoint, good, bad, "--json", "--out", tmp_path / "o", "--no-rationale")]
    )
    captured = capsys.readouterr()
    good_result, bad_result = json.loads(captured.out)
    assert code == EXIT_PARTIAL
    assert good_result["image"] == str(good) and "error" not in good_result
    assert bad_result["error"].startswith(f"{bad}: not a readable image")
    assert "summary: 1 of 2 input(s) predicted, 1 failed" in captured.err


def test_grounding_words_write_maps(checkpoint, sample_data, tmp_path, capsys):
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(
        capsys,
        "--model",
        checkpoint,
        image,
        "--json",
        "--out",
        tmp_path,
        "--no-rationale",
        "--grounding-words",
        "blue-whitish veil,streaks",
    )
    (result,) = json.loads(out)
    assert set(result["grounding"]) == {"blue-whitish veil", "streaks"}
    _assert_maps_have_the_image_size(result, image)


def _assert_maps_have_the_image_size(result, image):
    for path in result["grounding"].values():
        with Image.open(path) as grounding, Image.open(image) as original:
            assert grounding.size == original.size


def test_heatmap_overlay_follows_attention():
    image = Image.new("RGB", (40, 40), (128, 128, 128))
    attention = np.zeros((4, 4))
    attention[0, 0] = 1.0
    overlay = np.asarray(prediction.heatmap_overlay(image, attention)).astype(int)
    # jet maps the peak to red and zero attention to blue: top-left is redder than bottom-right.
    assert overlay[2, 2, 0] > overlay[37, 37, 0] and overlay[2, 2, 2] < overlay[37, 37, 2]


def test_calibrated_checkpoint_prints_prediction_set(checkpoint, sample_data, tmp_path, capsys):
    # Beside the original: a checkpoint may name its bases by a path relative to its own folder.
    calibrated = checkpoint.parent / f"calibrated-{tmp_path.name}"
    shutil.copytree(checkpoint, calibrated)
    (calibrated / "calibration.json").write_text(
        json.dumps({"temperature": 2.0, "conformal": {"method": "aps", "coverage": 0.9, "qhat": 0.6}})
    )
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
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


def test_rationale_words_are_grounded(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    # A random decoder writes noise; fix the decoded rationale to check which words get maps.
    monkeypatch.setattr(
        SkinClipVLProcessor,
        "decode",
        lambda self, ids: ["Atypical pigment network and a blue-whitish veil; irregular streaks."] * len(ids),
    )
    assert prediction.rationale_words("Atypical pigment network and a blue-whitish veil; irregular streaks.") == [
        "atypical",
        "pigment",
        "network",
        "blue-whitish",
        "veil",
        "irregular",
    ]
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(
        capsys,
        "--model",
        checkpoint,
        image,
        "--json",
        "--out",
        tmp_path,
        "--max-new-tokens",
        "3",
        "--ground-rationale",
        "--grounding-words",
        "veil",
    )
    (result,) = json.loads(out)
    assert list(result["grounding"]) == ["veil", "atypical", "pigment", "network", "blue-whitish", "irregular"]
    _assert_maps_have_the_image_size(result, image)


def test_a_rationale_not_naming_the_top_class_is_flagged(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    from datasets_scripts.isic2019 import class_report

    names = ["MEL", "NV", "BCC", "SCC"]
    # A random decoder writes noise: image i's rationale is the real report of class i.
    monkeypatch.setattr(
        SkinClipVLProcessor, "decode", lambda self, ids: [class_report(names[i]) for i in range(len(ids))]
    )
    images = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[:4]
    argv = ("--model", checkpoint, *images, "--out", tmp_path, "--max-new-tokens", "2", "--batch-size", "4")
    code, out = _run(capsys, *argv, "--json")
    assert code == 0
    results = json.loads(out)
    for named, result in zip(names, results):
        top = result["top"][0][0]
        assert result["rationale_names"] == named and result["rationale_agrees"] == (named == top)
        note = f"Note: the rationale names {named} but the classifier's top class is {top}"
        assert result.get("note") == (None if named == top else note)
    notes = [result["note"] for result in results if "note" in result]
    assert notes  # the random head does not predict MEL, NV, BCC, SCC for these four images in order
    code, out = _run(capsys, *argv)
    assert [line.strip() for line in out.splitlines() if line.strip().startswith("Note:")] == notes


# ------------------------------------------------------------------------------ hostile inputs (issue 12)


PEAK_RSS_BOUND_KB = 2 * 1024 * 1024  # 2 GiB; the 13000² image alone would need ~3.4 GiB in the old float64 path


def test_huge_images_do_not_cost_the_batch_and_memory_is_bounded(checkpoint, sample_data, tmp_path):
    """A 48 KB PNG declaring 20000² px is one error; a 13000² one is predicted on a bounded copy; 5 real images
    keep their results; the whole process peaks below 2 GiB (measured with getrusage in a subprocess)."""
    folder = tmp_path / "batch"
    folder.mkdir()
    goods = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[:5]
    for good in goods:
        shutil.copy(good, folder / good.name)
    bomb = write_palette_png(folder / "bomb_20000.png", 20000)
    large = write_palette_png(folder / "large_13000.png", 13000)
    assert bomb.stat().st_size < 60_000
    wrapper = (
        "import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr,"
        " 'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    command = [
        sys.executable,
        "-c",
        wrapper,
        sys.executable,
        "predict.py",
        "--model",
        str(checkpoint),
        str(folder),
        "--json",
        "--no-rationale",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    run = json.loads(subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout)
    results = {Path(r["image"]).name: r for r in json.loads(run["out"])}
    print(f"peak RSS of predict.py: {run['peak_kb'] / 1024:.0f} MiB")
    assert run["rc"] == EXIT_PARTIAL, run["err"]
    assert sorted(results) == sorted([g.name for g in goods] + [bomb.name, large.name])
    assert results[bomb.name]["error"] == (
        f"{bomb}: image too large (Image size (400000000 pixels) exceeds limit of "
        "200000000 pixels, could be decompression bomb DOS attack.)"
    )
    assert [name for name, r in results.items() if "error" in r] == [bomb.name]
    with Image.open(results[large.name]["heatmap"]) as heatmap:
        assert heatmap.size == (2048, 2048)  # drawn on the bounded working copy
    assert "summary: 6 of 7 input(s) predicted, 1 failed" in run["err"]
    assert run["peak_kb"] < PEAK_RSS_BOUND_KB


def test_large_image_is_downscaled_once_and_header_checked(tmp_path):
    large = prediction.load_image(write_palette_png(tmp_path / "large.png", 13000))
    assert large.mode == "RGB" and large.size == (2048, 2048) and large.getpixel((7, 7)) == (200, 150, 120)
    with pytest.raises(prediction.ImageInputError, match=r"bomb\.png: image too large"):
        prediction.load_image(write_palette_png(tmp_path / "bomb.png", 20000))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (3000, 1000)).save(tmp_path / "wide.jpg", exif=exif.tobytes())
    assert prediction.load_image(tmp_path / "wide.jpg").size == (683, 2048)  # downscaled, then turned upright


def test_memory_error_on_one_input_is_that_inputs_error(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    images = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[:3]
    real_load = prediction.load_image

    def load(path, **kwargs):
        if Path(path) == images[1]:
            raise MemoryError
        return real_load(path, **kwargs)

    monkeypatch.setattr(prediction, "load_image", load)
    code, out = _run(capsys, "--model", checkpoint, *images, "--json", "--out", tmp_path, "--no-rationale")
    results = json.loads(out)
    assert code == EXIT_PARTIAL
    assert [r.get("error") for r in results] == [None, f"{images[1]}: out of memory while predicting this input", None]


def test_results_are_printed_as_they_are_produced(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    images = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[:3]
    real_predict = SkinClipVLModel.predict
    calls = []

    def predict_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies during the second batch
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(SkinClipVLModel, "predict", predict_then_die)
    code = run_entry_point(
        prediction.main,
        [
            "--model",
            str(checkpoint),
            *map(str, images),
            "--json",
            "--batch-size",
            "1",
            "--out",
            str(tmp_path),
            "--no-rationale",
        ],
    )
    captured = capsys.readouterr()
    assert code == 130 and "error: interrupted" in captured.err
    (first,) = json.loads(captured.out)  # the list is closed even so, holding the finished result
    assert first["image"] == str(images[0]) and "probabilities" in first


def test_nan_probabilities_are_errors_not_percentages(checkpoint, sample_data, tmp_path, capsys, monkeypatch):
    real_predict = SkinClipVLModel.predict

    def nan_predict(self, *args, **kwargs):
        prediction = real_predict(self, *args, **kwargs)
        prediction.probs = torch.full_like(prediction.probs, float("nan"))
        return prediction

    monkeypatch.setattr(SkinClipVLModel, "predict", nan_predict)
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    code, out = _run(capsys, "--model", checkpoint, image, "--out", tmp_path, "--no-rationale")
    assert code == EXIT_FATAL
    assert "nan" not in out.lower().replace("non-finite class probabilities (nan or inf)", "")
    assert out.strip() == (
        f"{image}: ERROR {image}: the checkpoint gave non-finite class probabilities (NaN or "
        "inf); its weights are likely broken"
    )
    assert not list(tmp_path.glob("*.png"))


def test_same_stems_get_their_own_outputs(checkpoint, sample_data, tmp_path, capsys):
    """Two inputs named x.jpg (different sizes) and one image listed twice in a CSV: each its own heatmap."""
    source = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    for folder, size in (("a", (250, 250)), ("b", (120, 90))):
        (tmp_path / folder).mkdir()
        Image.open(source).resize(size).save(tmp_path / folder / "x.jpg")
    table = tmp_path / "cases.csv"
    table.write_text("image\na/x.jpg\na/x.jpg\n")
    out = tmp_path / "out"
    code, printed = _run(
        capsys,
        "--model",
        checkpoint,
        tmp_path / "a" / "x.jpg",
        tmp_path / "b" / "x.jpg",
        table,
        "--json",
        "--out",
        out,
        "--no-rationale",
        "--grounding-words",
        "blue veil,blue-veil",
    )
    results = json.loads(printed)
    assert code == EXIT_OK
    heatmaps = [r["heatmap"] for r in results]
    assert heatmaps == [
        str(out / "x_focal_attention.png"),
        str(out / "x-2_focal_attention.png"),
        str(out / "a/x_focal_attention.png"),
        str(out / "a/x-2_focal_attention.png"),
    ]
    assert results[1]["grounding"] == {
        "blue veil": str(out / "x-2_word_blue_veil.png"),
        "blue-veil": str(out / "x-2_word_blue_veil-2.png"),
    }
    for result in results:
        with Image.open(result["heatmap"]) as heatmap, Image.open(result["image"]) as original:
            assert heatmap.size == original.size  # each JSON entry points at its own image's map


def test_folder_is_walked_and_skipped_files_are_reported(checkpoint, sample_data, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "sub" / "deeper").mkdir(parents=True)
    images = sorted((sample_data / "images" / "isic2024").glob("*.jpg"))
    shutil.copy(images[0], folder / images[0].name)
    shutil.copy(images[1], folder / "sub" / "deeper" / images[1].name)
    Image.open(images[2]).save(folder / "sub" / "anim.gif")
    (folder / "notes.txt").write_text("not an image")
    out = folder / "predictions"  # inside the input folder: never walked
    code = prediction.main([str(a) for a in ("--model", checkpoint, folder, "--json", "--out", out, "--no-rationale")])
    captured = capsys.readouterr()
    code_again = prediction.main(
        [str(a) for a in ("--model", checkpoint, folder, "--json", "--out", out, "--no-rationale")]
    )
    again = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == code_again == EXIT_OK
    assert [r["heatmap"] for r in results] == [
        str(out / images[0].with_suffix("").name) + "_focal_attention.png",
        str(out / "sub/deeper" / images[1].stem) + "_focal_attention.png",
    ]
    assert f"skipped: {folder / 'notes.txt'} (not a supported image type (.txt))" in captured.err
    assert f"skipped: {folder / 'sub' / 'anim.gif'} (not a supported image type (.gif))" in captured.err
    assert "2 file(s) skipped" in captured.err
    assert len(json.loads(again.out)) == 2 and "predictions" not in again.err
    with pytest.raises(prediction.UserError, match=r"output folder is also an input folder.*\(--out "):
        prediction.collect_cases([str(folder)], exclude=folder)


def test_bad_csv_rows_are_per_row(checkpoint, sample_data, tmp_path, capsys):
    """age=abc, age=inf, age=300 are left out with a warning naming the line; a non-UTF-8 row is that row's error."""
    image = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[0]
    table = tmp_path / "cases.csv"
    table.write_bytes(
        b"image,age,sex,site\n"
        + f"{image},abc,male,back\n{image},inf,female,\n{image},300,,\n".encode()
        + f"{image},55,male,".encode()
        + b"\xff\xfeback\n"
        + f"{image},40,female,{'x' * 500}\n".encode()
    )
    code = prediction.main(
        [str(a) for a in ("--model", checkpoint, table, "--json", "--out", tmp_path / "o", "--no-rationale")]
    )
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == EXIT_PARTIAL
    assert [r.get("error") for r in results] == [None, None, None, f"{table} line 5: not UTF-8 text", None]
    assert results[0]["warnings"] == [f"{table} line 2: age 'abc' is not a number; left out"]
    assert results[1]["warnings"] == [f"{table} line 3: age 'inf' is not a finite number; left out"]
    assert results[2]["warnings"] == [f"{table} line 4: age '300' is outside 0-120 years; left out"]
    assert results[0]["metadata_text"] == "A lesion on the back of a male patient."
    assert results[1]["metadata_text"] == "A lesion of a female patient."
    assert "is longer than 100 characters; cut" in results[4]["warnings"][0]
    assert len(results[4]["metadata_text"]) < 200
    assert f"warning: {table} line 2: age 'abc' is not a number; left out" in captured.err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(checkpoint, sample_data, tmp_path, capsys):
    image = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[0]
    assert run_entry_point(prediction.main, ["--model", str(tmp_path / "absent"), str(image)]) == EXIT_FATAL
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the checkpoint: ") and err.endswith(f"(--model {tmp_path / 'absent'})")
    assert "\n" not in err
    assert run_entry_point(prediction.main, ["--model", str(checkpoint), str(image), "--age", "inf"]) == EXIT_FATAL
    assert capsys.readouterr().err == "error: age 'inf' is not a finite number (--age)\n"
    with pytest.raises(prediction.UserError):
        run_entry_point(prediction.main, ["--model", str(checkpoint), str(image), "--age", "abc", "--debug"])


def test_every_input_failing_is_fatal(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    code, out = _run(capsys, "--model", checkpoint, bad, tmp_path / "absent.jpg", "--out", tmp_path / "o")
    assert code == EXIT_FATAL
    assert out.splitlines() == [
        f"{bad}: ERROR {bad}: not a readable image (not a JPEG, PNG, BMP, TIFF or WEBP file)",
        f"{tmp_path / 'absent.jpg'}: ERROR {tmp_path / 'absent.jpg'}: no such file",
    ]


def test_a_checkpoint_whose_logits_overflow_is_an_error_per_image(checkpoint, sample_data, tmp_path, capsys):
    """Finite weights whose products overflow float32: inf logits, NaN probabilities; never a traceback or a map."""
    import shutil

    from safetensors.torch import load_file, save_file

    overflowing = checkpoint.parent / f"overflowing-{tmp_path.name}"  # a sibling: the bases are named relatively
    shutil.copytree(checkpoint, overflowing)
    tensors = load_file(overflowing / "model.safetensors")
    [head] = [name for name in tensors if name.startswith("classifier.") and name.endswith("weight")]
    tensors[head] = tensors[head].sign() * 3e38
    save_file(tensors, overflowing / "model.safetensors")
    images = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[:2]
    out_dir = tmp_path / "maps"
    code, out = _run(capsys, "--model", overflowing, *images, "--out", out_dir, "--no-rationale")
    assert code == EXIT_FATAL
    assert out.strip().splitlines() == [
        f"{image}: ERROR {image}: the checkpoint gave non-finite class probabilities (NaN or inf); "
        "its weights are likely broken"
        for image in images
    ]
    assert not list(out_dir.rglob("*.png"))


def test_an_unreadable_csv_row_is_named_by_its_line_with_the_rows_lost(checkpoint, sample_data, tmp_path, capsys):
    """A quoted field spans lines; a field over csv's size limit stops the file there: named, rest counted."""
    image = sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[0]
    table = tmp_path / "cases.csv"
    huge = "x" * 200_000  # over csv.field_size_limit() (128 KiB)
    table.write_text(
        "image,age,site\n"
        f'{image},40,"back,\nleft side"\n'  # lines 2-3
        f'{image},50,"{huge}\nmore"\n'  # lines 4-5: unreadable
        f"{image},60,arm\n{image},70,leg\n"  # lines 6-7: lost with it
    )
    code = prediction.main(
        [str(a) for a in ("--model", checkpoint, table, "--json", "--out", tmp_path / "o", "--no-rationale")]
    )
    results = json.loads(capsys.readouterr().out)
    assert code == EXIT_PARTIAL
    assert [r.get("source") for r in results] == [f"{table} line 2", f"{table} line 4"]
    assert results[1]["error"] == (
        f"{table} line 4: unreadable CSV (field larger than field limit (131072)); "
        "not read: this row and the 2 after it"
    )
