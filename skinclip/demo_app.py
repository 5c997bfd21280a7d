"""Local web demo (Gradio, optional extra: ``pip install -e ".[demo]"``).

    python demo_app.py --model outputs/demo                 # http://127.0.0.1:7860, this machine only
    python demo_app.py --model outputs/demo --share         # a public gradio.live link: only if you mean it

The app binds to 127.0.0.1 and opens no public share link unless ``--share`` is given: a skin image and a
patient's metadata are health data. What is kept: nothing. Gradio's uploads go to a private temporary folder
the app owns (``GRADIO_TEMP_DIR``); each upload is read into memory and deleted before its result is returned,
the heatmap is sent back inline (a PNG data URL) and never written, and the folder is deleted when the app
closes or exits. A bad upload gets a message that names the problem, never a server path.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SEX_CHOICES = ["unknown", "female", "male"]
UPLOAD_NAME = "the uploaded image"  # how messages name the upload: never by its server path

logger = logging.getLogger("skinclip.demo")


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
        """Delete an uploaded file and its per-upload folder (``<hash>/``), if they are ours."""
        if not path or not self.holds(path):
            return
        path = Path(path)
        path.unlink(missing_ok=True)
        if path.parent != self.path and self.holds(path.parent):
            shutil.rmtree(path.parent, ignore_errors=True)

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
    model, processor, calibration: dict | None = None, max_new_tokens: int = 64, folder: PrivateFolder | None = None
):
    """A Gradio Blocks app whose `/diagnose` endpoint returns (probabilities, prediction set, rationale, heatmap).

    ``folder`` (default: a new `PrivateFolder`) receives Gradio's uploads; ``app.close()`` deletes it.
    """
    folder = folder or PrivateFolder()
    import gradio as gr

    UploadedImage, InlineImage = _components(gr)
    diagnose = _diagnose_function(gr, model, processor, calibration or {}, max_new_tokens, folder)
    class_names = model.config.class_names

    class PrivateBlocks(gr.Blocks):
        def close(self, *args, **kwargs):
            try:
                return super().close(*args, **kwargs)
            finally:
                folder.remove()

    with PrivateBlocks(title="SkinCLIP-VL", analytics_enabled=False) as app:
        gr.Markdown("# SkinCLIP-VL\nResearch demo, not a medical device. Uploaded images are not kept.")
        with gr.Row():
            with gr.Column():
                image = UploadedImage(type="filepath", label="Dermoscopic image", elem_id="upload")
                age = gr.Number(label="Age (years, optional)", value=None, elem_id="age")
                sex = gr.Dropdown(SEX_CHOICES, value="unknown", label="Sex", elem_id="sex")
                site = gr.Textbox(label="Anatomical site (optional)", placeholder="posterior torso", elem_id="site")
                with_rationale = gr.Checkbox(value=True, label="Generate a rationale")
                button = gr.Button("Diagnose", variant="primary", elem_id="diagnose")
            with gr.Column():
                probabilities = gr.Label(
                    num_top_classes=min(5, len(class_names)), label="Diagnosis", elem_id="diagnosis"
                )
                conformal_set = gr.Textbox(label="Prediction set", elem_id="prediction-set")
                rationale = gr.Textbox(label="Rationale", lines=4, elem_id="rationale")
                heatmap = InlineImage(label="Focal attention", elem_id="heatmap")
        button.click(
            diagnose,
            [image, age, sex, site, with_rationale],
            [probabilities, conformal_set, rationale, heatmap],
            api_name="diagnose",
        )
    app.private_folder = folder
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

    def diagnose(image_path, age, sex, site, with_rationale):
        try:
            if not image_path:
                raise gr.Error("Upload a dermoscopic image first.")
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
            return {name: float(p) for name, p in zip(class_names, probs)}, conformal, rationale, picture
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
