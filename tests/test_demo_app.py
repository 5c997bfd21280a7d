"""The local Gradio demo: bound to 127.0.0.1, no share link, answers a real client call."""

import socket

import pytest
from PIL import Image

from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_demo_answers_a_client_call_on_loopback(make_config, shared_data):
    import demo_app

    config = make_config(class_names=("MEL", "NV"))
    model = SkinClipVLModel(config, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    calibration = {"conformal": {"method": "lac", "coverage": 0.9, "qhat": 0.95}}
    app = demo_app.build_app(model, processor, calibration, max_new_tokens=3)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        assert app.share_url is None and app.local_url.startswith(f"http://127.0.0.1:{port}")
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        image = sorted((shared_data / "images" / "isic2019").glob("*.jpg"))[0]
        label, conformal_set, rationale, heatmap = client.predict(
            gradio_client.handle_file(str(image)), 55, "male", "posterior torso", True, api_name="/diagnose"
        )
    finally:
        app.close()
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {"MEL", "NV"} and sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    assert "90% coverage" in conformal_set
    assert isinstance(rationale, str)
    with Image.open(heatmap) as produced, Image.open(image) as original:
        assert produced.size == original.size


def test_demo_main_binds_loopback_without_share(monkeypatch, tmp_path):
    import demo_app

    launched = {}

    class FakeApp:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(demo_app, "build_app", lambda *a, **k: FakeApp())
    monkeypatch.setattr(SkinClipVLModel, "from_pretrained", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(SkinClipVLProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: None))
    demo_app.main(["--model", str(tmp_path)])
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False
