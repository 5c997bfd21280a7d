"""The first GPU run in one command: environment, NF4 build, training, save/reload, inference, memory vs plan.

    python -m benchmarks.gpu_check --out DIR                              # one GPU: paper shapes, 8-min budget
    python -m benchmarks.gpu_check --out DIR --size tiny --device cpu     # CI (tests/test_gpu_check.py), seconds

At ``--size paper`` the bases are the paper's, with random weights: the real ``config.json`` of
openai/clip-vit-large-patch14 and of Qwen/Qwen2.5-VL-7B-Instruct, the real Qwen tokenizer and the CLIP BPE
tokenizer (``skinclip/base_files/``, ``skinclip/tiny_bases.py``), each beside an empty ``model.safetensors`` so
that ``from_pretrained`` initialises every weight on the device (nothing is downloaded; no 15 GB is written).
``--size tiny`` shrinks only the sizes of the same files (``tiny_bases``) and runs every phase the same way.

Phases, each timed, memory-measured and guarded (an exception or a phase's time limit ends that phase only,
the JSON is rewritten after each, and a phase whose inputs failed is recorded as skipped):

1. ``environment``: GPU, CUDA, bf16, versions, the peak matmul rate, and whether bitsandbytes' NF4 kernels
   quantise, dequantise and multiply on the device. Without them the decoder is built in the compute dtype
   (``quantization: none``) and ``lean`` keeps torch AdamW; the JSON says so (``quantization_reason``).
2. ``build``: CLIP ViT-L/14 + the Qwen2.5-VL-7B language stack in NF4, LoRA r64 on q,v (the paper's recipe).
3. ``train_speed``, ``train_lean``: real ``CFATrainer`` steps of the benchmark's ``speed`` and ``lean``
   variants, each beside the ``train.py --dry_run`` memory plan for the same settings (``memory_vs_plan``).
4. ``inference``: classification only (tower, cached features, pooled) and classification + rationale.
5. ``save``: ``save_pretrained`` of the trained model and its processor; a reference prediction (probabilities
   and a greedy rationale) of a real ISIC image from ``tests/data``.
6. ``reload``: a fresh Python process rebuilds the model with ``SkinClipVLModel.from_pretrained`` (the random
   bases re-initialised from the same seed, the trained tensors from the checkpoint) and predicts the same
   image with a rationale; its probabilities and rationale are compared with the reference.
7. ``plain``: the plain Qwen2.5-VL QLoRA recipe (own ViT, image tokens in the sequence) trained and answering
   the diagnosis as text, for the ratios (``bench_skinclip.bench_plain``).

The JSON has the benchmark's format (``bench_skinclip.run``: ``size``, ``environment``, ``training``,
``inference``, ``ratios``, ``goals``) plus ``phases``, ``memory_vs_plan``, ``lean_peak_gib`` and the
quantisation chosen; ``gpu-check.log`` beside it holds everything printed, the reload process's output too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import bench_skinclip as bench

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_IMAGE = REPO_ROOT / "tests/data/images/isic2019/ISIC_0000153.jpg"  # a real ISIC 2019 image
REFERENCE_METADATA = "A lesion on the posterior torso of a male patient aged about 55."
SEED = 0

# Time limits of the phases (seconds) at the paper's size; the whole run is also held to --budget-s.
PHASE_LIMITS_S = {
    "environment": 60,
    "build": 150,
    "train_speed": 120,
    "train_lean": 120,
    "inference": 90,
    "save": 60,
    "reload": 180,
    "plain": 180,
}
# The paper's shapes with fewer steps than the benchmark's 3 + 10, to fit the first run into 8 minutes.
CHECK_STEPS = {"paper": dict(warmup=2, steps=5, inference_iters=3), "tiny": dict(warmup=1, steps=2, inference_iters=1)}


class PhaseTimeout(Exception):
    pass


# --------------------------------------------------------------------------------------------------------
# Bases: the real config and tokenizer files, random weights
# --------------------------------------------------------------------------------------------------------


def base_configs(size: str) -> tuple[dict, dict]:
    """(CLIP config, Qwen2.5-VL config) as JSON dicts: the real files, sizes shrunk for ``tiny``."""
    from skinclip import tiny_bases

    if size == "tiny":
        return tiny_bases.tiny_clip_config(), tiny_bases.tiny_qwen2_5_vl_config()
    return (
        json.loads((tiny_bases.CLIP_L_FILES / "config.json").read_text()),
        json.loads((tiny_bases.QWEN_VL_FILES / "config.json").read_text()),
    )


def write_bases(size: str, root: Path) -> dict[str, str]:
    """Base folders with the real config and tokenizer files and an empty weight file (random init on load)."""
    from safetensors.torch import save_file

    from skinclip import tiny_bases

    clip_config, decoder_config = base_configs(size)
    clip, decoder = root / "clip", root / "decoder-qwen2_5_vl"
    for folder, config in ((clip, clip_config), (decoder, decoder_config)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    preprocessor = json.loads((tiny_bases.CLIP_L_FILES / "preprocessor_config.json").read_text())
    side = clip_config["vision_config"]["image_size"]
    preprocessor.update(crop_size=side, size=side)
    (clip / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    tiny_bases.save_clip_tokenizer(clip)
    for name in tiny_bases.QWEN_VL_COPIED_FILES:
        shutil.copyfile(tiny_bases.QWEN_VL_FILES / name, decoder / name)
    return {"clip": str(clip), "decoder": str(decoder)}


def check_shape(size: str) -> bench.Shape:
    """The benchmark's shape of this size with the sizes the base files actually have."""
    clip_config, decoder_config = base_configs(size)
    vision = clip_config["vision_config"]
    text = {
        key: decoder_config[key]
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    shape = bench.SHAPES[size]
    return dataclasses.replace(
        shape,
        clip_vision={
            key: vision[key]
            for key in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
            )
        },
        clip_projection=clip_config["projection_dim"],
        decoder_text=text,
        **CHECK_STEPS[size],
    )


# --------------------------------------------------------------------------------------------------------
# Phases: timing, memory and guards
# --------------------------------------------------------------------------------------------------------


class Phases:
    """Runs each phase under a time limit, records its seconds, memory and outcome, and rewrites the JSON."""

    def __init__(self, results: dict, device: torch.device, json_path: Path, budget_s: float):
        self.results, self.device, self.json_path = results, device, json_path
        self.deadline = time.monotonic() + budget_s
        results["phases"] = {}

    def run(self, name: str, fn, needs: tuple[str, ...] = ()):
        entry: dict = {}
        self.results["phases"][name] = entry
        missing = [n for n in needs if self.results["phases"].get(n, {}).get("status") != "ok"]
        remaining = self.deadline - time.monotonic()
        if missing or remaining < 5:
            entry.update(status="skipped", reason=f"needs {missing}" if missing else "time budget spent")
            print(f"[gpu_check] {name}: skipped ({entry['reason']})", flush=True)
            self.write()
            return None
        limit = max(1, int(min(PHASE_LIMITS_S[name], remaining)))
        print(f"[gpu_check] {name}: start (limit {limit} s)", flush=True)
        bench.reset_peak_memory(self.device)
        start = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(limit)
        value = None
        try:
            value = fn()
            bench.synchronize(self.device)  # the GPU's queued work counts in the phase's time
            entry["status"] = "ok"
        except PhaseTimeout:
            entry.update(status="timed_out", error=f"over its {limit} s limit")
        except Exception as error:  # one failing phase must leave the others' figures
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
            traceback.print_exc()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        entry["seconds"] = round(time.perf_counter() - start, 3)
        entry.update(memory_now(self.device))
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f} s {_memory_text(entry)}", flush=True)
        self.write()
        return value

    def write(self) -> None:
        """Atomic: write beside, rename into place (a killed run leaves the last complete JSON)."""
        staging = self.json_path.with_suffix(".json.partial")
        staging.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        staging.replace(self.json_path)


def _raise_timeout(signum, frame):
    raise PhaseTimeout


def memory_now(device: torch.device) -> dict:
    """GPU: the phase's peak allocated and reserved; CPU: the process's peak RSS so far (a high-water mark)."""
    if device.type == "cuda":
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
        }
    return {"process_peak_rss_gib": round(bench.peak_memory_gib(device), 3)}


def _memory_text(entry: dict) -> str:
    if "peak_allocated_gib" in entry:
        return f"(peak {entry['peak_allocated_gib']:.2f} GiB allocated, {entry['peak_reserved_gib']:.2f} reserved)"
    return f"(process peak RSS {entry['process_peak_rss_gib']:.2f} GiB)"


# --------------------------------------------------------------------------------------------------------
# Phase bodies
# --------------------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "open_clip_torch",
        "timm",
        "safetensors",
        "tokenizers",
        "datasets",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def nf4_kernels(device: torch.device, dtype: torch.dtype) -> dict:
    """Quantise, dequantise and multiply a 512² matrix in NF4 with bitsandbytes on the device."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator(device="cpu").manual_seed(SEED)
    weight = torch.randn(512, 512, generator=generator).to(device=device, dtype=dtype)
    inputs = torch.randn(4, 512, generator=generator).to(device=device, dtype=dtype)
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    restored = bnb_functional.dequantize_4bit(packed, state)
    product = bnb.matmul_4bit(inputs, packed.t(), quant_state=state)
    reference = inputs.float() @ restored.float().t()
    relative_error = ((restored.float() - weight.float()).norm() / weight.float().norm()).item()
    matmul_error = ((product.float() - reference).norm() / reference.norm()).item()
    ok = relative_error < 0.15 and matmul_error < 0.02
    return {
        "ok": ok,
        "packed_dtype": str(packed.dtype).removeprefix("torch."),
        "packed_device": str(packed.device),
        "dequantise_relative_error": relative_error,
        "matmul_relative_error": matmul_error,
    }


def environment_phase(args, device: torch.device, results: dict) -> None:
    cpu = bench.cpu_description()
    info = bench.environment(device, cpu)
    info["versions"] = versions()
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu_capability"] = f"{properties.major}.{properties.minor}"
        info["gpu_multiprocessors"] = properties.multi_processor_count
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    results["environment"] = info
    args.dtype, results["dtype_reason"] = bench.choose_dtype(device, args.requested_dtype, args.shape.dtype, cpu)
    results["dtype"] = args.dtype
    from modeling_skinclip import _DTYPES

    if args.requested_quantization in ("auto", "nf4"):
        try:
            results["nf4_kernels"] = nf4_kernels(device, _DTYPES[args.dtype])
            usable = results["nf4_kernels"]["ok"]
            reason = "bitsandbytes NF4 kernels checked on the device" if usable else "NF4 kernels gave wrong numbers"
        except Exception as error:  # not installed, no CUDA binary for this GPU, ...
            usable, reason = False, f"bitsandbytes NF4 unusable: {type(error).__name__}: {error}"[:500]
            results["nf4_kernels"] = {"ok": False, "error": reason}
        if args.requested_quantization == "nf4" and not usable:
            raise RuntimeError(f"--quantization nf4 asked for, but {reason}")
        args.quantization = "nf4" if usable else "none"
        results["quantization_reason"] = reason if usable else f"{reason}; decoder built in {args.dtype} instead"
    else:
        args.quantization = "none"
        results["quantization_reason"] = "--quantization none"
    results["quantization"] = args.quantization
    results["settings"]["quantization"] = args.quantization
    results["settings"]["dtype"] = args.dtype
    matmul_size = {"paper": 8192, "tiny": 256}[args.size]
    results["peak_matmul_flops"] = bench.peak_matmul_flops(
        device, _DTYPES[args.dtype], matmul_size, repeats=5 if device.type == "cuda" else 3
    )
    print(
        f"device {device} ({info.get('gpu', info['cpu_model'])}), torch {torch.__version__} CUDA {torch.version.cuda}, "
        f"dtype {args.dtype} ({results['dtype_reason']}), quantization {args.quantization} "
        f"({results['quantization_reason']}), peak {results['peak_matmul_flops'] / 1e12:.2f} TFLOP/s",
        flush=True,
    )


def memory_plan(model_config, shape: bench.Shape, args, device: torch.device, variant: str) -> dict:
    """``train.py --dry_run``'s per-GPU plan for the variant's settings at this run's batch and sequence."""
    from modeling_skinclip import SkinClipVLModel
    from skinclip import dry_run

    _, _, checkpointing, overrides, pooling = bench.variant_overrides(variant, device)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = bench._training_arguments(
            output_dir, args.dtype, args.batch, 1, device, activation_checkpointing=checkpointing, **overrides
        )
    model = SkinClipVLModel(model_config, device="meta")
    model.config.image_token_pooling = pooling
    parameters = dry_run.parameter_table(model, training_args.lambda_align)
    rationale = shape.rationale_tokens[1]
    batch = {
        "decoder_tokens": {"maximum": model.num_image_tokens + shape.prompt_tokens[1] + 1 + rationale},
        "rationale": {"limit": rationale},
    }
    plan = dry_run.memory_plan(model, parameters, batch, training_args)
    return {
        "plan_total_gib": plan["total"][plan["configured"]] / 2**30,
        "plan_configured": plan["configured"],
        "plan_terms_gib": _gib_tree(plan["terms"]),
        "plan_sequence_tokens": plan["sequence_tokens"],
        "optim": dry_run._optim_name(training_args),
    }


def _gib_tree(value):
    if isinstance(value, dict):
        return {k: _gib_tree(v) for k, v in value.items()}
    return round(value / 2**30, 4)


def reference_inputs(processor, device: torch.device) -> dict:
    from PIL import Image

    with Image.open(REFERENCE_IMAGE) as image:
        batch = processor([image.convert("RGB")], [REFERENCE_METADATA])
    return {k: v.to(device) for k, v in batch.items()}


def predict_reference(model, processor, device: torch.device, new_tokens: int) -> dict:
    """Probabilities and a greedy rationale of the reference image (what the reload must reproduce)."""
    inputs = reference_inputs(processor, device)
    model.eval()
    with torch.inference_mode():
        prediction = model.predict(**inputs, max_new_tokens=new_tokens)
    return {
        "probs": prediction.probs[0].float().cpu().tolist(),
        "rationale_ids": prediction.rationale_ids[0].cpu().tolist(),
        "rationale": processor.decode(prediction.rationale_ids)[0],
    }


def reload_in_fresh_process(checkpoint: Path, device: torch.device, new_tokens: int, out: Path, limit_s: float) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--reload",
        str(checkpoint),
        "--device",
        str(device),
        "--new-tokens",
        str(new_tokens),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=max(10, limit_s - 5)
    )
    print(completed.stdout + completed.stderr, flush=True)  # into the log
    if completed.returncode != 0:
        raise RuntimeError(f"reload process exited {completed.returncode}: {completed.stderr.strip()[-1500:]}")
    return json.loads((out / "reload.json").read_text())


def reload_main(args) -> None:
    """The fresh process: from_pretrained with the build's seed, then predict the reference image."""
    from transformers.utils import logging as hf_logging

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    out = Path(args.out)
    start = time.perf_counter()
    torch.manual_seed(SEED)  # the random bases are re-initialised exactly as the build drew them
    model = SkinClipVLModel.from_pretrained(args.reload, device=device)
    processor = SkinClipVLProcessor.from_pretrained(args.reload)
    bench.synchronize(device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    prediction = predict_reference(model, processor, device, args.new_tokens)
    bench.synchronize(device)
    prediction.update(load_s=load_s, predict_s=time.perf_counter() - start, **memory_now(device))
    (out / "reload.json").write_text(json.dumps(prediction))
    seconds = f"loaded in {load_s:.1f} s, predicted in {prediction['predict_s']:.1f} s"
    print(f"reload: {seconds}: {prediction['rationale']!r}")


def compare_reload(reference: dict, reloaded: dict) -> dict:
    difference = max(abs(a - b) for a, b in zip(reference["probs"], reloaded["probs"]))
    return {
        "probs_max_abs_difference": difference,
        "same_top_class": max(range(len(reference["probs"])), key=reference["probs"].__getitem__)
        == max(range(len(reloaded["probs"])), key=reloaded["probs"].__getitem__),
        "same_rationale_ids": reference["rationale_ids"] == reloaded["rationale_ids"],
        "rationale": reloaded["rationale"],
        "load_s": reloaded["load_s"],
        "predict_s": reloaded["predict_s"],
        **{k: v for k, v in reloaded.items() if k.endswith("_gib")},
    }


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu-check-<size>-<device>.json and its log")
    parser.add_argument("--size", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quantization",
        choices=("auto", "nf4", "none"),
        default="auto",
        help="decoder storage; auto: NF4 when bitsandbytes' kernels pass on the device, else the compute dtype",
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="compute dtype (default: size's)")
    parser.add_argument("--budget-s", type=float, default=480, help="time for all phases together (default 8 min)")
    parser.add_argument("--skip-plain", action="store_true", help="leave out the plain Qwen2.5-VL recipe")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep the saved checkpoint under --out")
    # The reload phase's own process (internal).
    parser.add_argument("--reload", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=16, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def tee_output(log_path: Path):
    """Everything printed also goes to the log (stdout and stderr, tracebacks of failed phases included)."""

    class Tee:
        def __init__(self, stream, log):
            self.stream, self.log = stream, log

        def write(self, text):
            self.stream.write(text)
            self.log.write(text)
            return len(text)

        def flush(self):
            self.stream.flush()
            self.log.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)

    with open(log_path, "a", buffering=1) as log:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(stdout, log), Tee(stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = stdout, stderr


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.reload:
        reload_main(args)
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    stem = f"gpu-check-{args.size}-{device.type}"
    with tee_output(out / f"{stem}.log"):
        return _run(args, device, out / f"{stem}.json")


def _run(args, device: torch.device, json_path: Path) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # random-weight bases report every weight as newly initialised
    shape = check_shape(args.size)
    args.shape, args.requested_dtype, args.requested_quantization = shape, args.dtype, args.quantization
    args.dtype, args.quantization = shape.dtype, "none"  # until the environment phase decides
    args.batch, args.warmup, args.steps = shape.batch, shape.warmup, shape.steps
    args.inference_iters = shape.inference_iters
    results = {
        "check": "benchmarks/gpu_check.py",
        "size": args.size,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.gpu_check"] + sys.argv[1:]),
        "device": str(device),
        "settings": {
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "inference_iters": args.inference_iters,
            "variants": ["speed", "lean"],
            "budget_s": args.budget_s,
        },
        "training": [],
        "inference": [],
        "memory_vs_plan": {},
    }
    phases = Phases(results, device, json_path, args.budget_s)
    state: dict = {}
    phases.run("environment", lambda: environment_phase(args, device, results))
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)

        def build():
            state["bases"] = write_bases(args.size, root / "bases")
            torch.manual_seed(SEED)  # the reload draws the same random bases
            state["model"], state["rows"], state["n_params"] = bench.build_skinclip(
                shape, state["bases"], args, device, results
            )
            state["config"] = state["model"].config

        phases.run("build", build, needs=("environment",))
        for variant in ("speed", "lean"):

            def train(variant=variant):
                entry = bench.train_skinclip_variant(
                    state["model"],
                    variant,
                    state["rows"],
                    state["n_params"],
                    shape,
                    args,
                    device,
                    results["peak_matmul_flops"],
                )
                results["training"].append(entry)
                comparison = {"measured_peak_gib": entry["peak_gib"]}
                try:  # the plan is a comparison, not the phase: its failure keeps the measured figures
                    comparison.update(memory_plan(state["config"], shape, args, device, variant))
                    comparison["measured_over_plan"] = entry["peak_gib"] / comparison["plan_total_gib"]
                except Exception as error:
                    comparison["plan_error"] = f"{type(error).__name__}: {error}"
                if device.type == "cpu":
                    comparison["note"] = "CPU: the measured figure is the process's peak RSS, not one step's memory"
                results["memory_vs_plan"][f"skinclip/{variant}"] = comparison

            phases.run(f"train_{variant}", train, needs=("build",))
        lean = next((e for e in results["training"] if e["name"] == "skinclip/lean"), None)
        results["lean_peak_gib"] = lean["peak_gib"] if lean else None
        phases.run(
            "inference",
            lambda: bench.time_skinclip_inference(state["model"], state["rows"], shape, args, device, results),
            needs=("build",),
        )

        def save():
            from modeling_skinclip import SkinClipVLProcessor

            checkpoint = (Path(args.out) if args.keep_checkpoint else root) / "checkpoint"
            state["model"].save_pretrained(checkpoint)
            processor = SkinClipVLProcessor.from_pretrained(None, config=state["config"])
            processor.save_pretrained(checkpoint)
            state["checkpoint"] = checkpoint
            state["reference"] = predict_reference(state["model"], processor, device, args.new_tokens)
            results["saved"] = {
                "files": sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()),
                "bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
                "reference_rationale": state["reference"]["rationale"],
            }

        phases.run("save", save, needs=("build",))
        state.pop("model", None)  # frees the weights before the reload process and the plain recipe
        gc.collect()
        bench.reset_peak_memory(device)

        def reload():
            limit = PHASE_LIMITS_S["reload"]
            reloaded = reload_in_fresh_process(state["checkpoint"], device, args.new_tokens, root, limit)
            results["reload"] = compare_reload(state["reference"], reloaded)

        phases.run("reload", reload, needs=("save",))
        if not args.skip_plain:
            phases.run(
                "plain",
                lambda: bench.bench_plain(shape, state["bases"], args, device, results["peak_matmul_flops"], results),
                needs=("build",),
            )
    results["ratios"] = bench.summarize(results)
    results["goals"] = bench.goals(results["ratios"])
    results["environment"] = {**results.get("environment", {}), "load_average_end": list(os.getloadavg())}
    failed = [name for name, entry in results["phases"].items() if entry["status"] != "ok"]
    results["all_phases_ok"] = not failed
    phases.write()
    for name, value in results["ratios"].items():
        goal = results["goals"].get(name)
        verdict = f"   goal >= {goal['goal_at_least']:g}: {'met' if goal['met'] else 'NOT met'}" if goal else ""
        print(f"{name:<70} {value:.3f}{verdict}")
    print(f"[gpu_check] {'all phases ok' if not failed else 'not ok: ' + ', '.join(failed)}; wrote {json_path}")
    return results


def main() -> None:
    results = run()
    sys.exit(0 if results.get("all_phases_ok", True) else 1)


if __name__ == "__main__":
    main()
