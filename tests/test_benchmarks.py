"""benchmarks/bench_skinclip.py: the tiny mode runs end to end, and each optimised path keeps the numerics.

No timing is asserted here: the timings are the benchmark's output, judged in benchmarks/RESULTS.md.
"""

import json
import math

import pytest
import torch

from benchmarks import bench_skinclip as bench
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from trainer_cfa import CFALoss

METADATA = ["A lesion on the posterior torso of a male patient aged about 55.", "A skin lesion."]
REPORTS = ["Melanoma: atypical pigment network and blue-whitish veil.", "Nevus: regular network."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    results = bench.run(["--size", "tiny", "--json", str(out), "--device", "cpu"])
    return results, out


def test_tiny_benchmark_times_every_path_and_writes_the_ratios(tiny_run):
    results, out = tiny_run
    assert json.loads(out.read_text())["size"] == "tiny"
    assert results["peak_matmul_flops"] > 0
    training = {entry["name"]: entry for entry in results["training"]}
    expected = {
        f"skinclip/{name}"
        for name in ("naive", "rationale_head", "cached_features", "no_checkpointing", "speed", "lean", "speed_pooled2")
    }
    assert expected | {"plain_qwen2_5_vl_qlora"} == set(training)
    for entry in training.values():
        assert len(entry["step_s_all"]) == 3  # 1 warm-up + 2 timed steps
        assert entry["step_s"] == pytest.approx(
            sum(entry["step_s_all"][1:]) / 2, rel=1e-3, abs=1e-4
        )  # rounded to 4 digits
        assert 0 < entry["floor_over_step"] and math.isfinite(entry["floor_over_step"])
        assert entry["samples_per_s"] == pytest.approx(2 / entry["step_s"], rel=1e-2)
    assert training["skinclip/naive"]["lm_head_all_positions"] and training["skinclip/naive"]["gradient_checkpointing"]
    assert training["skinclip/speed"]["cached_features"] and not training["skinclip/speed"]["gradient_checkpointing"]
    # `speed` adds the decoder levers to `no_checkpointing`; the earlier rungs run the plain decoder path.
    assert training["skinclip/speed"]["decoder_trailing_padding"] and training["skinclip/speed"]["fused_lm_loss"]
    for name in ("naive", "rationale_head", "cached_features", "no_checkpointing"):
        assert not training[f"skinclip/{name}"]["decoder_trailing_padding"]
        assert not training[f"skinclip/{name}"]["fused_lm_loss"]
    inference = {entry["name"]: entry for entry in results["inference"]}
    assert {
        "skinclip/classify",
        "skinclip/classify_cached",
        "skinclip/classify+rationale",
        "skinclip/classify_pooled2",
        "skinclip/classify_cached_pooled2",
        "plain_qwen2_5_vl/diagnosis_as_text",
    } == set(inference)
    # 2×2 pooling of the tiny tower's 4×4 patches: 1 + 4 image tokens reach the decoder instead of 1 + 16.
    assert inference["skinclip/classify"]["image_tokens"] == 17
    assert inference["skinclip/classify_pooled2"]["image_tokens"] == 5
    assert training["skinclip/speed_pooled2"]["image_token_pooling"] == 2
    assert training["skinclip/speed_pooled2"]["image_tokens"] == 5
    assert training["skinclip/speed"]["tokens_per_sample"] - training["skinclip/speed_pooled2"][
        "tokens_per_sample"
    ] == pytest.approx(12)
    assert "skinclip/classify_pooled2 images/s over plain diagnosis-as-text" in results["ratios"]
    assert inference["skinclip/classify+rationale"]["generated_tokens_per_s"] > 0
    assert "skinclip/speed samples/s over plain" in results["ratios"]
    assert "skinclip/classify images/s over plain diagnosis-as-text" in results["ratios"]
    assert "skinclip/speed speed-up over skinclip/no_checkpointing" in results["ratios"]
    goal = results["goals"]["skinclip/speed floor/step"]
    assert goal["goal_at_least"] == 0.6 and goal["value"] == results["ratios"]["skinclip/speed floor/step"]
    assert goal["met"] is (goal["value"] >= 0.6)
    # The tiny SkinCLIP-VL sequence: 17 CLIP tokens + prompt (4-8) + CLS + rationale (6-12).
    assert 17 + 4 + 1 + 6 <= training["skinclip/speed"]["tokens_per_sample"] <= 17 + 8 + 1 + 12


def test_paper_shape_decoder_counts_the_design_notes_n():
    # Design section 6: N = 7.07e9 for the Qwen2.5-VL-7B language stack (input embedding excluded).
    from transformers import Qwen2_5_VLForConditionalGeneration

    shape = bench.SHAPES["paper"]
    with torch.device("meta"):
        bases_config = _plain_config(shape)
        model = Qwen2_5_VLForConditionalGeneration(bases_config)
    assert bench.decoder_matmul_params(model) == pytest.approx(7.07e9, rel=0.005)


def _plain_config(shape):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            shape.decoder_text,
            tie_word_embeddings=False,
            rope_scaling={"type": "mrope", "mrope_section": list(shape.mrope_section)},
        ),
        vision_config=dict(shape.plain_vision),
        tie_word_embeddings=False,
    )


def test_plain_collator_puts_labels_on_the_rationale_only():
    shape = bench.SHAPES["tiny"]
    rows = bench.make_rows(shape, 2)
    collator = bench.PlainCollator(shape)
    batch = collator(rows)
    image_id = bench.TINY_PLAIN_SPECIAL["image_token_id"]
    assert collator.num_image_tokens == 4  # 56 px, 14-px patches, 2x2 merge
    assert ((batch["input_ids"] == image_id).sum(1) == 4).all()
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * 14 * 14)
    for index, row in enumerate(rows):
        labelled = batch["labels"][index][batch["labels"][index] != -100]
        assert torch.equal(labelled, row["rationale_ids"])
        assert batch["attention_mask"][index].sum() == 3 + 4 - 1 + len(row["prompt_ids"]) + len(row["rationale_ids"])


@pytest.fixture(scope="module")
def model_and_batch(make_config):
    config = make_config()
    model = SkinClipVLModel(config, device="cpu").train()
    model.trailing_padding = model.fused_lm_loss = False  # the plain paths, which each test compares against
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; give every trained tensor values so all paths matter
        for tensor in model.trained_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + (1.0 if tensor.ndim == 0 else 0.0))
    processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    return model, processor(images, METADATA, reports=REPORTS, rationales=["Melanoma.", REPORTS[1]])


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, _ = CFALoss(lambda_align=1.0, lambda_cal=1.0, lambda_gen=1.0)(model(**batch), torch.tensor([0, 1]))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_rationale_only_lm_head_gives_the_plain_loss_and_gradients(model_and_batch):
    model, batch = model_and_batch
    assert batch["rationale_attention_mask"].min() == 0  # padding in the rationale is part of the check
    optimised_loss, optimised_grads = _loss_and_grads(model, batch)
    model.lm_head_on_all_positions = True
    try:
        plain_loss, plain_grads = _loss_and_grads(model, batch)
    finally:
        model.lm_head_on_all_positions = False
    torch.testing.assert_close(optimised_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert set(optimised_grads) == set(plain_grads)
    for name in optimised_grads:
        torch.testing.assert_close(optimised_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _assert_same_loss_and_grads(model, batch, switch):
    assert getattr(model, switch) is False
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    setattr(model, switch, True)
    try:
        fast_loss, fast_grads = _loss_and_grads(model, batch)
    finally:
        setattr(model, switch, False)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert set(fast_grads) == set(plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trailing_padding_gives_the_same_loss_and_gradients(model_and_batch):
    model, batch = model_and_batch
    # Padding inside (left-padded prompt) and at the end (right-padded rationale): both move.
    assert batch["prompt_attention_mask"].min() == 0 and batch["rationale_attention_mask"].min() == 0
    _assert_same_loss_and_grads(model, batch, "trailing_padding")
    # Classification only (the sequence ends at CLS) keeps the class logits too.
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_attention_mask", "pixel_values")}
    with torch.no_grad():
        plain = model(**inputs).logits
        model.trailing_padding = True
        try:
            fast = model(**inputs).logits
        finally:
            model.trailing_padding = False
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_trailing_padding_runs_the_decoder_without_a_padding_mask(model_and_batch):
    model, batch = model_and_batch
    seen = []
    hook = model.text_stack.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        model.trailing_padding = True
        with torch.no_grad():
            model(**batch)
    finally:
        model.trailing_padding = False
        hook.remove()
    assert seen == [None]


def test_fused_lm_loss_gives_the_same_loss_and_gradients(model_and_batch):
    model, batch = model_and_batch
    assert batch["rationale_attention_mask"].min() == 0
    _assert_same_loss_and_grads(model, batch, "fused_lm_loss")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_fused_lm_loss_in_chunks_matches_cross_entropy(chunk_rows):
    """Every chunking of the tokens (one row, an uneven last chunk, one chunk) gives F.cross_entropy's loss and
    hidden-state gradient of the whole logits."""
    from modeling_skinclip import _LinearCrossEntropy

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3001, 16, generator=generator)
    hidden = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 3001, (50,), generator=generator)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    (expected_grad,) = torch.autograd.grad(expected * 3.0, hidden)
    loss = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    (grad,) = torch.autograd.grad(loss * 3.0, hidden)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_fused_lm_loss_in_bfloat16_follows_float32():
    """The accelerator's path (bf16 hidden states and head): the same loss and gradient as float32 within bf16's
    precision, the gradient in the hidden states' dtype."""
    from modeling_skinclip import _LinearCrossEntropy

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3001, 16, generator=generator)
    hidden = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 3001, (50,), generator=generator)
    hidden32 = hidden.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(hidden32 @ weight.T, targets)
    (expected_grad,) = torch.autograd.grad(expected, hidden32)
    hidden16 = hidden.bfloat16().requires_grad_(True)
    loss = _LinearCrossEntropy.apply(hidden16, weight.bfloat16(), targets, 7)
    (grad,) = torch.autograd.grad(loss, hidden16)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad.float(), expected_grad, rtol=5e-2, atol=5e-4)


def test_cfa_trainer_sets_the_speed_switches_from_its_arguments(model_and_batch, tmp_path):
    from trainer_cfa import CFATrainer

    model, _ = model_and_batch
    try:
        for value in (True, False):
            args = bench._training_arguments(
                str(tmp_path), "float32", 2, 1, torch.device("cpu"), decoder_trailing_padding=value, fused_lm_loss=value
            )
            CFATrainer(model=model, args=args, train_dataset=[], data_collator=lambda rows: rows)
            assert model.trailing_padding is value and model.fused_lm_loss is value
    finally:
        model.trailing_padding = model.fused_lm_loss = False


def test_cached_clip_features_give_the_tower_loss(model_and_batch):
    model, batch = model_and_batch
    tower_loss, tower_grads = _loss_and_grads(model, batch)
    with torch.no_grad():
        features = model.vision.patch_tokens(batch["pixel_values"])
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    exact_loss, exact_grads = _loss_and_grads(model, {**cached, "vision_features": features})
    torch.testing.assert_close(exact_loss, tower_loss, rtol=0, atol=0)
    # The cache stores fp16: the loss moves by the rounding of the features only.
    half_loss, _ = _loss_and_grads(model, {**cached, "vision_features": features.half()})
    torch.testing.assert_close(half_loss, tower_loss, rtol=1e-3, atol=1e-3)


def test_random_weight_bases_quantise_to_nf4_in_place(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    shape = bench.SHAPES["tiny"]
    bases = bench.build_bases(shape, tmp_path)
    assert not any(p.stat().st_size > 100_000 for p in tmp_path.rglob("*"))  # configs only, no weights written
    config = bench.skinclip_config(shape, bases, "float32", "nf4")
    model = SkinClipVLModel(config, device="cpu")
    layers = [m for m in model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(isinstance(m.weight, bnb.nn.Params4bit) and m.weight.bnb_quantized for m in layers)
    assert all(m.weight.dtype == torch.uint8 and m.quant_state is not None for m in layers)
    # 4-bit packing: N counts two weights per stored byte, so it equals the unquantised count.
    expected = sum(m.in_features * m.out_features for m in layers)
    expected += sum(
        p.numel()
        for n, p in model.text_stack.named_parameters()
        if "embed_tokens" not in n and ".lora_" not in n and p.dtype != torch.uint8
    )
    expected += model.language_model.get_output_embeddings().weight.numel()
    assert bench.decoder_matmul_params(model.language_model) == expected
    rows = bench.make_rows(shape, 2)
    batch = bench.BenchCollator()(rows)
    labels = batch.pop("labels")
    outputs = model(**batch)
    loss, _ = CFALoss()(outputs, labels)
    assert torch.isfinite(loss)


AVX2_ONLY = {"model": "Intel(R) Xeon(R) CPU E5-2690 v4", "flags": "fpu sse2 avx f16c fma avx2".split()}
AMX = {"model": "Intel(R) Xeon(R) Platinum 8480+", "flags": "avx2 avx512f avx512_bf16 amx_bf16 amx_tile".split()}


def test_cpu_dtype_is_bf16_only_with_native_bf16_matmul():
    cpu = torch.device("cpu")
    never = lambda: pytest.fail("the flags decide; no timing probe")  # noqa: E731
    assert bench.choose_dtype(cpu, None, "bfloat16", AVX2_ONLY, never)[0] == "float32"
    assert bench.choose_dtype(cpu, None, "bfloat16", AMX, never)[0] == "bfloat16"
    zen4 = {"model": "AMD EPYC 9654", "flags": ["avx2", "avx512f", "avx512_bf16"]}
    assert bench.choose_dtype(cpu, None, "bfloat16", zen4, never)[0] == "bfloat16"
    # --dtype overrides the capability either way; the tiny size keeps its float32.
    assert bench.choose_dtype(cpu, "bfloat16", "bfloat16", AVX2_ONLY, never) == ("bfloat16", "--dtype")
    assert bench.choose_dtype(cpu, "float32", "bfloat16", AMX, never) == ("float32", "--dtype")
    assert bench.choose_dtype(cpu, None, "float32", AVX2_ONLY, never)[0] == "float32"
    # No flags readable (not Linux): a timed bf16-vs-fp32 matmul decides.
    unknown = {"model": "arm", "flags": []}
    assert bench.choose_dtype(cpu, None, "bfloat16", unknown, lambda: False)[0] == "float32"
    assert bench.choose_dtype(cpu, None, "bfloat16", unknown, lambda: True)[0] == "bfloat16"
    assert bench.choose_dtype(torch.device("cuda"), None, "bfloat16", AVX2_ONLY, never)[0] == "bfloat16"
    # An AMX CPU told to run AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2) emulates bf16 like an AVX2 one.
    assert bench.choose_dtype(cpu, None, "bfloat16", {**AMX, "onednn_isa_cap": "AVX2"}, never)[0] == "float32"
    assert bench.choose_dtype(cpu, None, "bfloat16", {**AMX, "onednn_isa_cap": "AVX512_CORE_AMX"}, never)[0] == (
        "bfloat16"
    )


def test_cpu_description_reads_model_and_flags():
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690 v4\nflags\t\t: fpu avx avx2\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690 v4\nflags\t\t: fpu avx avx2\n"
    )
    described = bench.cpu_description(text)
    assert described["model"] == "Intel(R) Xeon(R) CPU E5-2690 v4" and described["flags"] == ["fpu", "avx", "avx2"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_autocast_follows_the_run_dtype_not_the_size(tmp_path, dtype):
    # The reduced size defaults to bf16; a float32 run must train without bf16 autocast (emulated on AVX2).
    args = bench._training_arguments(str(tmp_path), dtype, 2, 1, torch.device("cpu"))
    assert args.bf16 is (dtype == "bfloat16") and not args.fp16


def test_float32_run_records_dtype_cpu_and_caches_float32_features(tiny_run):
    results, _ = tiny_run
    assert results["dtype"] == "float32" and results["settings"]["dtype"] == "float32"
    assert results["environment"]["cpu_model"] and "load_average" in results["environment"]
    assert isinstance(results["environment"]["cpu_flags"], str)
    assert results["cached_features_dtype"] == "float32"
