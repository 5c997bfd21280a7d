"""benchmarks/gpu_check.py: the first GPU run's command, run here at tiny size on the CPU through the same code.

No timing is asserted: the figures are the check's output. What is asserted is that every phase runs, is
timed and measured, that one failing phase leaves the others, and that the reload in a fresh process gives
the trained model's prediction back.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_skinclip as bench
from benchmarks import gpu_check
from tests.conftest import REPO_ROOT

# Loaded at interpreter start (PYTHONPATH): `import datasets` fails and find_spec says it is not installed.
HIDE_DATASETS = """
import importlib.util
import sys

_find_spec = importlib.util.find_spec
sys.modules["datasets"] = None


def find_spec(name, package=None):
    return None if name.split(".")[0] == "datasets" else _find_spec(name, package)


importlib.util.find_spec = find_spec
"""
PHASES = ["environment", "build", "train_speed", "train_lean", "inference", "save", "reload", "plain"]


@pytest.mark.slow  # the whole check at tiny size (~30 s on 2 cores) and its reload process
def test_tiny_gpu_check_runs_every_phase_on_the_cpu(tmp_path):
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--size", "tiny"]
    command += ["--device", "cpu"]
    # The GPU image has no `datasets` (too large to carry as wheels): the check must run without it.
    hide = tmp_path / "hide_datasets"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_DATASETS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(REPO_ROOT)])}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "gpu-check-tiny-cpu.json").read_text())
    log = (tmp_path / "gpu-check-tiny-cpu.log").read_text()
    assert "[gpu_check] all phases ok" in log and "reload: loaded in" in log  # the reload process's output too
    assert "halted; None in sys.modules" not in log  # nothing tried to import datasets

    assert list(results["phases"]) == PHASES
    for name, phase in results["phases"].items():
        assert phase["status"] == "ok", (name, phase)
        assert phase["seconds"] > 0 and phase["process_peak_rss_gib"] > 0
    assert results["size"] == "tiny" and results["device"] == "cpu" and results["all_phases_ok"]
    # bitsandbytes' 4-bit kernels pass on this CPU, so the decoder is NF4 as on the GPU.
    assert results["nf4_kernels"]["ok"] and results["quantization"] == "nf4"
    assert results["skinclip_parameters"]  # the build's parameter counts
    assert {entry["name"] for entry in results["training"]} == {
        "skinclip/speed",
        "skinclip/lean",
        "plain_qwen2_5_vl_qlora",
    }
    assert "plain_qwen2_5_vl/diagnosis_as_text" in {entry["name"] for entry in results["inference"]}
    for ratio in ("skinclip/speed samples/s over plain", "skinclip/classify images/s over plain diagnosis-as-text"):
        assert results["ratios"][ratio] > 0
    lean = next(entry for entry in results["training"] if entry["name"] == "skinclip/lean")
    assert results["lean_peak_gib"] == lean["peak_gib"] > 0
    # Beside each measured peak, the dry run's plan for the same settings (speed: no checkpointing).
    assert results["memory_vs_plan"]["skinclip/speed"]["plan_configured"] == "without_checkpointing"
    assert results["memory_vs_plan"]["skinclip/lean"]["plan_configured"] == "with_checkpointing"
    for comparison in results["memory_vs_plan"].values():
        assert comparison["plan_total_gib"] > 0 and comparison["measured_peak_gib"] > 0
    # The fresh process rebuilt the random bases from the same seed and loaded the trained tensors: the same
    # prediction (NF4 on the CPU moves probabilities by ~3e-4 between processes; unquantised it is exact).
    reload = results["reload"]
    assert reload["probs_max_abs_difference"] < 1e-3 and reload["same_top_class"]
    assert "model.safetensors" in results["saved"]["files"]


def test_a_failing_phase_leaves_the_others_and_skips_its_dependants(tmp_path):
    results = {}
    phases = gpu_check.Phases(results, torch.device("cpu"), tmp_path / "check.json", budget_s=60)

    def broken():
        raise RuntimeError("no kernel image for this GPU")

    assert phases.run("environment", lambda: 42) == 42
    assert phases.run("build", broken) is None
    phases.run("train_speed", lambda: 1, needs=("build",))
    phases.run("inference", lambda: 1, needs=("environment",))
    written = json.loads((tmp_path / "check.json").read_text())["phases"]
    assert written["environment"]["status"] == "ok" and written["inference"]["status"] == "ok"
    assert written["build"]["status"] == "failed"
    assert written["build"]["error"] == "RuntimeError: no kernel image for this GPU"
    assert written["train_speed"] == {"status": "skipped", "reason": "needs ['build']"}
    assert all("seconds" in written[name] for name in ("environment", "build", "inference"))


def test_a_phase_over_its_time_limit_is_stopped(tmp_path, monkeypatch):
    import time

    monkeypatch.setitem(gpu_check.PHASE_LIMITS_S, "build", 1)
    phases = gpu_check.Phases({}, torch.device("cpu"), tmp_path / "check.json", budget_s=60)
    start = time.monotonic()
    phases.run("build", lambda: time.sleep(30))
    assert time.monotonic() - start < 10
    assert phases.results["phases"]["build"]["status"] == "timed_out"


def test_without_nf4_kernels_the_check_builds_the_decoder_in_the_compute_dtype(tmp_path, monkeypatch):
    def missing(device, dtype):
        raise ModuleNotFoundError("No module named 'bitsandbytes'")

    monkeypatch.setattr(gpu_check, "nf4_kernels", missing)
    args = gpu_check.parse_args(["--out", str(tmp_path), "--size", "tiny", "--device", "cpu"])
    args.shape, args.requested_dtype, args.requested_quantization = gpu_check.check_shape("tiny"), None, "auto"
    results = {"settings": {}}
    gpu_check.environment_phase(args, torch.device("cpu"), results)
    assert args.quantization == results["quantization"] == "none"
    assert "bitsandbytes" in results["quantization_reason"] and "float32 instead" in results["quantization_reason"]


def test_paper_check_shape_is_the_real_bases_and_the_benchmarks_paper_shape():
    shape, paper = gpu_check.check_shape("paper"), bench.SHAPES["paper"]
    assert shape.decoder_text == paper.decoder_text  # 3584 wide, 28 layers, 152,064 tokens: the real config
    assert shape.clip_vision == paper.clip_vision and shape.clip_projection == paper.clip_projection
    assert (shape.batch, shape.dtype, shape.quantization) == (8, "bfloat16", "nf4")
    assert shape.warmup + shape.steps < paper.warmup + paper.steps  # fewer steps, to fit the 8 minutes


def test_wheel_requirements_are_read_from_the_wheels_metadata(tmp_path):
    import zipfile

    from benchmarks import gpu_wheels

    wheel = tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: open_clip_torch",
            "Requires-Dist: torch>=2.0",
            "Requires-Dist: huggingface_hub",
            "Requires-Dist: ftfy",
            "Requires-Dist: typing_extensions ; python_version < '3.9'",
            "Requires-Dist: pytest ; extra == 'test'",
        ]
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("open_clip_torch-3.3.0.dist-info/METADATA", metadata)
    assert gpu_wheels.requirements(wheel) == ["torch", "huggingface-hub", "ftfy", "typing-extensions"]
    # Every requirement of the fetched set is fetched too or on the GPU image (checked for real by `fetch`).
    fetched = {gpu_wheels._normalise(spec.split("==")[0]) for spec in gpu_wheels.WHEELS}
    assert {"bitsandbytes", "open-clip-torch", "ftfy", "wcwidth"} == fetched
    assert "datasets" not in fetched  # too large with its own needs; the check does not import it
