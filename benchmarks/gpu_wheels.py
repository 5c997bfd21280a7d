"""The wheels the GPU machine's image lacks for benchmarks/gpu_check.py: fetch them here, install them there.

The image has Python 3.12, torch 2.11 + CUDA, transformers 5.17, peft, accelerate, timm, numpy, regex, tqdm,
huggingface-hub, safetensors, and no bitsandbytes, open_clip_torch or datasets. Nothing can be downloaded
there, so the wheels travel with the working tree as a git-ignored folder (``.whl/``), and everything that
travels (tracked files + carried folders) must stay within 64 MiB.

    python -m benchmarks.gpu_wheels fetch                 # here: pip download into .whl/, print the set and size
    python -m benchmarks.gpu_wheels install               # there: pip install --no-index into /tmp/site

``fetch`` downloads exactly ``WHEELS`` (manylinux x86-64 wheels for CPython 3.12, ``--no-deps``), then reads each
wheel's ``Requires-Dist`` and fails if a requirement is neither fetched nor on the image (``ON_THE_IMAGE``).
``datasets`` is not fetched: with pyarrow, pandas and its other needs it would not fit, and the check does not
import it. ``install`` prints the ``PYTHONPATH`` to export.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO_ROOT / ".whl"
TARGET = Path("/tmp/site")
TRAVEL_LIMIT_BYTES = 64 * 2**20  # the device carries at most this much (tracked files + carried folders)

# What gpu_check imports that the image lacks: bitsandbytes (NF4, paged 8-bit AdamW), open_clip_torch
# (trainer_cfa's ClipLoss, CLIP's BPE vocabulary for the tokenizer files) and open_clip's ftfy (+ wcwidth).
WHEELS = ("bitsandbytes==0.50.2", "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4")
# Requirements of those wheels that the image already has (KINDS.md's package list for nvidia-h200).
ON_THE_IMAGE = {
    "torch",
    "torchvision",
    "numpy",
    "packaging",
    "regex",
    "tqdm",
    "huggingface-hub",
    "safetensors",
    "timm",
    "typing-extensions",
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def fetch(wheel_dir: Path = WHEEL_DIR) -> dict:
    wheel_dir.mkdir(exist_ok=True)
    for stale in wheel_dir.glob("*.whl"):  # one version of each: two would stop the install
        if not any(stale.name.lower().startswith(_dist(spec)) for spec in WHEELS):
            stale.unlink()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3"]
    command += ["--abi", "none"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += ["--platform", "any", "-d", str(wheel_dir), *WHEELS]
    subprocess.run(command, check=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    fetched = {_normalise(w.name.split("-")[0]) for w in wheels}
    missing = []
    for wheel in wheels:
        for requirement in requirements(wheel):
            if requirement not in fetched and requirement not in ON_THE_IMAGE:
                missing.append(f"{wheel.name} needs {requirement}")
    sizes = {w.name: w.stat().st_size for w in wheels}
    tracked = tracked_bytes()
    report = {
        "wheels": sizes,
        "wheels_bytes": sum(sizes.values()),
        "tracked_bytes": tracked,
        "travel_bytes": sum(sizes.values()) + tracked,
        "limit_bytes": TRAVEL_LIMIT_BYTES,
        "unmet_requirements": missing,
    }
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(
        f"{report['wheels_bytes'] / 2**20:8.2f} MiB  wheels in {wheel_dir}; with the {tracked / 2**20:.2f} MiB of "
        f"tracked files {report['travel_bytes'] / 2**20:.2f} MiB travel, of {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB"
    )
    if missing:
        raise SystemExit("error: requirements neither fetched nor on the image: " + "; ".join(missing))
    if report["travel_bytes"] > TRAVEL_LIMIT_BYTES:
        raise SystemExit("error: the wheels and the working tree do not fit in what the device carries")
    return report


def requirements(wheel: Path) -> list[str]:
    """Distribution names of a wheel's unconditional ``Requires-Dist`` lines (extras left out)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    names = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(_normalise(re.split(r"[\s;<>=!~\[(]", line.removeprefix("Requires-Dist:").strip())[0]))
    return names


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    return sum((REPO_ROOT / f.decode()).stat().st_size for f in files if f and (REPO_ROOT / f.decode()).is_file())


def install(wheel_dir: Path = WHEEL_DIR, target: Path = TARGET) -> None:
    wheels = sorted(str(w) for w in wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {wheel_dir}; run `python -m benchmarks.gpu_wheels fetch` here first")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(target), *wheels]
    subprocess.run(command, check=True)
    print(f"installed {len(wheels)} wheels into {target}; export PYTHONPATH={target}")


def _dist(spec: str) -> str:
    return _normalise(spec.split("==")[0]).replace("-", "_")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("fetch", "install"))
    parser.add_argument("--target", type=Path, default=TARGET, help=f"install: where to (default {TARGET})")
    args = parser.parse_args(argv)
    fetch() if args.action == "fetch" else install(target=args.target)


if __name__ == "__main__":
    main()
