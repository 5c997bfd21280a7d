"""Bounded image loading for prediction and the demo.

A file's pixel count is read from its header and checked before anything is decoded, so a small file that
declares a huge image (a 48 KB 1-bit PNG of 20000x20000 px) is refused by name instead of exhausting memory.
An accepted image is decoded once (JPEG at a reduced scale, draft mode) and downscaled once to at most
``MAX_WORKING_SIDE`` pixels on its long side; everything after that (mode conversion, the model's processor,
heatmaps) works on that bounded copy, so peak memory does not grow with the input's pixels beyond one decode
of at most ``MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from skinclip.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 200_000_000  # larger files are refused by name rather than exhausting memory
MAX_WORKING_SIDE = 2048  # the long side of the copy the model and the heatmaps work on
# Only these decoders are tried, whatever a file's name says (fewer parsers exposed to untrusted files).
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")  # JPEG also opens multi-picture (MPO) files

# Pillow's bomb check reads a process-wide limit; it is swapped only while a header is parsed, under a lock,
# so that concurrent demo requests never see each other's value.
_PILLOW_LIMIT_LOCK = threading.Lock()

# EXIF orientation → the transpose that displays the image upright (as ImageOps.exif_transpose does).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageInputError(UserError):
    """An input image that cannot be used; the message names the file and the problem."""


def load_image(path, max_side: int = MAX_WORKING_SIDE, name: str | None = None) -> Image.Image:
    """Any common image as RGB, upright (EXIF), at most ``max_side`` px on its long side.

    Bad files raise `ImageInputError` whose message starts with ``name`` (default: the path).
    """
    path = Path(path)
    label = name or str(path)
    if not path.is_file():
        raise ImageInputError(f"{label}: no such file")
    _check_header(path, label)
    try:
        # No `with`: closing a Pillow image frees its pixels, and an image already small enough is returned as is.
        source = _open(path)
        orientation = _orientation(source)
        source.draft(source.mode, (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        source.load()
        image = _downscale(source, max_side)
    except MemoryError as error:
        raise ImageInputError(f"{label}: not enough memory to decode this image") from error
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError... on bad data
        raise ImageInputError(f"{label}: not a readable image ({_reason(error, path)})") from error
    if orientation in _ORIENTATION_TRANSPOSE:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return to_rgb(image)


def _open(path: Path) -> Image.Image:
    """`Image.open` (header only) with Pillow's bomb limit at the project's limit and its warning an error."""
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
        try:
            return Image.open(path, formats=PILLOW_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _check_header(path: Path, label: str) -> None:
    """Refuse unreadable, corrupt, too small or too large files from the header alone (no pixel decoded)."""
    try:
        with _open(path) as probe:
            width, height = probe.size
            probe.verify()  # PNG chunk CRCs and structure; reads no pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"{label}: image too large ({error})") from error
    except Exception as error:
        raise ImageInputError(f"{label}: not a readable image ({_reason(error, path)})") from error
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageInputError(
            f"{label}: image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), "
            f"above the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageInputError(f"{label}: image is {width}x{height} pixels, below {MIN_IMAGE_SIDE}")


def _reason(error: Exception, path: Path) -> str:
    """Pillow's complaint without the file's path (the demo must not show server paths; ``label`` names it)."""
    if isinstance(error, UnidentifiedImageError):
        return f"not a {', '.join(PILLOW_FORMATS[:-1])} or {PILLOW_FORMATS[-1]} file"
    return f"{type(error).__name__}: {str(error).replace(str(path), '<file>')}"


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, read before resizing drops the metadata; None when absent or unreadable."""
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a corrupt EXIF block must not cost the image: it is shown as stored
        return None


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    """One resize to fit ``max_side`` in the image's own mode (no full-size RGB copy is ever made)."""
    if max(image.size) <= max_side:
        return image
    if image.mode == "1":
        image = image.convert("L")  # same bytes per pixel, but can be averaged
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Palette indices cannot be averaged; everything else is filtered properly.
    resample = Image.Resampling.NEAREST if image.mode in ("P", "PA") else Image.Resampling.LANCZOS
    try:
        return image.resize(size, resample, reducing_gap=3.0)
    except ValueError:  # modes without reduce() (16-bit)
        return image.resize(size, resample)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: transparency over white, 16-bit and float images stretched to 8 bits."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        low, span = float(pixels.min()), float(pixels.max() - pixels.min())
        image = Image.fromarray(((pixels - low) / (span or 1.0) * 255).astype(np.uint8))
    return image.convert("RGB")
