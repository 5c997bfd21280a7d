"""Downloader against a local HTTP server on 127.0.0.1: resume, checksum failure, no overwrite of a good file."""

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datasets_scripts.download import ChecksumError, download_file, download_isic2019


def _archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(20):
            archive.writestr(f"ISIC_2019_Training_Input/ISIC_{index:07d}.jpg", bytes(range(256)) * 40)
    return buffer.getvalue()


@pytest.fixture()
def server():
    """Serves /archive.zip with Range support; ``state['cut']`` makes the next full response stop early."""
    payload = _archive()
    state = {"cut": None, "ranges": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if not self.path.endswith(".zip") and not self.path.endswith(".csv"):
                self.send_error(404)
                return
            start = 0
            header = self.headers.get("Range")
            if header:
                start = int(header.split("=")[1].split("-")[0])
                state["ranges"].append(start)
                if start >= len(payload):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            else:
                self.send_response(200)
            body = payload[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state["cut"] is not None:
                body, state["cut"] = body[: state["cut"]], None
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload, state
    httpd.shutdown()
    httpd.server_close()


def test_resume_after_interruption(server, tmp_path):
    url, payload, state = server
    digest = hashlib.sha256(payload).hexdigest()
    state["cut"] = 5000
    with pytest.raises(OSError, match="resume"):
        download_file(f"{url}/archive.zip", tmp_path / "archive.zip", sha256=digest, timeout=5)
    assert not (tmp_path / "archive.zip").exists()
    assert (tmp_path / "archive.zip.part").stat().st_size == 5000
    path = download_file(f"{url}/archive.zip", tmp_path / "archive.zip", sha256=digest, timeout=5)
    assert state["ranges"] == [5000]
    assert path.read_bytes() == payload and not (tmp_path / "archive.zip.part").exists()
    assert zipfile.ZipFile(path).namelist()[0].startswith("ISIC_2019_Training_Input/")


def test_checksum_failure_keeps_good_file(server, tmp_path):
    url, payload, _ = server
    good = tmp_path / "archive.zip"
    good.write_bytes(b"an older good copy")
    with pytest.raises(ChecksumError, match="does not match"):
        download_file(f"{url}/archive.zip", good, sha256="0" * 64, timeout=5)
    assert good.read_bytes() == b"an older good copy"
    assert not (tmp_path / "archive.zip.part").exists()


def test_existing_good_file_is_not_fetched_again(server, tmp_path):
    url, payload, state = server
    paths = download_isic2019(tmp_path, base_url=f"{url}/", files=("ISIC_2019_Training_Input.zip",))
    assert paths[0].read_bytes() == payload
    digest = hashlib.sha256(payload).hexdigest()
    state["cut"] = 0  # a request now would write nothing and fail
    assert download_file(f"{url}/ISIC_2019_Training_Input.zip", paths[0], sha256=digest).read_bytes() == payload
