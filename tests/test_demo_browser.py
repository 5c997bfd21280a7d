"""The demo as a person meets it: `python demo_app.py` opened in headless Chromium, driven with selenium.

A real image and metadata are uploaded through the page's own widgets; the diagnosis, rationale and heatmap are read
back from the page and compared with the same checkpoint's prediction in this process. A bad upload shows its
message on the page. Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install selenium`` (.ci/run
installs them); where Chromium is absent or cannot start, the tests skip and say why.
"""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # a demo server and a browser (about a minute on 2 cores)

METADATA = {"age": 55, "sex": "male", "site": "posterior torso"}
CALIBRATION = {"temperature": 1.3, "conformal": {"method": "aps", "coverage": 0.9, "qhat": 0.97}}
TIMEOUT_S = 300  # one request, rationale included: seconds on an idle CPU, minutes on a busy shared one
START_TIMEOUT_S = 300  # loading the model and Gradio: ~25 s on an idle 2-core CPU, minutes on a busy one


def _browser():
    """A headless Chromium driven by chromedriver, or a skip that names what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.common.exceptions import WebDriverException

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.binary_location = chromium
    try:  # explicit binaries: selenium's driver manager never goes online
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    except WebDriverException as error:
        pytest.skip(f"Chromium cannot start here: {str(error).splitlines()[0]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the demo exited early:\n{server.communicate()[0][-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo did not listen on port {port} within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def demo_page(make_config, tmp_path_factory):
    """(driver, url, checkpoint): `python demo_app.py` on a calibrated checkpoint built from tiny bases."""
    root = tmp_path_factory.mktemp("browser-demo")
    driver = _browser()
    config = make_config(class_names=("MEL", "NV"))
    checkpoint = root / "checkpoint"
    SkinClipVLModel(config, device="cpu").save_pretrained(checkpoint, include_bases=True)
    SkinClipVLProcessor.from_pretrained(None, config=config).save_pretrained(checkpoint)
    (checkpoint / "calibration.json").write_text(json.dumps(CALIBRATION))
    port = _free_port()
    (root / "tmp").mkdir()
    server = subprocess.Popen(
        [sys.executable, "demo_app.py", "--model", str(checkpoint), "--port", str(port), "--device", "cpu"],
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(root / "tmp")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_port(port, server)
        yield driver, f"http://127.0.0.1:{port}/", checkpoint
    finally:
        driver.quit()
        server.terminate()
        server.communicate(timeout=60)


def _fill_and_submit(driver, url: str, image: Path, metadata: dict | None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, TIMEOUT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(image))
    if metadata:
        driver.find_element(By.CSS_SELECTOR, "#age input").send_keys(str(metadata["age"]))
        sex = driver.find_element(By.CSS_SELECTOR, "#sex input")
        sex.click()
        sex.send_keys(Keys.CONTROL, "a")
        sex.send_keys(metadata["sex"])
        WebDriverWait(driver, 10).until(
            lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == metadata["sex"]]
        )
        next(o for o in driver.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == metadata["sex"]).click()
        driver.find_element(By.CSS_SELECTOR, "#site textarea, #site input").send_keys(metadata["site"])
    # The upload finishes before the click is accepted: Gradio disables nothing, so wait for its preview.
    WebDriverWait(driver, TIMEOUT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload img"))
    driver.find_element(By.ID, "diagnose").click()


def _in_process_prediction(checkpoint: Path, image_path: Path):
    """What the same checkpoint says about the image here: (probabilities, rationale, heatmap image)."""
    from skinclip.inference import predict_batch
    from skinclip.prediction import Case, heatmap_overlay, load_image, metadata_sentence

    model = SkinClipVLModel.from_pretrained(checkpoint, device="cpu")
    processor = SkinClipVLProcessor.from_pretrained(checkpoint)
    image = load_image(image_path)
    sentence = metadata_sentence(Case(image_path, float(METADATA["age"]), METADATA["sex"], METADATA["site"]))
    prediction, _ = predict_batch(model, processor, [image], [sentence], max_new_tokens=64)
    probs = dict(zip(model.config.class_names, prediction.probs[0].tolist()))
    rationale = processor.decode(prediction.rationale_ids)[0]
    return probs, rationale, heatmap_overlay(image, prediction.attention_map[0].float().numpy())


def test_browser_upload_with_metadata_shows_diagnosis_rationale_and_heatmap(demo_page, sample_data):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, url, checkpoint = demo_page
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    _fill_and_submit(driver, url, image, METADATA)
    WebDriverWait(driver, TIMEOUT_S).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#heatmap img")
            and d.find_element(By.CSS_SELECTOR, "#rationale textarea").get_attribute("value")
        )
    )
    if os.environ.get("SKINCLIP_DEMO_SCREENSHOT"):  # the README's picture of the page: set to a PNG path
        driver.save_screenshot(os.environ["SKINCLIP_DEMO_SCREENSHOT"])
    probs, rationale, heatmap = _in_process_prediction(checkpoint, image)

    # The Label widget shows its label, the top class as a heading, then each class and its rounded percentage.
    block_label, heading, *rows = driver.find_element(By.ID, "diagnosis").text.split("\n")
    assert block_label == "Diagnosis" and heading == max(probs, key=probs.get)
    assert dict(zip(rows[0::2], rows[1::2])) == {name: f"{round(100 * p)}%" for name, p in probs.items()}
    assert (
        driver.find_element(By.CSS_SELECTOR, "#prediction-set textarea, #prediction-set input")
        .get_attribute("value")
        .endswith("(90% coverage)")
    )
    page_rationale = driver.find_element(By.CSS_SELECTOR, "#rationale textarea").get_attribute("value")
    # The same greedy rationale, as the page shows it, then the disagreement note where it names another class.
    shown, _, note = page_rationale.partition("Note:")
    assert shown.split() == rationale.split()
    assert not note or "the classifier's top class is" in note

    source = driver.find_element(By.CSS_SELECTOR, "#heatmap img").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    page_heatmap = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB")
    assert page_heatmap.size == heatmap.size
    difference = np.abs(np.asarray(page_heatmap, dtype=np.int16) - np.asarray(heatmap, dtype=np.int16))
    assert difference.mean() < 1.0  # the same overlay, up to rounding of the attention in another process

    # "Diagnose" again on the same upload without a rationale: the upload was deleted after the first request,
    # the page's session still has the image.
    driver.find_element(By.CSS_SELECTOR, "#with-rationale input[type=checkbox]").click()
    driver.find_element(By.ID, "diagnose").click()
    WebDriverWait(driver, TIMEOUT_S).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
            or d.find_element(By.CSS_SELECTOR, "#rationale textarea").get_attribute("value") == ""
        )
    )
    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
    assert driver.find_element(By.ID, "diagnosis").text.split("\n")[1] == max(probs, key=probs.get)


def test_browser_bad_upload_shows_its_message_on_the_page(demo_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, url, _ = demo_page
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    _fill_and_submit(driver, url, notes, None)
    message = "the uploaded image: not a readable image (not a JPEG, PNG, BMP, TIFF or WEBP file)"
    WebDriverWait(driver, TIMEOUT_S).until(
        lambda d: any(message in toast.text for toast in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"))
    )
    page = driver.find_element(By.TAG_NAME, "body").text
    assert str(tmp_path) not in page and "Traceback" not in page
