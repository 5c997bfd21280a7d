"""Resumable, sha256-checked download of the public ISIC 2019 archives.

A download goes to ``<file>.part``; an interrupted one resumes with an HTTP ``Range`` request (a server that
ignores it restarts from zero). Only a complete file whose sha256 matches is renamed onto ``<file>``, so a good
file is never replaced by a partial or corrupt one; a checksum failure deletes the ``.part`` and raises.

    python -m datasets_scripts.download --output-dir ISIC2019/ [--sha256 FILE=HEX ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from skinclip.errors import UserError, run_entry_point

ISIC_2019_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2019/"
ISIC_2019_FILES = (
    "ISIC_2019_Training_Input.zip",
    "ISIC_2019_Training_GroundTruth.csv",
    "ISIC_2019_Training_Metadata.csv",
)
CHUNK_BYTES = 1 << 20


class ChecksumError(UserError, RuntimeError):
    """The downloaded bytes do not have the expected sha256."""


def sha256_of(path, chunk_bytes: int = CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str, destination, sha256: str | None = None, timeout: float = 60.0, chunk_bytes: int = CHUNK_BYTES
) -> Path:
    """Download ``url`` to ``destination`` (resuming ``destination.part``); verify ``sha256`` when given.

    Returns the path. An existing ``destination`` with the right checksum is kept without any request.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_file() and (sha256 is None or sha256_of(destination) == sha256.lower()):
        return destination
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:  # 416: the .part already holds the whole file
            raise
        response = None
    if response is not None:
        with response:
            if offset and response.status != 206:
                offset = 0  # the server ignored Range: start again
            total = response.headers.get("Content-Length")
            total = int(total) + offset if total is not None else None
            with (
                open(partial, "ab" if offset else "wb") as handle,
                tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=destination.name, leave=False
                ) as progress,
            ):
                for chunk in iter(lambda: response.read(chunk_bytes), b""):
                    handle.write(chunk)
                    progress.update(len(chunk))
            if total is not None and partial.stat().st_size != total:
                raise OSError(
                    f"{url}: connection ended after {partial.stat().st_size} of {total} bytes; run again to resume"
                )
    if sha256 is not None:
        actual = sha256_of(partial)
        if actual != sha256.lower():
            partial.unlink()
            raise ChecksumError(
                f"{url}: sha256 {actual} does not match the expected {sha256.lower()}; {destination} left untouched"
            )
    os.replace(partial, destination)
    return destination


def download_isic2019(
    output_dir, checksums: dict[str, str] | None = None, base_url: str = ISIC_2019_BASE_URL, files=ISIC_2019_FILES
) -> list[Path]:
    """Fetch the ISIC 2019 training archives into ``output_dir`` (checksums by file name, when known)."""
    checksums = checksums or {}
    return [download_file(base_url + name, Path(output_dir) / name, checksums.get(name)) for name in files]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--base-url", default=ISIC_2019_BASE_URL)
    parser.add_argument(
        "--sha256", action="append", default=[], metavar="FILE=HEX", help="expected checksum of a file (repeatable)"
    )
    parser.add_argument("--extract", action="store_true", help="unzip ISIC_2019_Training_Input.zip afterwards")
    args = parser.parse_args(argv)
    bad = [item for item in args.sha256 if "=" not in item]
    if bad:
        raise UserError(f"expected FILE=HEX, got {bad[0]!r} (--sha256)")
    checksums = dict(item.split("=", 1) for item in args.sha256)
    try:
        paths = download_isic2019(args.output_dir, checksums, args.base_url)
    except (urllib.error.URLError, OSError) as error:  # network or disk: the user's to retry (it resumes)
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise UserError(f"download failed: {error}; run again to resume ({args.base_url})") from error
    if args.extract:
        import zipfile

        with zipfile.ZipFile(paths[0]) as archive:
            archive.extractall(args.output_dir)
    for path in paths:
        print(f"{path}  sha256={sha256_of(path)}")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
