"""The local Gradio demo: bound to 127.0.0.1, no share link, answers a real client call, keeps no file."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def _decode_data_url(image_data: dict) -> Image.Image:
    assert image_data["path"] is None and image_data["url"].startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(image_data["url"].split(",", 1)[1])))


@pytest.fixture()
def running_app(make_config):
    """The app on a free loopback port with a tiny model; yields (app, client)."""
    from skinclip import demo_app

    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    calibration = {"conformal": {"method": "lac", "coverage": 0.9, "qhat": 0.95}}
    app = demo_app.build_app(model, processor, calibration, max_new_tokens=3)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        yield app, gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


@pytest.mark.slow  # a Gradio server
def test_demo_answers_on_loopback_and_keeps_no_file(running_app, sample_data, tmp_path):
    app, client = running_app
    folder = app.private_folder.path
    assert app.share_url is None and app.local_url.startswith("http://127.0.0.1:")
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
    original = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    upload = tmp_path / f"patient-{uuid.uuid4().hex}.jpg"  # a name to look for in every temp folder afterwards
    upload.write_bytes(original.read_bytes())
    system_gradio = Path(tempfile.gettempdir()) / "gradio"
    label, conformal_set, rationale, heatmap = client.predict(
        gradio_client.handle_file(str(upload)), 55, "male", "posterior torso", True, api_name="/diagnose"
    )
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {"MEL", "NV"} and sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    assert "90% coverage" in conformal_set and isinstance(rationale, str)
    with Image.open(original) as source:
        assert _decode_data_url(heatmap).size == source.size  # sent inline: no heatmap file anywhere
    assert _files_under(folder) == []  # the upload was deleted before the result came back
    assert not [p for p in _files_under(system_gradio) if p.name == upload.name]
    # Gradio's component stubs are not written into the checkout.
    assert not (REPO_ROOT / "demo_app.pyi").exists() and not (REPO_ROOT / "skinclip" / "demo_app.pyi").exists()
    types = {component["type"] for component in app.config["components"]}
    assert "image" in types and not {"uploadedimage", "inlineimage"} & types  # drawn by Gradio's image widget
    app.close()
    assert not folder.exists() and os.environ.get("GRADIO_TEMP_DIR") != str(folder)


@pytest.mark.slow  # a Gradio server
@pytest.mark.parametrize(
    "name, make, message",
    [
        (
            "notes.jpg",
            lambda p: p.write_text("not an image"),
            "the uploaded image: not a readable image (not a JPEG, PNG, BMP, TIFF or WEBP file)",
        ),
        (
            "bomb.png",
            None,
            "the uploaded image: image too large (Image size (400000000 pixels) exceeds limit of "
            "200000000 pixels, could be decompression bomb DOS attack.)",
        ),
    ],
)
def test_bad_upload_gets_a_named_error_without_server_paths(running_app, palette_png, tmp_path, name, make, message):
    app, client = running_app
    path = tmp_path / name
    make(path) if make else palette_png(path, 20000)
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        client.predict(gradio_client.handle_file(str(path)), None, "unknown", "", False, api_name="/diagnose")
    assert str(raised.value) == message
    assert str(app.private_folder.path) not in str(raised.value) and tempfile.gettempdir() not in str(raised.value)
    assert _files_under(app.private_folder.path) == []


@pytest.mark.slow  # a Gradio server
def test_bad_age_is_named(running_app, sample_data):
    _, client = running_app
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    with pytest.raises(gradio_client.exceptions.AppError, match=r"^Age 500(\.0)? is outside 0-120 years\.$"):
        client.predict(gradio_client.handle_file(str(image)), 500, "unknown", "", False, api_name="/diagnose")


def test_demo_main_binds_loopback_without_share_and_cleans_up(monkeypatch, tmp_path):
    from skinclip import demo_app, prediction

    launched = {}

    class FakeApp:
        def launch(self, **kwargs):
            launched.update(kwargs, temp_dir=os.environ["GRADIO_TEMP_DIR"])
            (Path(launched["temp_dir"]) / "upload.jpg").write_bytes(b"kept?")

    monkeypatch.setattr(demo_app, "build_app", lambda *a, **k: FakeApp())
    monkeypatch.setattr(prediction, "load_checkpoint", lambda *a, **k: (None, None))
    before = os.environ.get("GRADIO_TEMP_DIR")
    demo_app.main(["--model", str(tmp_path)])
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False
    assert Path(launched["temp_dir"]).name.startswith("skinclip-demo-") and not Path(launched["temp_dir"]).exists()
    assert os.environ.get("GRADIO_TEMP_DIR") == before


@pytest.mark.slow  # demo_app.py in a subprocess
def test_demo_process_leaves_nothing_after_a_request_and_sigterm(make_config, sample_data, tmp_path):
    """The real command in its own TMPDIR: after a request and a plain kill, no upload, heatmap or folder is left."""
    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    SkinClipVLProcessor.from_pretrained(None, config=config).save_pretrained(checkpoint)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    # What a SIGKILLed demo leaves: its folder, with an upload in it. The next demo deletes it.
    orphan = temp_root / f"skinclip-demo-{_dead_pid()}-x1y2z3"
    (orphan / "3f2a").mkdir(parents=True)
    (orphan / "3f2a" / "patient.jpg").write_bytes(b"jpeg bytes")
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(temp_root)}
    env.pop("GRADIO_TEMP_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "demo_app.py", "--model", str(checkpoint), "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_port(port, server)
        assert [p.name.startswith("skinclip-demo-") for p in temp_root.iterdir()] == [True]
        upload = tmp_path / f"patient-{uuid.uuid4().hex}.jpg"
        upload.write_bytes(sorted((sample_data / "images" / "isic2020").glob("*.jpg"))[0].read_bytes())
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict(
            gradio_client.handle_file(str(upload)), None, "unknown", "", False, api_name="/diagnose"
        )
        assert result[3]["url"].startswith("data:image/png")
        assert _files_under(temp_root) == []  # after the request
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output
    assert list(temp_root.iterdir()) == [], output  # after exit: the private folder itself is gone


def _dead_pid() -> int:
    """The id of a process that has exited (and, unless the system reused it within milliseconds, runs no more)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_new_demo_removes_only_the_folders_of_demos_that_are_gone(tmp_path):
    from skinclip.demo_app import PrivateFolder

    orphan = tmp_path / f"skinclip-demo-{_dead_pid()}-abc123"
    (orphan / "upload").mkdir(parents=True)
    (orphan / "upload" / "patient.jpg").write_bytes(b"jpeg bytes")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        try:
            alive = tmp_path / f"skinclip-demo-{running.pid}-def456"  # another demo, still serving
            older = tmp_path / "skinclip-demo-k2j4h5"  # a name without a process id: not ours to judge
            other = tmp_path / "skinclip-demo-notes"
            for folder in (alive, older, other):
                folder.mkdir()
            before = os.environ.get("GRADIO_TEMP_DIR")
            folder = PrivateFolder(root=tmp_path)
            try:
                assert folder.path.name.startswith(f"skinclip-demo-{os.getpid()}-")
                assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                    [alive.name, older.name, other.name, folder.path.name]
                )
            finally:
                folder.remove()
            assert os.environ.get("GRADIO_TEMP_DIR") == before and not folder.path.exists()
        finally:
            running.kill()


def _wait_for_port(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"demo exited early: {server.communicate()[0]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError("demo did not start listening")


def test_a_rationale_naming_another_class_gets_a_note(make_config, sample_data, tmp_path, monkeypatch):
    from datasets_scripts.isic2019 import class_report
    from skinclip import demo_app

    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    diagnose = demo_app._diagnose_function(gradio, model, processor, {}, 2, demo_app.PrivateFolder(tmp_path))
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    for named in ("MEL", "NV"):
        # A random decoder writes noise: the rationale is fixed to the real report of one class.
        report = class_report(named)
        monkeypatch.setattr(SkinClipVLProcessor, "decode", lambda self, ids, text=report: [text])
        upload = tmp_path / f"upload-{named}.jpg"
        upload.write_bytes(image.read_bytes())
        probabilities, _, rationale, _, _ = diagnose(str(upload), None, "unknown", "", True)
        top = max(probabilities, key=probabilities.get)
        note = f"Note: the rationale names {named} but the classifier's top class is {top}"
        assert rationale == (class_report(named) if named == top else f"{class_report(named)}\n\n{note}")


# --------------------------------------------------------------------------------------------------------
# No upload outlives its request (issue 22): plain HTTP against the launched app, as any local client can
# --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def upload_app(make_config):
    """Launches the app with a tiny model and a 1 MB upload limit; yields a factory of (app, API URL)."""
    from skinclip import demo_app

    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    launched = []

    def launch(unclaimed_upload_seconds: float = 600):
        app = demo_app.build_app(model, processor, max_new_tokens=3, unclaimed_upload_seconds=unclaimed_upload_seconds)
        launched.append(app)
        port = _free_port()
        app.launch(
            server_name="127.0.0.1",
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            quiet=True,
            max_file_size=1_000_000,
        )
        return app, f"http://127.0.0.1:{port}/gradio_api"

    try:
        yield launch
    finally:
        for app in launched:
            app.close()


def _upload(api: str, path: Path) -> str:
    """POST /upload as the browser does; the server path of the stored file."""
    import httpx

    with path.open("rb") as stream:
        response = httpx.post(f"{api}/upload", files={"files": (path.name, stream, "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    [server_path] = response.json()
    return server_path


def _fetchable(api: str, server_path: str) -> bool:
    import httpx

    return httpx.get(f"{api}/file={server_path}", timeout=60).status_code == 200


def _diagnosis(api: str, body: dict) -> tuple[str, object]:
    """POST /call/diagnose, then read its event stream to the end: its last event and that event's data (the
    outputs, or the error); ``("rejected <HTTP status>", None)`` where the POST itself is refused."""
    import httpx

    response = httpx.post(f"{api}/call/diagnose", json=body, timeout=60)
    if response.status_code != 200:
        return f"rejected {response.status_code}", None
    stream = httpx.get(f"{api}/call/diagnose/{response.json()['event_id']}", timeout=120).text
    events = [line for line in stream.splitlines() if line.startswith(("event:", "data:"))]
    return events[-2], json.loads(events[-1][len("data:") :])


def _call_diagnose(api: str, body: dict) -> str:
    """The HTTP status of a refused POST /call/diagnose, or the last event of its stream."""
    return _diagnosis(api, body)[0]


def _file_data(server_path: str) -> dict:
    return {"path": server_path, "meta": {"_type": "gradio.FileData"}}


# Each request names an uploaded file and is refused by Gradio before the handler runs.
REJECTED_BEFORE_THE_HANDLER = {
    "a file entry Gradio cannot read": lambda upload: {
        "data": [{**_file_data(upload), "size": "large"}, 40, "unknown", "", False]
    },
    "too few inputs": lambda upload: {"data": [_file_data(upload), 40]},
    "a choice not offered": lambda upload: {"data": [_file_data(upload), 40, "other", "", False]},
    "a body that is not a request": lambda upload: {"data": _file_data(upload), "fn_index": "first"},
}


@pytest.mark.slow  # a Gradio server
@pytest.mark.parametrize("case", sorted(REJECTED_BEFORE_THE_HANDLER))
def test_an_upload_is_gone_once_gradio_rejects_its_request(upload_app, sample_data, case):
    app, api = upload_app()
    image = sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0]
    upload = _upload(api, image)
    assert _fetchable(api, upload)  # the browser shows its preview from here until the request
    outcome = _call_diagnose(api, REJECTED_BEFORE_THE_HANDLER[case](upload))
    assert outcome.startswith("rejected") or outcome == "event: error", outcome
    assert not _fetchable(api, upload)  # another local client gets nothing
    assert _files_under(app.private_folder.path) == []


@pytest.mark.slow  # a Gradio server
def test_an_upload_no_request_names_is_deleted_after_its_time(upload_app, sample_data):
    app, api = upload_app(unclaimed_upload_seconds=2)
    upload = _upload(api, sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0])
    deadline = time.monotonic() + 20
    while _files_under(app.private_folder.path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _fetchable(api, upload) and _files_under(app.private_folder.path) == []


@pytest.mark.slow  # a Gradio server
def test_an_upload_over_the_limit_or_cut_off_leaves_nothing(upload_app, tmp_path):
    import httpx

    app, api = upload_app()
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (app.max_file_size + 1))
    with big.open("rb") as stream:
        response = httpx.post(f"{api}/upload", files={"files": ("big.jpg", stream, "image/jpeg")}, timeout=60)
    assert response.status_code == 413
    # A client that stops half-way through its upload: Gradio has already written the first part to disk.
    port = int(api.split(":")[2].split("/")[0])
    boundary = "skinclip-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="patient.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(
            b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 900000\r\n\r\n".encode()
            + head
            + b"\xff" * 200_000
        )
        deadline = time.monotonic() + 20  # until the server has the first part on disk
        while not _files_under(app.private_folder.path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _files_under(app.private_folder.path), "the server never stored the first part"
    deadline = time.monotonic() + 20
    while _files_under(app.private_folder.path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _files_under(app.private_folder.path) == []


@pytest.mark.slow  # a Gradio server
def test_diagnose_again_on_the_same_upload_with_other_metadata(upload_app, sample_data):
    """The page sends the same upload's path when "Diagnose" is clicked again (new metadata, no new upload): its
    session remembers the image, in memory, although the upload itself was deleted after the first request.
    Another session naming that path gets nothing of it."""
    app, api = upload_app()
    upload = _upload(api, sorted((sample_data / "images" / "isic2019").glob("*.jpg"))[0])
    page = "a1b2c3d4e5"
    first = _diagnosis(api, {"data": [_file_data(upload), None, "unknown", "", False], "session_hash": page})
    assert first[0] == "event: complete" and first[1][4] is None  # the state's image never leaves the server
    assert not _fetchable(api, upload) and _files_under(app.private_folder.path) == []
    again = _diagnosis(api, {"data": [_file_data(upload), 70, "male", "back", False], "session_hash": page})
    assert again[0] == "event: complete", again
    assert again[1][3]["url"] == first[1][3]["url"]  # the same image's heatmap
    other = _diagnosis(api, {"data": [_file_data(upload), 70, "male", "back", False], "session_hash": "f6g7h8i9j0"})
    assert other == ("event: error", {**other[1], "error": "the uploaded image: no such file"}), other
    assert _files_under(app.private_folder.path) == []
