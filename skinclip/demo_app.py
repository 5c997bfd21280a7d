"""Local web demo (Gradio, optional extra: ``pip install -e ".[demo]"``).

    python demo_app.py --model outputs/demo                 # http://127.0.0.1:7860, this machine only
    python demo_app.py --model outputs/demo --share         # a public gradio.live link: only if you mean it

The app binds to 127.0.0.1 and opens no public share link unless ``--share`` is given: a skin image and a
patient's metadata are health data. What is kept on disk: nothing. Gradio's uploads go to a private temporary folder
the app owns (``GRADIO_TEMP_DIR``); each upload is read into memory and deleted before its result is returned
(the page's last image stays in its session's memory, so that "Diagnose" runs again with other metadata),
the heatmap is sent back inline (a PNG data URL) and never written, and the folder is deleted when the app
closes or exits. A bad upload gets a message that names the problem, never a server path.

No upload outlives its request, whatever the outcome (`UploadLedger`): a request Gradio refuses before the
handler runs (a payload it cannot read, a choice not offered, too few inputs) deletes the uploads it names as
it ends; the part of an upload refused or cut off mid-way is deleted as soon as no request is under way; an
upload no request ever names (a page closed after choosing an image) is deleted after
``UNCLAIMED_UPLOAD_SECONDS``. Uploads are limited to ``MAX_UPLOAD_BYTES``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SEX_CHOICES = ["unknown", "female", "male"]
UPLOAD_NAME = "the uploaded image"  # how messages name the upload: never by its server path

logger = logging.getLogger("skinclip.demo")


# The browser uploads an image when it is chosen and names it in the request sent by "Diagnose": an upload
# no request names within this time is taken to be abandoned (the page was closed) and deleted.
UNCLAIMED_UPLOAD_SECONDS = 600.0
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # far above a dermoscopic image; Gradio refuses larger uploads while reading
MAX_KEPT_REQUEST_BYTES = 4 * 1024 * 1024  # a request body read for the uploads it names (JSON: small)

FOLDER_PREFIX = "skinclip-demo-"  # then the owning process id and a random part: skinclip-demo-<pid>-<random>


class PrivateFolder:
    """A temporary folder the app owns and Gradio writes into (``GRADIO_TEMP_DIR``), deleted by `remove`.

    Gradio reads ``GRADIO_TEMP_DIR`` when its components and server are created, so this must exist first.
    A demo killed without a chance to clean up (SIGKILL, power loss) leaves its folder, possibly with an upload
    in it: each folder's name holds its process id, and a new demo first deletes the folders of processes that
    are gone (`remove_orphaned_folders`).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        remove_orphaned_folders(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=root))
        self._previous = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)

    def holds(self, path) -> bool:
        return Path(path).resolve().is_relative_to(self.path.resolve())

    def discard(self, path) -> None:
        """Delete an uploaded file and its per-upload folder (``<hash>/``) once empty, if they are ours."""
        if not path or not self.holds(path):
            return
        path = Path(path)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        if path.parent != self.path and self.holds(path.parent):
            with contextlib.suppress(OSError):  # not empty: another upload of the same bytes, still live
                path.parent.rmdir()

    def files(self) -> list[Path]:
        """Every file now in the folder (uploads, and parts of uploads Gradio is writing or gave up on)."""
        return [path for path in self.path.rglob("*") if not path.is_dir()] if self.path.is_dir() else []

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.path):
            if self._previous is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous


def remove_orphaned_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """Delete the demo folders under ``root`` (default: the temp dir) whose recorded process no longer runs.

    Kept: a folder whose name holds no process id (older demos), another user's folder, and one whose process
    runs (or whose id another process now uses). Not on Windows, where signal 0 is not a harmless probe.
    """
    removed = []
    if os.name == "nt":
        return removed
    for folder in Path(root or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        owner = folder.name[len(FOLDER_PREFIX) :].split("-")[0]
        try:
            if not owner.isdigit() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:  # gone meanwhile
            continue
        pid = int(owner)
        if pid != os.getpid() and not _process_exists(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        logger.info("removed %d folder(s) left by demos that did not exit cleanly", len(removed))
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class UploadLedger:
    """The live uploads of a `PrivateFolder`, each deleted when the first request naming it ends (issue 22).

    Gradio stores an upload (``POST /upload``) before any request names it, and serves every file of its upload
    folder to any client that asks for it by path (``/gradio_api/file=``) until the app exits. Here an upload
    is deleted when the request that names it ends, whatever the outcome: the event (`end_of_event`, also when
    Gradio's preprocessing refuses it before the handler) or the HTTP request itself when Gradio refuses it
    before it becomes an event (`UploadLifetime`). One that no request names is deleted after
    ``unclaimed_seconds``. Any other file in the folder (the part of an upload refused for its size, or cut off
    by its client) is deleted whenever no request is under way (`sweep`), as it may be one being written.
    """

    def __init__(self, folder: PrivateFolder, unclaimed_seconds: float = UNCLAIMED_UPLOAD_SECONDS) -> None:
        self.folder = folder
        self.unclaimed_seconds = unclaimed_seconds
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}  # server path of a live upload -> its deadline
        self._requests = 0  # under way: uploads being written, events being processed

    def uploaded(self, paths) -> None:
        """Record uploads Gradio has stored; each is deleted after ``unclaimed_seconds`` if nothing names it."""
        with self._lock:
            for path in map(str, paths):
                if self.folder.holds(path) and path not in self._timers:
                    timer = threading.Timer(self.unclaimed_seconds, self.release, args=([path],))
                    timer.daemon = True  # never keeps the process alive
                    self._timers[path] = timer
                    timer.start()

    def named_in(self, value) -> list[str]:
        """The live uploads whose server path appears in ``value`` (a request's payload, or its raw text)."""
        texts = list(_texts_in(value))
        with self._lock:
            return [path for path in self._timers if any(path in text for text in texts)]

    def release(self, paths) -> None:
        """Delete these uploads now (their request has ended) and forget them."""
        for path in paths:
            with self._lock:
                timer = self._timers.pop(str(path), None)
            if timer is not None:
                timer.cancel()
            self.folder.discard(path)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Marks a request under way; the last one to end sweeps the folder."""
        with self._lock:
            self._requests += 1
        try:
            yield
        finally:
            with self._lock:
                self._requests -= 1
            self.sweep()

    def end_of_event(self, inputs) -> None:
        self.release(self.named_in(inputs))

    def sweep(self) -> None:
        """With no request under way, delete every file of the folder that is not a live upload."""
        with self._lock:
            if self._requests:
                return
            live = {Path(path).resolve() for path in self._timers}
            for path in self.folder.files():
                if path.resolve() not in live:
                    self.folder.discard(path)

    def close(self) -> None:
        with self._lock:
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()


def _texts_in(value) -> Iterator[str]:
    """Every string in a decoded JSON payload; raw bytes (a body that is not JSON) as one text."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", errors="replace")
        try:
            value = json.loads(text)
        except ValueError:
            yield text.replace("\\/", "/")  # JSON may escape "/"
            return
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts_in(item)


class UploadLifetime:
    """ASGI middleware: records each stored upload, and deletes the uploads named by a request Gradio refuses.

    A request Gradio accepts as an event (``200``) leaves its uploads to the end of that event
    (`UploadLedger.end_of_event`); one it refuses (a body it cannot read, an unknown endpoint, a full queue, a
    validator) or that fails never becomes one, so its uploads are deleted when its response is sent.
    """

    def __init__(self, app, ledger: UploadLedger) -> None:
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"].rstrip("/").endswith("/upload")
        body, response, status = bytearray(), bytearray(), []

        async def receive_and_keep():
            message = await receive()
            if not is_upload and message["type"] == "http.request" and len(body) < MAX_KEPT_REQUEST_BYTES:
                body.extend(message.get("body", b""))
            return message

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif is_upload and message["type"] == "http.response.body" and status == [200]:
                response.extend(message.get("body", b""))
            await send(message)

        with self.ledger.request():
            try:
                await self.app(scope, receive_and_keep, send_and_note)
            finally:
                if is_upload and status == [200]:
                    self.ledger.uploaded(_stored_paths(response))
                elif not is_upload and status != [200]:
                    self.ledger.release(self.ledger.named_in(body))


def _stored_paths(response: bytes) -> list[str]:
    """The server paths in the answer of ``POST /upload`` (a JSON list)."""
    try:
        paths = json.loads(bytes(response))
    except ValueError:
        return []
    return [path for path in paths if isinstance(path, str)] if isinstance(paths, list) else []


def png_data_url(picture) -> str:
    """A PIL image as an inline ``data:image/png;base64,...`` URL: shown by the browser, never stored."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@contextlib.contextmanager
def _no_pyi_stubs():
    """Gradio writes a `.pyi` stub beside the source file of every Component subclass it sees defined (here:
    demo_app.pyi in the checkout, or in site-packages); its stub writer is switched off while ours are defined."""
    from gradio import component_meta

    original = getattr(component_meta, "create_or_modify_pyi", None)
    if original is not None:
        component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if original is not None:
            component_meta.create_or_modify_pyi = original


def _components(gr):
    """Image components that keep pixels off the disk (built here: gradio is imported lazily).

    ``is_template`` makes the browser draw them with Gradio's own image widget.
    """
    with _no_pyi_stubs():
        return _define_components(gr)


def _define_components(gr):
    from gradio.data_classes import ImageData

    class UploadedImage(gr.Image):
        """Hands the function the upload's path unopened: Gradio's own preprocessing would open (and for other
        modes decode) the file before the app's bounded loader could check its size."""

        is_template = True

        def preprocess(self, payload):
            if payload is None:
                return None
            if payload.path is None:
                raise gr.Error("Send the image as a file upload.")
            return payload.path

    class InlineImage(gr.Image):
        """An output image sent as a data URL instead of a file in Gradio's cache."""

        is_template = True

        def postprocess(self, value):
            if value is None:
                return None
            return ImageData(url=png_data_url(value), orig_name="focal_attention.png", mime_type="image/png")

    return UploadedImage, InlineImage


def build_app(
    model,
    processor,
    calibration: dict | None = None,
    max_new_tokens: int = 64,
    folder: PrivateFolder | None = None,
    unclaimed_upload_seconds: float = UNCLAIMED_UPLOAD_SECONDS,
):
    """A Gradio Blocks app whose `/diagnose` endpoint returns (probabilities, prediction set, rationale, heatmap).

    ``folder`` (default: a new `PrivateFolder`) receives Gradio's uploads; ``app.close()`` deletes it. An upload
    lives until the request naming it ends, or ``unclaimed_upload_seconds`` if none does (`UploadLedger`).
    """
    folder = folder or PrivateFolder()
    import gradio as gr
    from starlette.middleware import Middleware

    uploads = UploadLedger(folder, unclaimed_upload_seconds)

    UploadedImage, InlineImage = _components(gr)
    diagnose = _diagnose_function(gr, model, processor, calibration or {}, max_new_tokens, folder)
    class_names = model.config.class_names

    class PrivateBlocks(gr.Blocks):
        def launch(self, *args, app_kwargs: dict | None = None, max_file_size=MAX_UPLOAD_BYTES, **kwargs):
            app_kwargs = dict(app_kwargs or {})
            app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadLifetime, ledger=uploads)]
            return super().launch(*args, app_kwargs=app_kwargs, max_file_size=max_file_size, **kwargs)

        async def process_api(self, *args, **kwargs):
            # Every event passes here, refused by Gradio's preprocessing or not: its uploads end with it.
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            with uploads.request():
                try:
                    return await super().process_api(*args, **kwargs)
                finally:
                    uploads.end_of_event(inputs)

        def close(self, *args, **kwargs):
            try:
                return super().close(*args, **kwargs)
            finally:
                uploads.close()
                folder.remove()

    with PrivateBlocks(title="SkinCLIP-VL", analytics_enabled=False) as app:
        gr.Markdown("# SkinCLIP-VL\nResearch demo, not a medical device. Uploaded images are not kept.")
        with gr.Row():
            with gr.Column():
                image = UploadedImage(type="filepath", label="Dermoscopic image", elem_id="upload")
                age = gr.Number(label="Age (years, optional)", value=None, elem_id="age")
                sex = gr.Dropdown(SEX_CHOICES, value="unknown", label="Sex", elem_id="sex")
                site = gr.Textbox(label="Anatomical site (optional)", placeholder="posterior torso", elem_id="site")
                with_rationale = gr.Checkbox(value=True, label="Generate a rationale", elem_id="with-rationale")
                button = gr.Button("Diagnose", variant="primary", elem_id="diagnose")
            with gr.Column():
                probabilities = gr.Label(
                    num_top_classes=min(5, len(class_names)), label="Diagnosis", elem_id="diagnosis"
                )
                conformal_set = gr.Textbox(label="Prediction set", elem_id="prediction-set")
                rationale = gr.Textbox(label="Rationale", lines=4, elem_id="rationale")
                heatmap = InlineImage(label="Focal attention", elem_id="heatmap")
        # The page's last diagnosed image, in this session's memory only (never on disk, never served): "Diagnose"
        # again with other metadata finds its upload deleted when the first request ended. Gone when the page
        # closes or reloads, or after the unclaimed-upload time.
        last_image = gr.State(None, time_to_live=unclaimed_upload_seconds)
        button.click(
            diagnose,
            [image, age, sex, site, with_rationale, last_image],
            [probabilities, conformal_set, rationale, heatmap, last_image],
            api_name="diagnose",
        )
    app.private_folder = folder
    app.uploads = uploads
    return app


def _diagnose_function(gr, model, processor, calibration: dict, max_new_tokens: int, folder: PrivateFolder):
    """The request handler: every failure is a `gr.Error` naming the problem, never a path or a traceback."""
    import numpy as np

    from skinclip.agreement import RationaleReader
    from skinclip.errors import UserError
    from skinclip.inference import predict_batch
    from skinclip.prediction import (
        Case,
        heatmap_overlay,
        load_image,
        metadata_sentence,
        prediction_set,
    )

    class_names = model.config.class_names
    reader = RationaleReader.for_classes(class_names)  # None: no converter writes reports for these classes

    def diagnose(image_path, age, sex, site, with_rationale, last_image=None):
        """The four outputs, then the new ``last_image``: (server path, image) of this diagnosis.

        ``last_image`` (the page's `gr.State`) is the previous diagnosis's: when it names the same upload, its image
        serves, as the upload itself was deleted when that request ended.
        """
        try:
            if not image_path:
                raise gr.Error("Upload a dermoscopic image first.")
            if last_image is not None and last_image[0] == image_path:
                image = last_image[1]
            else:
                try:
                    image = load_image(Path(image_path), name=UPLOAD_NAME)
                finally:
                    folder.discard(image_path)  # in memory now: the upload itself is not kept
            case = Case(Path(UPLOAD_NAME), *_checked_metadata(gr, age, sex, site))
            prediction, _ = predict_batch(
                model, processor, [image], [metadata_sentence(case)], max_new_tokens if with_rationale else 0
            )
            probs = prediction.probs[0].float().cpu().numpy()
            if not np.all(np.isfinite(probs)):
                raise gr.Error("The model gave non-finite probabilities (NaN); the checkpoint is likely broken.")
            rationale = processor.decode(prediction.rationale_ids)[0] if prediction.rationale_ids is not None else ""
            if rationale and reader is not None:
                # Shown under the rationale when it does not name the classifier's top class.
                note = reader.disagreement_note(rationale, class_names[int(np.argmax(probs))])
                rationale = f"{rationale}\n\n{note}" if note else rationale
            picture = heatmap_overlay(image, prediction.attention_map[0].float().cpu().numpy())
            conformal = prediction_set(probs, calibration, class_names) or "(checkpoint not calibrated)"
            probabilities = {name: float(p) for name, p in zip(class_names, probs)}
            return probabilities, conformal, rationale, picture, (image_path, image)
        except gr.Error:
            raise
        except UserError as error:
            raise gr.Error(str(error)) from None
        except MemoryError:
            raise gr.Error("Not enough memory to analyse this image.") from None
        except Exception as error:  # the message may hold server paths: only its type is shown (and logged)
            logger.error("diagnose failed with %s", type(error).__name__)
            raise gr.Error(f"The image could not be analysed (internal error: {type(error).__name__}).") from None

    return diagnose


def _checked_metadata(gr, age, sex, site) -> tuple:
    """(age, sex, site) for the prompt; an unusable value is a `gr.Error` naming the field."""
    from metadata_skinclip import MAX_TEXT_CHARS, age_problem, clean_text

    if age in (0, None):  # Gradio's empty number box
        age = None
    problem = age_problem(age)
    if problem is not None:
        raise gr.Error(f"Age {age} {problem}.")
    if site is not None and len(str(site)) > MAX_TEXT_CHARS:
        raise gr.Error(f"The anatomical site is longer than {MAX_TEXT_CHARS} characters.")
    sex = None if sex in (None, "unknown") else sex
    return (None if age is None else float(age)), sex, clean_text(site)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from skinclip.prediction import load_calibration, load_checkpoint
    from skinclip.validation import cli_number

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=cli_number(int, 1, 65535), default=7860)
    parser.add_argument("--share", action="store_true", help="open a PUBLIC gradio.live link (off by default)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    model, processor = load_checkpoint(args.model, device=args.device)
    folder = PrivateFolder()  # before gradio is imported: its modules read GRADIO_TEMP_DIR at import
    atexit.register(folder.remove)  # also after Ctrl+C or an error
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app = build_app(
            model, processor, load_calibration(args.model) if Path(args.model).is_dir() else {}, folder=folder
        )
        app.launch(server_name="127.0.0.1", server_port=args.port, share=args.share)
    finally:
        folder.remove()
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum, frame):
    sys.exit(0)  # a plain `kill` then runs the finally blocks and atexit hooks that delete the folder
