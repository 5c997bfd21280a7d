"""Benchmark SkinCLIP-VL's real training and inference paths against the FLOP floor and the plain recipe.

Random-weight bases are built from configs (nothing is downloaded, nothing large is written): each base
directory holds a config and an empty weight file, so ``from_pretrained`` initialises every weight at
random on the target device, and 4-bit layers are quantised in place (``modeling_skinclip.load_decoder``).

    python benchmarks/bench_skinclip.py --size paper                       # GPU: ViT-L/14 + 4-bit Qwen2.5-VL-7B
    python benchmarks/bench_skinclip.py --size reduced                     # CPU: ViT-B/16 + Qwen2.5-0.5B shapes
    python benchmarks/bench_skinclip.py --size tiny                        # seconds; run by tests/test_benchmarks.py

Training steps are real ``CFATrainer`` steps (forward, CFA loss, backward, optimiser), timed by a callback,
warm-up excluded. The plain Qwen2.5-VL QLoRA recipe (its own vision tower, image tokens in the sequence,
LM head over every position) is timed in the same run with a plain ``Trainer``. Every figure is reported
next to the ratio it is judged by: the FLOP floor ``4·N·T / peak`` (N = the decoder's matmul parameters,
input embedding excluded, LM head included; T = real tokens of the batch; peak = the best dense matmul rate
of the compute dtype measured in the same run), and samples/s or images/s against the plain recipe.

On a CPU the compute dtype is bf16 only where the CPU multiplies bf16 natively (`choose_dtype`), else float32;
``--dtype`` overrides it for everything (model, autocast, cached features, the plain recipe, the peak).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# --------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Sizes of one benchmark mode: the CLIP tower, the decoder, the plain recipe's own ViT, the sequence."""

    clip_vision: dict
    clip_text: dict
    clip_projection: int
    decoder_text: dict
    plain_vision: dict
    mrope_section: tuple
    prompt_tokens: tuple  # (min, max) real metadata-prompt tokens per sample
    rationale_tokens: tuple  # (min, max) real rationale tokens per sample (eos included)
    plain_image_size: int  # the plain recipe's image side (14-px patches, 2x2 merge)
    dtype: str
    quantization: str
    batch: int
    steps: int
    warmup: int
    inference_iters: int
    rationale_new_tokens: int
    diagnosis_new_tokens: int


_VOCAB_QWEN25_VL = dict(vocab_size=152064)

SHAPES = {
    # The paper's recipe: CLIP ViT-L/14 at 224 px (257 tokens), Qwen2.5-VL-7B language stack in NF4.
    "paper": Shape(
        clip_vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        clip_text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        clip_projection=768,
        decoder_text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            **_VOCAB_QWEN25_VL,
        ),
        plain_vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        mrope_section=(16, 24, 24),
        prompt_tokens=(48, 64),
        rationale_tokens=(96, 128),
        plain_image_size=224,
        dtype="bfloat16",
        quantization="nf4",
        batch=8,
        steps=10,
        warmup=3,
        inference_iters=5,
        rationale_new_tokens=64,
        diagnosis_new_tokens=8,
    ),
    # No GPU: CLIP ViT-B/16 (197 tokens) and a Qwen2.5-0.5B-shaped decoder, no 4-bit.
    "reduced": Shape(
        clip_vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        clip_projection=512,
        decoder_text=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        plain_vision=dict(
            depth=12,
            hidden_size=768,
            intermediate_size=3072,
            num_heads=12,
            out_hidden_size=896,
            fullatt_block_indexes=[3, 7, 11],
        ),
        mrope_section=(8, 12, 12),
        prompt_tokens=(48, 64),
        rationale_tokens=(96, 128),
        plain_image_size=224,
        dtype="bfloat16",
        quantization="none",
        batch=2,
        steps=3,
        warmup=1,
        inference_iters=2,
        rationale_new_tokens=64,
        diagnosis_new_tokens=8,
    ),
    # Seconds on a CPU: keeps the script from rotting (tests/test_benchmarks.py).
    "tiny": Shape(
        clip_vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        clip_projection=24,
        decoder_text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
        ),
        plain_vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
        ),
        mrope_section=(2, 3, 3),
        prompt_tokens=(4, 8),
        rationale_tokens=(6, 12),
        plain_image_size=56,
        dtype="float32",
        quantization="none",
        batch=2,
        steps=2,
        warmup=1,
        inference_iters=1,
        rationale_new_tokens=4,
        diagnosis_new_tokens=2,
    ),
}

from skinclip.labels import ISIC2019_CLASSES as CLASS_NAMES  # noqa: E402  (importable once REPO_ROOT is on sys.path)

PAD_ID, EOS_ID = 0, 1
# Qwen2.5-VL's special ids; the tiny vocabulary gets its own, below its size.
PLAIN_SPECIAL = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
TINY_PLAIN_SPECIAL = {
    "image_token_id": 1020,
    "video_token_id": 1021,
    "vision_start_token_id": 1022,
    "vision_end_token_id": 1023,
}

# --------------------------------------------------------------------------------------------------------
# Random-weight bases from configs
# --------------------------------------------------------------------------------------------------------


def _save_config_only(model_config, out_dir: Path) -> Path:
    """A base directory with the config and an empty safetensors: from_pretrained initialises every weight."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(out_dir)
    save_file({}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _plain_special(shape: Shape) -> dict:
    return TINY_PLAIN_SPECIAL if shape.decoder_text["vocab_size"] < 100_000 else PLAIN_SPECIAL


def build_bases(shape: Shape, root: Path) -> dict[str, str]:
    """CLIP (both towers), and a Qwen2.5-VL checkpoint (text stack + own ViT) at the shape, as local dirs."""
    from transformers import CLIPConfig, Qwen2_5_VLConfig

    clip = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            max_position_embeddings=77,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            bos_token_id=EOS_ID,
            **shape.clip_text,
        ),
        vision_config=shape.clip_vision,
        projection_dim=shape.clip_projection,
    )
    special = _plain_special(shape)
    text = dict(
        shape.decoder_text,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "mrope", "mrope_section": list(shape.mrope_section)},
    )
    decoder = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, **shape.plain_vision
        ),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
        tie_word_embeddings=False,
        **special,
    )
    return {
        "clip": str(_save_config_only(clip, root / "clip")),
        "decoder": str(_save_config_only(decoder, root / "qwen2_5_vl")),
    }


def skinclip_config(shape: Shape, bases: dict, dtype: str, quantization: str):
    from configuration_skinclip import SkinClipVLConfig

    return SkinClipVLConfig(
        vision_config=dict(backend="hf", model_name_or_path=bases["clip"]),
        decoder_config=dict(
            model_name_or_path=bases["decoder"],
            quantization=quantization,
            compute_dtype=dtype,
            lora_r=64,
            lora_alpha=16,
            lora_dropout=0.05,
        ),
        focal_dim=min(1024, shape.decoder_text["hidden_size"]),
        alignment_dim=min(512, shape.clip_projection),
        id2label=dict(enumerate(CLASS_NAMES)),
    )


# --------------------------------------------------------------------------------------------------------
# Synthetic batches (real token counts, padding as the processor makes it)
# --------------------------------------------------------------------------------------------------------


def make_rows(shape: Shape, num_rows: int, seed: int = 0) -> list[dict]:
    """Rows of token ids, an image and a label; lengths vary within the shape's ranges."""
    generator = torch.Generator().manual_seed(seed)
    vocab = shape.decoder_text["vocab_size"]
    hi = min(vocab, 150_000) - 8  # clear of the special ids at the top of the vocabulary

    def ids(bounds):
        length = int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))
        return torch.randint(3, hi, (length,), generator=generator)

    side = shape.clip_vision["image_size"]
    rows = []
    for index in range(num_rows):
        rationale = ids(shape.rationale_tokens)
        rationale[-1] = EOS_ID
        rows.append(
            {
                "prompt_ids": ids(shape.prompt_tokens),
                "rationale_ids": rationale,
                "report_ids": torch.randint(
                    3, 49000, (int(torch.randint(20, 77, (1,), generator=generator)),), generator=generator
                ),
                "pixel_values": torch.randn(3, side, side, generator=generator),
                "labels": index % len(CLASS_NAMES),
            }
        )
    return rows


def _pad(sequences, left: bool):
    from modeling_skinclip import _pad as pad

    return pad([s.tolist() for s in sequences], PAD_ID, left=left)


class BenchCollator:
    """Rows → a `SkinClipVLModel` batch, as `SkinClipVLCollator` makes it (prompt left-, rationale right-padded).

    With `use_cached_features`, rows carry `vision_features` (frozen CLIP tokens) instead of pixels.
    """

    def __init__(self, use_cached_features: bool = False):
        self.use_cached_features = use_cached_features

    def __call__(self, rows):
        batch = {}
        batch["prompt_ids"], batch["prompt_attention_mask"] = _pad([r["prompt_ids"] for r in rows], left=True)
        batch["rationale_ids"], batch["rationale_attention_mask"] = _pad([r["rationale_ids"] for r in rows], left=False)
        batch["report_ids"], batch["report_attention_mask"] = _pad([r["report_ids"] for r in rows], left=False)
        if self.use_cached_features:
            batch["vision_features"] = torch.stack([r["vision_features"] for r in rows])
        else:
            batch["pixel_values"] = torch.stack([r["pixel_values"] for r in rows])
        batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch


def add_cached_features(model, rows, batch_size: int) -> None:
    """Store the frozen CLIP tokens on each row (what feature_cache.py does for a real dataset).

    Kept in the tower's output dtype (the compute dtype), so the cache is exact and brings no other dtype into
    the run (feature_cache.py stores fp16 to halve a real dataset's disk; the loss moves by that rounding only).
    """
    device = model.cls_token.device
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pixels = torch.stack([r["pixel_values"] for r in chunk]).to(device)
            features = model.vision.patch_tokens(pixels).cpu()
            for row, feature in zip(chunk, features):
                row["vision_features"] = feature


def skinclip_tokens(rows, num_image_tokens: int) -> float:
    """Mean real tokens per batch row: image + prompt + CLS + rationale."""
    return sum(num_image_tokens + len(r["prompt_ids"]) + 1 + len(r["rationale_ids"]) for r in rows) / len(rows)


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and feature flags, from /proc/cpuinfo (x86 ``flags``, Arm ``Features``), and the
    oneDNN instruction-set cap if one is set (``ONEDNN_MAX_CPU_ISA``)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.split()
    return {"model": model, "flags": flags, "onednn_isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")}


# A bf16 matmul runs natively only with these (oneDNN uses AMX tiles or AVX-512 BF16 dot products; Arm has
# BFMMLA). Without them torch emulates bf16 matmuls element by element: on a 2-core AVX2 CPU one 2048² bf16
# matmul takes ~58 s against 0.13 s in float32, and the benchmark would never finish.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def choose_dtype(
    device: torch.device, requested: str | None, shape_dtype: str, cpu: dict | None = None, probe=None
) -> tuple[str, str]:
    """(compute dtype, why): ``--dtype`` wins; a CPU gets bf16 only where its matmuls run natively in bf16.

    ``cpu`` is `cpu_description()`'s answer (tests fake it); when it names no flags (not Linux), ``probe``
    (default: `bf16_matmul_is_fast`) times a small bf16 matmul against float32 instead.
    """
    if requested is not None:
        return requested, "--dtype"
    if device.type != "cpu" or shape_dtype != "bfloat16":
        return shape_dtype, f"the {device.type} default of this size"
    cpu = cpu_description() if cpu is None else cpu
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu["flags"]]
    cap = (cpu.get("onednn_isa_cap") or "").upper()
    if native and cap and not any(isa in cap for isa in ("BF16", "AMX", "ALL", "DEFAULT")):
        # Capped below its bf16 instructions (e.g. to run an AVX2-only CPU's kernels), oneDNN emulates bf16.
        return "float32", f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN off the CPU's bf16 instructions"
    if native:
        return "bfloat16", f"CPU has native bf16 matmul ({', '.join(native)})"
    if cpu["flags"]:
        return "float32", "CPU lacks native bf16 matmul (no amx_bf16/avx512_bf16/bf16 flag); bf16 would be emulated"
    fast = (probe or bf16_matmul_is_fast)()
    return (
        ("bfloat16", "no CPU flags readable; a bf16 matmul timed as fast as float32")
        if fast
        else ("float32", "no CPU flags readable; a bf16 matmul timed slower than float32")
    )


def bf16_matmul_is_fast(size: int = 256) -> bool:
    """Whether a bf16 matmul runs at least as fast as float32 here (an emulated one is ~100x slower)."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, dtype=dtype)
        torch.matmul(a, a)
        start = time.perf_counter()
        torch.matmul(a, a)
        seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] <= seconds[torch.float32]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best dense matmul rate (FLOP/s) of `dtype` on `device`: square `size` matrices, best of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


def decoder_matmul_params(language_model) -> int:
    """Parameters that take part in matmuls per token: the text stack's layers and the LM head.

    The input embedding (a lookup) is excluded, LoRA adapters are excluded, 4-bit packed weights count two
    per stored byte (Qwen2.5-7B: 7.07e9, the N of design section 6).
    """

    def numel(param):
        return param.numel() * 2 if param.dtype == torch.uint8 else param.numel()

    stack = language_model.get_decoder()
    total = sum(numel(p) for n, p in stack.named_parameters() if ".lora_" not in n and "embed_tokens" not in n)
    return total + numel(language_model.get_output_embeddings().weight)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; process-wide high-water mark


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _step_timer(device: torch.device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimiser step (forward, loss, backward, optimiser)."""

        def __init__(self):
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)
            # Process CPU time beside wall time: on a CPU run, other jobs show as wall time well above
            # cpu / threads (waiting for a core) or as spinning threads (cpu above wall × useful threads).
            self.cpu_seconds.append(time.process_time() - self._cpu_start)

    return StepTimer()


def _training_arguments(output_dir: str, dtype: str, batch: int, steps: int, device: torch.device, **overrides):
    from trainer_cfa import CFATrainingArguments

    # Autocast follows the run's compute dtype (not the size's default): a float32 run must not train under
    # bf16 autocast, which is emulated, and ~400x slower, on CPUs without native bf16.
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        focal_alpha="uniform",
        augment=False,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16" and device.type == "cuda",
        use_cpu=device.type == "cpu",
        seed=0,
    )
    settings.update(overrides)
    return CFATrainingArguments(**settings)


def time_training(trainer_class, model, rows, collator, shape: Shape, args: argparse.Namespace, device, **overrides):
    """Real trainer steps; returns step seconds (warm-up excluded) and peak memory."""
    from transformers import PrinterCallback

    timer = _step_timer(device)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = _training_arguments(
            output_dir, args.dtype, args.batch, args.warmup + args.steps, device, **overrides
        )
        trainer = trainer_class(
            model=model, args=training_args, train_dataset=rows, data_collator=collator, callbacks=[timer]
        )
        trainer.remove_callback(PrinterCallback)  # the benchmark prints its own lines
        reset_peak_memory(device)
        trainer.train()
        peak = peak_memory_gib(device)
        del trainer
    gc.collect()
    timed = timer.seconds[args.warmup :]
    return {
        "step_s": sum(timed) / len(timed),
        "step_s_all": [round(s, 4) for s in timer.seconds],
        "step_cpu_s_all": [round(s, 4) for s in timer.cpu_seconds],
        "peak_gib": peak,
    }


def _report(name: str, result: dict, rows_tokens: float, n_params: int, peak_flops: float, batch: int) -> dict:
    floor_s = 4 * n_params * rows_tokens * batch / peak_flops
    result.update(
        name=name,
        samples_per_s=batch / result["step_s"],
        step_ms=1000 * result["step_s"],
        tokens_per_sample=rows_tokens,
        floor_ms=1000 * floor_s,
        floor_over_step=floor_s / result["step_s"],
    )
    return result


# --------------------------------------------------------------------------------------------------------
# SkinCLIP-VL
# --------------------------------------------------------------------------------------------------------

# The decoder's padding mask and F.cross_entropy over the LM head's logits, as a plain composition runs them.
_PLAIN_DECODER = {"decoder_trailing_padding": False, "fused_lm_loss": False}
# Padding moved behind the real tokens (causal attention, no mask) and the LM-head loss with its gradient
# computed in the forward (CFATrainingArguments' defaults).
_FAST_DECODER = {"decoder_trailing_padding": True, "fused_lm_loss": True}

TRAINING_VARIANTS = {
    # name: (cached CLIP features, LM head on all positions, gradient checkpointing, extra TrainingArguments)
    "naive": (False, True, True, _PLAIN_DECODER),
    "rationale_head": (False, False, True, _PLAIN_DECODER),
    "cached_features": (True, False, True, _PLAIN_DECODER),
    "no_checkpointing": (True, False, False, _PLAIN_DECODER),
    "speed": (True, False, False, _FAST_DECODER),
    "lean": (True, False, True, {**_FAST_DECODER, "optim": "paged_adamw_8bit"}),
    # `speed` with the patch tokens average-pooled 2×2 before the decoder (a model setting, not a kernel lever:
    # a quarter of the patch tokens reach the decoder, so T and the floor shrink with it).
    "speed_pooled2": (True, False, False, {**_FAST_DECODER, "image_token_pooling": 2}),
}


def build_skinclip(shape: Shape, bases: dict, args, device, results: dict):
    """The SkinCLIP-VL model at the shape, its benchmark rows (with cached CLIP features) and the decoder's N."""
    from modeling_skinclip import SkinClipVLModel

    config = skinclip_config(shape, bases, args.dtype, args.quantization)
    model = SkinClipVLModel(config, device=device)
    results["skinclip_parameters"] = model.parameter_counts()
    n_params = decoder_matmul_params(model.language_model)
    results["decoder_matmul_params"] = n_params
    rows = make_rows(shape, args.batch * (args.warmup + args.steps), seed=0)
    add_cached_features(model, rows, args.batch)
    results["cached_features_dtype"] = str(rows[0]["vision_features"].dtype).removeprefix("torch.")
    results["skinclip_image_tokens"] = model.num_image_tokens
    return model, rows, n_params


def variant_overrides(name: str, device: torch.device) -> tuple[bool, bool, bool, dict, int]:
    """(cached features, LM head on all positions, checkpointing, TrainingArguments overrides, pooling) of a variant."""
    if name not in TRAINING_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(TRAINING_VARIANTS)}")
    cached, all_positions, checkpointing, overrides = TRAINING_VARIANTS[name]
    if overrides.get("optim", "").endswith("8bit") and (device.type != "cuda" or not bitsandbytes_available()):
        # bitsandbytes' paged optimisers need CUDA (and bitsandbytes); elsewhere the run keeps torch AdamW
        overrides = {k: v for k, v in overrides.items() if k != "optim"}
    # image_token_pooling is a model setting, not a TrainingArguments field.
    pooling = overrides.get("image_token_pooling", 1)
    overrides = {k: v for k, v in overrides.items() if k != "image_token_pooling"}
    return cached, all_positions, checkpointing, overrides, pooling


def train_skinclip_variant(model, name: str, rows, n_params: int, shape: Shape, args, device, peak_flops: float):
    """Time one training variant (real CFATrainer steps) on the model; returns its report entry."""
    from trainer_cfa import CFATrainer

    cached, all_positions, checkpointing, overrides, pooling = variant_overrides(name, device)
    model.config.image_token_pooling = pooling
    tokens = skinclip_tokens(rows, model.num_image_tokens)
    model.lm_head_on_all_positions = all_positions
    model.train()
    result = time_training(
        CFATrainer,
        model,
        rows,
        BenchCollator(cached),
        shape,
        args,
        device,
        activation_checkpointing=checkpointing,
        **overrides,
    )
    model.activation_checkpointing_disable()
    result.update(
        cached_features=cached,
        lm_head_all_positions=all_positions,
        gradient_checkpointing=checkpointing,
        image_tokens=model.num_image_tokens,
        image_token_pooling=pooling,
        **overrides,
    )
    entry = _report(f"skinclip/{name}", result, tokens, n_params, peak_flops, args.batch)
    print(_line(entry), flush=True)
    model.lm_head_on_all_positions = False
    model.config.image_token_pooling = 1
    return entry


def time_skinclip_inference(model, rows, shape: Shape, args, device, results: dict) -> None:
    """Classification only (the decoder stops at CLS), and classification + rationale (KV cache)."""
    model.lm_head_on_all_positions = False
    model.config.image_token_pooling = 1
    model.trailing_padding, model.fused_lm_loss = True, True  # inference runs the model as `speed` trains it
    model.eval()
    batch = BenchCollator(True)(rows[: args.batch])
    batch = {k: v.to(device) for k, v in batch.items()}
    pixel_batch = BenchCollator(False)(rows[: args.batch])["pixel_values"].to(device)
    inputs = dict(prompt_ids=batch["prompt_ids"], prompt_attention_mask=batch["prompt_attention_mask"])

    def classify():
        model.predict(**inputs, pixel_values=pixel_batch)

    def classify_cached():
        model.predict(**inputs, vision_features=batch["vision_features"])

    def explain():
        model.predict(**inputs, pixel_values=pixel_batch, max_new_tokens=shape.rationale_new_tokens, eos_token_id=-1)

    # The same timings with the patch tokens pooled 2×2 before the decoder (`image_token_pooling: 2`): the
    # work a model trained with that setting does (the weights do not change the arithmetic).
    for name, fn, new_tokens, pooling in (
        ("skinclip/classify", classify, 0, 1),
        ("skinclip/classify_cached", classify_cached, 0, 1),
        ("skinclip/classify+rationale", explain, shape.rationale_new_tokens, 1),
        ("skinclip/classify_pooled2", classify, 0, 2),
        ("skinclip/classify_cached_pooled2", classify_cached, 0, 2),
    ):
        model.config.image_token_pooling = pooling
        seconds = _time_inference(fn, device, args.inference_iters)
        entry = {
            "name": name,
            "images_per_s": args.batch / seconds,
            "batch_s": seconds,
            "image_tokens": model.num_image_tokens,
        }
        if new_tokens:
            entry["generated_tokens_per_s"] = args.batch * new_tokens / seconds
        results["inference"].append(entry)
        print(_line(entry), flush=True)
    model.config.image_token_pooling = 1


def bench_skinclip(shape: Shape, bases: dict, args, device, peak_flops: float, results: dict) -> None:
    model, rows, n_params = build_skinclip(shape, bases, args, device, results)
    for name in args.variants:
        results["training"].append(train_skinclip_variant(model, name, rows, n_params, shape, args, device, peak_flops))
    time_skinclip_inference(model, rows, shape, args, device, results)
    model = None  # frees the weights before the next model is built
    gc.collect()
    reset_peak_memory(device)


def _time_inference(fn, device, iters: int) -> float:
    with torch.inference_mode():
        fn()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
    return (time.perf_counter() - start) / iters


# --------------------------------------------------------------------------------------------------------
# The plain Qwen2.5-VL QLoRA recipe (reference)
# --------------------------------------------------------------------------------------------------------


def _plain_model(bases: dict, args, device):
    """Qwen2.5-VL with its own vision tower, 4-bit text stack (ViT kept in the compute dtype), LoRA r64 on q,v."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from modeling_skinclip import _DTYPES, _quantize_unloaded_4bit_weights

    dtype = _DTYPES[args.dtype]
    quantization = None
    if args.quantization == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # transformers 5 matches these from the start of a module's name (or as its suffix), so the ViT,
            # nested as model.visual, needs its full prefix; "visual" serves the older flat layout.
            llm_int8_skip_modules=["model.visual", "visual", "lm_head"],
        )
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    model = AutoModelForImageTextToText.from_pretrained(
        bases["decoder"],
        dtype=dtype,
        quantization_config=quantization,
        device_map=device_map,
        attn_implementation="sdpa",
    )
    if quantization is not None:
        _quantize_unloaded_4bit_weights(model, quantization, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=64, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules=r".*language_model.*\.(q_proj|v_proj)"
    )
    return get_peft_model(model, lora)


class PlainCollator:
    """Rows → Qwen2.5-VL inputs: `<vision_start> <image>×n <vision_end> prompt rationale`, labels on the rationale."""

    def __init__(self, shape: Shape, generation: bool = False):
        self.special = _plain_special(shape)
        self.grid = shape.plain_image_size // 14
        self.num_image_tokens = (self.grid // 2) ** 2
        self.generation = generation
        self.patch_dim = 3 * 2 * 14 * 14

    def __call__(self, rows):
        sequences, labels = [], []
        for row in rows:
            image = [self.special["vision_start_token_id"]] + [self.special["image_token_id"]] * self.num_image_tokens
            prefix = image + [self.special["vision_end_token_id"]] + row["prompt_ids"].tolist()
            target = [] if self.generation else row["rationale_ids"].tolist()
            sequences.append(prefix + target)
            labels.append([-100] * len(prefix) + target)
        # Left padding serves both training (masked) and generation.
        input_ids, attention_mask = _pad([torch.tensor(s) for s in sequences], left=True)
        label_ids = torch.full_like(input_ids, -100)
        for index, row_labels in enumerate(labels):
            label_ids[index, input_ids.shape[1] - len(row_labels) :] = torch.tensor(row_labels)
        patches = self.grid * self.grid
        generator = torch.Generator().manual_seed(len(rows))
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.randn(len(rows) * patches, self.patch_dim, generator=generator),
            "image_grid_thw": torch.tensor([[1, self.grid, self.grid]] * len(rows)),
        }
        if not self.generation:
            batch["labels"] = label_ids
        return batch


def bench_plain(shape: Shape, bases: dict, args, device, peak_flops: float, results: dict) -> None:
    from transformers import Trainer

    model = _plain_model(bases, args, device)
    n_params = decoder_matmul_params(model.base_model.model)
    collator = PlainCollator(shape)
    rows = make_rows(shape, args.batch * (args.warmup + args.steps), seed=0)
    tokens = sum(
        3 + collator.num_image_tokens - 1 + len(r["prompt_ids"]) + len(r["rationale_ids"]) for r in rows
    ) / len(rows)
    model.train()
    result = time_training(
        Trainer,
        model,
        rows,
        collator,
        shape,
        args,
        device,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    result.update(gradient_checkpointing=True, image_tokens=collator.num_image_tokens)
    results["training"].append(_report("plain_qwen2_5_vl_qlora", result, tokens, n_params, peak_flops, args.batch))
    print(_line(results["training"][-1]), flush=True)

    # Inference: the diagnosis answered as generated text (how the paper's VLM baselines are used).
    model.eval()
    model.activation_checkpointing_disable()
    generation = PlainCollator(shape, generation=True)
    batch = {k: v.to(device) for k, v in generation(rows[: args.batch]).items()}
    batch["pixel_values"] = batch["pixel_values"].to(next(model.base_model.model.model.visual.parameters()).dtype)

    def answer():
        model.generate(
            **batch,
            max_new_tokens=shape.diagnosis_new_tokens,
            min_new_tokens=shape.diagnosis_new_tokens,
            do_sample=False,
            pad_token_id=PAD_ID,
        )

    seconds = _time_inference(answer, device, args.inference_iters)
    entry = {
        "name": "plain_qwen2_5_vl/diagnosis_as_text",
        "images_per_s": args.batch / seconds,
        "batch_s": seconds,
        "new_tokens": shape.diagnosis_new_tokens,
    }
    results["inference"].append(entry)
    print(_line(entry), flush=True)
    model = None  # frees the weights (the timed closures above are done)
    gc.collect()
    reset_peak_memory(device)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _line(entry: dict) -> str:
    if "step_ms" in entry:
        return (
            f"{entry['name']:<34} {entry['samples_per_s']:8.3f} samples/s  step {entry['step_ms']:9.1f} ms  "
            f"floor {entry['floor_ms']:8.1f} ms  floor/step {entry['floor_over_step']:.3f}  "
            f"peak {entry['peak_gib']:.2f} GiB"
        )
    text = f"{entry['name']:<34} {entry['images_per_s']:8.3f} images/s"
    if "generated_tokens_per_s" in entry:
        text += f"  {entry['generated_tokens_per_s']:.1f} generated tokens/s"
    return text


def summarize(results: dict) -> dict:
    """The goal ratios, each measured within this run."""
    training = {entry["name"]: entry for entry in results["training"]}
    inference = {entry["name"]: entry for entry in results["inference"]}
    ratios = {}
    plain = training.get("plain_qwen2_5_vl_qlora")
    for name, entry in training.items():
        if name.startswith("skinclip/"):
            ratios[f"{name} floor/step"] = entry["floor_over_step"]
            if plain:
                ratios[f"{name} samples/s over plain"] = entry["samples_per_s"] / plain["samples_per_s"]
    naive = training.get("skinclip/naive")
    for name, entry in training.items():
        if naive and name.startswith("skinclip/") and entry is not naive:
            ratios[f"{name} speed-up over skinclip/naive"] = naive["step_s"] / entry["step_s"]
    if "skinclip/speed" in training and "skinclip/no_checkpointing" in training:
        # The decoder levers alone (trailing padding, fused LM-head loss): the two rungs differ only there.
        ratios["skinclip/speed speed-up over skinclip/no_checkpointing"] = (
            training["skinclip/no_checkpointing"]["step_s"] / training["skinclip/speed"]["step_s"]
        )
    answer = inference.get("plain_qwen2_5_vl/diagnosis_as_text")
    if answer:
        for name in (
            "skinclip/classify",
            "skinclip/classify_cached",
            "skinclip/classify_pooled2",
            "skinclip/classify_cached_pooled2",
        ):
            if name in inference:
                ratios[f"{name} images/s over plain diagnosis-as-text"] = (
                    inference[name]["images_per_s"] / answer["images_per_s"]
                )
    return ratios


# The design notes' goals (issue 7/16): each ratio above that has one is printed and stored beside it.
GOALS = {
    "skinclip/speed floor/step": 0.6,
    "skinclip/speed samples/s over plain": 4.0,
    "skinclip/lean floor/step": 0.3,
    "skinclip/classify images/s over plain diagnosis-as-text": 5.0,
}


def goals(ratios: dict) -> dict:
    return {
        name: {"value": ratios[name], "goal_at_least": goal, "met": ratios[name] >= goal}
        for name, goal in GOALS.items()
        if name in ratios
    }


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def environment(device: torch.device, cpu: dict) -> dict:
    import peft
    import transformers

    if bitsandbytes_available():
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    else:
        bnb_version = None  # not installed: the run falls back to a bf16 decoder and torch AdamW (gpu_check.py)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_model": cpu["model"],
        "cpu_flags": " ".join(cpu["flags"]),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Instruction-set caps (set to run an AVX2-only CPU's kernels on a newer one): torch, MKL, oneDNN.
        "isa_environment": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--batch", type=int, help="batch size (default: the size's)")
    parser.add_argument("--steps", type=int, help="timed training steps (default: the size's)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (default: the size's)")
    parser.add_argument("--inference-iters", type=int, help="timed inference batches")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="compute dtype of everything: model, autocast, cached features, the plain recipe, the "
        "peak (default: the size's; on a CPU bf16 only where its matmuls run natively in bf16)",
    )
    parser.add_argument("--quantization", choices=("nf4", "none"), help="decoder quantisation (paper: nf4)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(TRAINING_VARIANTS),
        help=f"SkinCLIP-VL training variants: {sorted(TRAINING_VARIANTS)}",
    )
    parser.add_argument("--skip-plain", action="store_true", help="do not time the plain Qwen2.5-VL recipe")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmuls that measure the peak rate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for the whole run, peak included (default: torch's); 1 keeps a run "
        "on a machine shared with other jobs from waiting on a descheduled thread at every op",
    )
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args(argv)
    shape = SHAPES[args.size]
    for field in ("batch", "steps", "warmup", "inference_iters", "quantization"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(shape, field))
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.matmul_size is None:
        args.matmul_size = {"paper": 8192, "reduced": 2048, "tiny": 256}[args.size]
    return args


def run(argv=None) -> dict:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # the random-weight bases report every weight as newly initialised
    device = torch.device(args.device)
    shape = SHAPES[args.size]
    from modeling_skinclip import _DTYPES

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_description()
    args.dtype, dtype_reason = choose_dtype(device, args.dtype, shape.dtype, cpu)
    print(f"compute dtype: {args.dtype} ({dtype_reason})", flush=True)
    # On a CPU one 2048² matmul takes ~0.1 s: best of 10 rides out a moment of another job's load.
    peak_flops = peak_matmul_flops(
        device, _DTYPES[args.dtype], args.matmul_size, repeats=10 if device.type == "cpu" else 5
    )
    results = {
        "size": args.size,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python"] + sys.argv),
        "dtype": args.dtype,
        "dtype_reason": dtype_reason,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": environment(device, cpu),
        "peak_matmul_flops": peak_flops,
        "training": [],
        "inference": [],
    }
    print(f"peak {args.dtype} matmul: {peak_flops / 1e12:.3f} TFLOP/s on {device}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        bases = build_bases(shape, Path(root))
        bench_skinclip(shape, bases, args, device, peak_flops, results)
        if not args.skip_plain:
            bench_plain(shape, bases, args, device, peak_flops, results)
    results["environment"]["load_average_end"] = list(os.getloadavg())  # other jobs would skew every timing
    # Measured again at the end (the ratios keep the first): a gap between the two flags a run disturbed by load.
    results["peak_matmul_flops_end"] = peak_matmul_flops(
        device, _DTYPES[args.dtype], args.matmul_size, repeats=10 if device.type == "cpu" else 5
    )
    results["ratios"] = summarize(results)
    print(f"peak {args.dtype} matmul at the end: {results['peak_matmul_flops_end'] / 1e12:.3f} TFLOP/s", flush=True)
    results["goals"] = goals(results["ratios"])
    for name, value in results["ratios"].items():
        goal = results["goals"].get(name)
        print(
            f"{name:<70} {value:.3f}"
            + (f"   goal >= {goal['goal_at_least']:g}: {'met' if goal['met'] else 'NOT met'}" if goal else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run()
