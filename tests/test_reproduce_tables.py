"""reproduce_tables.py: every table command end to end at --tiny size, and the tables' numbers traced to files."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from skinclip import tables as rt

PAPER_TEXT = rt.REPO_ROOT.parent / "shared" / "paper" / "skinclip-vl-paper.txt"
# Paper Table I line prefixes (as extracted from the PDF) for the keys of paper_numbers.yaml.
PAPER_LINE_PREFIX = {
    "EfficientNet-B4": "EfficientNet-B4 [19]",
    "ResNet-34": "ResNet-34 [20]",
    "ConvNeXt-Base": "ConvNeXt-Base [21]",
    "CaFormer-B36": "CaFormer-B36 [22]",
    "HEALNet": "HEALNet [23]",
    "MedCLIP": "MedCLIP [14]",
    "Qwen2.5-VL-7B": "Qwen2.5-VL-7B [24]",
    "LLaVA-Med-7B": "LLaVA-Med-7B [25]",
    "SkinVL-MM": "SkinVL-MM [26]",
    "InternVL2.5-8B": "InternVL2.5-8B [27]",
    "SkinGPT-4": "SKinGPT-4 [28]",
    "SkinCLIP-VL": "SkinCLIP-VL (Ours)",
}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Every table command, one after the other, into one results directory (later tables reuse earlier runs)."""
    out = tmp_path_factory.mktemp("tables")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contending ones
    try:
        codes = {table: rt.main([table, "--out", str(out), "--tiny", "--launcher", "inprocess"]) for table in rt.TABLES}
    finally:
        torch.set_num_threads(threads)
    return out, codes


def _markdown_rows(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


def _expected_rows(table: str) -> list[str]:
    if table == "table1":
        return [label for heading, rows in rt.TABLE1_ROWS for label in [f"**{heading}**"] + [r[0] for r in rows]]
    return [
        row[0]
        for row in {
            "ablation": rt.ABLATION_ROWS,
            "lambda3": rt.LAMBDA3_ROWS,
            "data_efficiency": rt.DATA_EFFICIENCY_ROWS,
        }[table]
    ]


@pytest.mark.parametrize("table", rt.TABLES)
def test_every_table_command_writes_every_row_and_column(tiny_results, table):
    out, codes = tiny_results
    assert codes[table] == 0
    header, rows = _markdown_rows((out / f"{table}.md").read_text())
    data = json.loads((out / f"{table}.json").read_text())
    assert header == ["Model"] + data["columns"]
    assert list(rows) == _expected_rows(table)
    for label, cells in rows.items():
        assert len(cells) == len(data["columns"]), label
    if table == "table1":
        for dataset in ("ISIC 2019", "Derm7pt", "ISIC 2024 (OOD)"):
            assert [c for c in header if c.startswith(dataset + " ")] == [f"{dataset} {m}" for _, m in rt.METRICS]
    # Every run of the table finished: no "not run" / "failed" cell where this project has a run.
    statuses = {cell["status"] for cell in data["cells"]}
    assert statuses <= {"ok", "not reproduced"}, statuses
    assert set(data["runs"]) == set(rt.runs_of(table))


@pytest.mark.parametrize("table", rt.TABLES)
def test_table_numbers_come_from_the_evaluation_files(tiny_results, table):
    out, _ = tiny_results
    data = json.loads((out / f"{table}.json").read_text())
    _, rows = _markdown_rows((out / f"{table}.md").read_text())
    columns = data["columns"]
    checked = 0
    for cell in data["cells"]:
        if cell["status"] != "ok" or cell["source"] is None:
            continue
        source = Path(cell["source"])
        assert source.parent.parent == out / "runs"
        assert source.name == (
            "ood_metrics.json" if "ISIC 2024" in cell["column"] or table == "data_efficiency" else "test_metrics.json"
        )
        assert cell["value"] == json.loads(source.read_text())[cell["metric"]]
        shown = rows[cell["row"]][columns.index(cell["column"])]
        assert shown.startswith(rt.format_value(cell["metric"], cell["value"]) + " ")
        if cell["paper"] is not None:
            assert cell["diff"] == pytest.approx(cell["value"] - cell["paper"])
            assert rt.format_diff(cell["metric"], cell["diff"]) in shown
        checked += 1
    assert checked >= {"table1": 45, "ablation": 30, "lambda3": 24, "data_efficiency": 4}[table]


def test_paper_numbers_sit_beside_measured_ones(tiny_results):
    out, _ = tiny_results
    _, rows = _markdown_rows((out / "table1.md").read_text())
    header, _ = _markdown_rows((out / "table1.md").read_text())
    ours = rows["SkinCLIP-VL (Ours)"]
    assert ours[0] == "7.4B"
    assert "(88.7%, " in ours[header.index("ISIC 2019 B-ACC ↑") - 1]
    assert rows["HEALNet"][header.index("Derm7pt AUROC ↑") - 1] == "— (0.908)"  # paper-only row
    drop = json.loads((out / "data_efficiency.json").read_text())
    cells = {(c["row"], c["column"]): c for c in drop["cells"]}
    full, small = cells[("SkinCLIP-VL", "Train-100%")], cells[("SkinCLIP-VL", "Train-12%")]
    assert cells[("SkinCLIP-VL", "Drop")]["value"] == pytest.approx(small["value"] - full["value"])
    assert cells[("SkinCLIP-VL", "Drop")]["paper"] == pytest.approx(-0.026)


def test_identical_runs_are_trained_once(tiny_results):
    out, _ = tiny_results
    ablation = json.loads((out / "ablation.json").read_text())["runs"]
    sweep = json.loads((out / "lambda3.json").read_text())["runs"]
    assert ablation["ablation_full_cfa"]["same_as"] == "skinclip_isic2019"
    assert sweep["lambda_gen_0.5"]["same_as"] == "skinclip_isic2019"
    assert ablation["ablation_ce_only"]["same_as"] == "ablation_ce_only"
    assert not (out / "runs" / "ablation_full_cfa").exists()
    # The later table commands reused Table I's run instead of training again.
    assert sweep["lambda_gen_0.5"]["status"] == "reused"


def test_trainable_params_column_reads_the_checkpoints(tiny_results):
    out, _ = tiny_results
    header, rows = _markdown_rows((out / "table1.md").read_text())
    column = header.index("Trainable params (run)") - 1
    run_info = json.loads((out / "runs" / "resnet34_isic2019" / "run_info.json").read_text())
    assert rows["ResNet-34"][column] == rt.format_count(run_info["trainable_parameters"])
    from safetensors import safe_open

    with safe_open(str(out / "runs" / "skinclip_isic2019" / "model.safetensors"), framework="pt") as handle:
        count = sum(handle.get_tensor(key).numel() for key in handle.keys())
    assert rows["SkinCLIP-VL (Ours)"][column] == rt.format_count(count)


def test_collect_only_rereads_files_and_marks_missing_runs(tiny_results, tmp_path):
    out, _ = tiny_results
    copy = tmp_path / "results"
    shutil.copytree(out / "runs", copy / "runs")
    metrics_file = copy / "runs" / "ablation_ce_only" / "ood_metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["balanced_accuracy"] = 0.4321
    metrics_file.write_text(json.dumps(metrics))
    shutil.rmtree(copy / "runs" / "ablation_focal")
    # --tiny only to resolve the same run keys; nothing is trained with --collect-only.
    shutil.copytree(out / "tiny", copy / "tiny")
    assert rt.main(["ablation", "--out", str(copy), "--tiny", "--collect-only"]) == 0
    _, rows = _markdown_rows((copy / "ablation.md").read_text())
    assert rows["Baseline (CE loss)"][0] == "43.2% (71.5%, -28.3 pp)"
    assert all(cell.startswith("not run (") for cell in rows["+ L_focal"])
    assert rows["+ L_focal"][0] == "not run (79.2%)"
    assert not (copy / "runs" / "ablation_focal").exists()


def test_a_failed_run_is_reported_and_does_not_stop_the_others(tmp_path, monkeypatch):
    def execute(run, plan, launcher):
        if run.name == "ablation_focal":
            raise RuntimeError("out of memory")
        run_dir = plan.run_dir(run.name)
        run_dir.mkdir(parents=True)
        for name in ("test_metrics.json", "ood_metrics.json"):
            (run_dir / name).write_text(json.dumps({"balanced_accuracy": 0.5, "auroc_macro": 0.6, "ece": 0.1}))
        (run_dir / "run_key.json").write_text(rt.run_key(run, plan))

    monkeypatch.setattr(rt, "execute", execute)
    assert rt.main(["ablation", "--out", str(tmp_path)]) == 1
    _, rows = _markdown_rows((tmp_path / "ablation.md").read_text())
    assert rows["+ L_focal"][0] == "failed (79.2%)"
    assert "out of memory" in (tmp_path / "runs" / "ablation_focal" / "error.txt").read_text()
    assert rows["+ L_focal + L_cal"][0] == "50.0% (80.1%, -30.1 pp)"
    assert rows["+ L_focal + L_cal"][1] == "0.600 (0.915, -0.315)"


def test_run_keys_merge_only_identical_settings(tmp_path):
    plan = rt.Plan(out=tmp_path)
    canonical = rt.canonical_runs(plan)
    assert canonical["ablation_full_cfa"] == canonical["lambda_gen_0.5"] == "skinclip_isic2019"
    distinct = [name for name, target in canonical.items() if target == name]
    assert "ablation_ce_only" in distinct and "lambda_gen_1.0" in distinct and "skinclip_isic2019_train12" in distinct
    # A data path given for one data set changes only the runs on it.
    other = rt.canonical_runs(rt.Plan(out=tmp_path, data={"derm7pt": "/data/d7"}))
    assert other == canonical
    argv = rt.command_line(rt.RUNS["skinclip_derm7pt"], rt.Plan(out=tmp_path, data={"derm7pt": "/data/d7"}))
    assert '--dataset_path="/data/d7"' in argv and f'--output_dir="{tmp_path / "runs" / "skinclip_derm7pt"}"' in argv


def test_paper_numbers_file_matches_the_paper_text():
    paper = yaml.safe_load(rt.PAPER_NUMBERS.read_text())
    assert set(paper["table1"]) == set(PAPER_LINE_PREFIX)
    assert [row[1] for row in rt.ABLATION_ROWS] == list(paper["ablation"])
    if not PAPER_TEXT.is_file():
        pytest.skip(f"paper text not found at {PAPER_TEXT}")
    lines = PAPER_TEXT.read_text().splitlines()
    for model, prefix in PAPER_LINE_PREFIX.items():
        line = next(line for line in lines if line.startswith(prefix))
        printed = re.findall(r"\d+\.\d+%?", line[len(prefix) :])[-9:]
        reported = paper["table1"][model]
        expected = [
            f"{100 * v:.1f}%" if i == 0 else f"{v:.3f}"
            for dataset in ("isic2019", "derm7pt", "isic2024")
            for i, v in enumerate(reported[dataset])
        ]
        assert printed == expected, model
    text = PAPER_TEXT.read_text()
    assert "Baseline (CE Loss) 71.5% 0.820 0.155" in text and "SkinCLIP-VL 85.0% 82.4% -2.6%" in text
    assert paper["ablation"]["ce_only"]["isic2024"] == [0.715, 0.820, 0.155]
    assert paper["data_efficiency"]["SkinCLIP-VL"] == {"train100": 0.850, "train12": 0.824, "drop": -0.026}


# --------------------------------------------------------------------------------------------------------
# ham10000_mini: linear probe, CE only, full CFA, full CFA without metadata (--tiny: demo data, tiny bases)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ham_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ham10000_mini")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = rt.main(["ham10000_mini", "--out", str(out), "--tiny", "--launcher", "inprocess"])
    finally:
        torch.set_num_threads(threads)
    return out, code


def _ham_cells(out: Path) -> dict:
    return {(c["row"], c["column"]): c for c in json.loads((out / "ham10000_mini.json").read_text())["cells"]}


@pytest.mark.slow
def test_ham10000_mini_table_rows_columns_and_files(ham_results):
    from skinclip.run_calibration import CALIBRATION_FILE

    out, code = ham_results
    assert code == 0
    markdown = (out / "ham10000_mini.md").read_text()
    header, rows = _markdown_rows(markdown)
    assert header == ["Model"] + rt.HAM10000_MINI_COLUMNS
    assert list(rows) == [label for label, _, _ in rt.HAM10000_MINI_ROWS]
    cells = _ham_cells(out)
    for label, run, _ in rt.HAM10000_MINI_ROWS:
        run_dir = out / "runs" / run
        metrics = json.loads((run_dir / "test_metrics.json").read_text())
        calibration = json.loads((run_dir / CALIBRATION_FILE).read_text())
        shown = dict(zip(header[1:], rows[label]))
        for column, metric, report, from_metrics in rt.HAM10000_MINI_METRICS:
            cell = cells[(label, column)]
            assert cell["status"] == "ok"
            expected = metrics[metric] if from_metrics else calibration[report][metric]
            assert cell["value"] == expected
            low, high = calibration[report][f"{metric}_ci"]
            interval = (
                f"[{100 * low:.1f}, {100 * high:.1f}]" if metric == "balanced_accuracy" else f"[{low:.3f}, {high:.3f}]"
            )
            assert shown[column] == f"{rt.format_value(metric, expected)} {interval}"
            assert cell["ci"] == [low, high]
        # The run's own file and the calibration report agree on the uncalibrated numbers.
        for metric in ("balanced_accuracy", "auroc_macro", "ece"):
            assert calibration["uncalibrated"][metric] == pytest.approx(metrics[metric], abs=1e-12)
        assert shown["T (fitted on validation)"].startswith(f"{calibration['temperature']:.3f}")
        wall = json.loads((run_dir / rt.WALL_TIME_FILE).read_text())["seconds"]
        assert shown["Wall time (s)"] == f"{wall:.0f}" and wall > 0
        assert shown["Rationale agreement"] == "—"  # no run writes the key yet
    # Temperature: the validation NLL is lowest at the fitted T (a property, not the same code again).
    from skinclip import classification_metrics as sm
    from skinclip.run_calibration import log_probabilities, read_predictions

    for _, run, _ in rt.HAM10000_MINI_ROWS:
        labels, probs, _ = read_predictions(out / "runs" / run / "validation_predictions.csv")
        temperature = json.loads((out / "runs" / run / CALIBRATION_FILE).read_text())["temperature"]

        nll = {
            t: sm.negative_log_likelihood(labels, sm.apply_temperature(log_probabilities(probs), t))
            for t in (temperature, temperature * 1.05, temperature / 1.05)
        }
        assert nll[temperature] <= min(nll.values()) + 1e-9
    # Paper numbers: full CFA beside Table I (ISIC 2019) and Table II (ISIC 2024 OOD); none for probe / no metadata.
    full, probe = dict(zip(header[1:], rows["(c) Full CFA"])), dict(zip(header[1:], rows[rt.HAM10000_MINI_ROWS[0][0]]))
    assert full[rt.PAPER_ISIC2019] == "88.7% / 0.981 / 0.019" and full[rt.PAPER_ISIC2024] == "85.0% / 0.972 / 0.033"
    assert dict(zip(header[1:], rows["(b) CE only"]))[rt.PAPER_ISIC2024] == "71.5% / 0.820 / 0.155"
    assert probe[rt.PAPER_ISIC2019] == probe[rt.PAPER_ISIC2024] == "—"
    assert "not the same data" in markdown and "--tiny" in markdown
    assert "num_train_epochs = 2" in markdown  # the budget, read from the resolved configs
    # The verdict under the table follows the measured values.
    bacc = {label: cells[(label, "B-ACC ↑ [95% CI]")]["value"] for label, _, _ in rt.HAM10000_MINI_ROWS}
    best = max(bacc.values())
    winners = [label for label, value in bacc.items() if value == best]
    assert f"**Highest B-ACC**: {' and '.join(winners)}, {rt.format_value('balanced_accuracy', best)}" in markdown
    reaches = bacc["(c) Full CFA"] >= bacc[rt.HAM10000_MINI_ROWS[0][0]]
    assert f"B-ACC?** {'Yes' if reaches else 'No'}:" in markdown
    summary = json.loads((out / "ham10000_mini.json").read_text())["summary"]
    assert summary["best_bacc_rows"] == winners and summary["full_cfa_reaches_probe"] is reaches


@pytest.mark.slow
def test_ham10000_mini_rows_differ_only_where_they_should(ham_results):
    out, _ = ham_results
    configs = {
        name: json.loads((out / "runs" / name / "config.json").read_text()) for name in rt.runs_of("ham10000_mini")[1:]
    }
    assert configs["ham10000_mini_full_cfa"]["use_metadata"] is True
    assert configs["ham10000_mini_no_metadata"]["use_metadata"] is False
    keys = {name: json.loads((out / "runs" / name / "run_key.json").read_text())["settings"] for name in configs}
    full, ce, no_meta = (keys[f"ham10000_mini_{n}"] for n in ("full_cfa", "ce_only", "no_metadata"))
    assert {k for k in full.keys() | no_meta.keys() if full.get(k) != no_meta.get(k)} == {"use_metadata"}
    assert {k: ce[k] for k in ("focal_gamma", "lambda_align", "lambda_cal")} == {
        "focal_gamma": 0.0,
        "lambda_align": 0.0,
        "lambda_cal": 0.0,
    }
    for name in ("num_train_epochs", "seed", "learning_rate", "dataset_path"):
        assert full[name] == ce[name] == no_meta[name], name


@pytest.mark.slow
def test_ham10000_mini_probe_equals_a_direct_scikit_learn_computation(ham_results):
    """The probe's test probabilities and B-ACC, recomputed from the tiny CLIP's hidden states with scikit-learn."""
    from datasets import load_from_disk
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import CLIPImageProcessor, CLIPModel

    out, _ = ham_results
    run_dir = out / "runs" / "ham10000_mini_probe"
    data = load_from_disk(str(out / "tiny" / "data" / "ham10000_mini"))
    clip = CLIPModel.from_pretrained(str(out / "tiny" / "bases" / "clip")).eval()
    image_processor = CLIPImageProcessor.from_pretrained(str(out / "tiny" / "bases" / "clip"))

    def features(split):
        parts = []
        for start in range(0, len(split), 16):  # the probe's batch size under --tiny
            images = [image.convert("RGB") for image in split[start : start + 16]["image"]]
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                tokens = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            parts.append(tokens.half().float().numpy())  # the feature cache stores fp16
        tokens = np.concatenate(parts)
        return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], axis=1)

    info = json.loads((run_dir / "run_info.json").read_text())
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)),
        {"logisticregression__C": info["c_grid"]},
        scoring="balanced_accuracy",
        cv=StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=42),
    ).fit(features(data["train"]), data["train"]["label"], groups=data["train"]["group_id"])
    assert info["chosen_c"] == search.best_params_["logisticregression__C"]
    expected = search.predict_proba(features(data["test"]))
    written = pd.read_csv(run_dir / "test_predictions.csv")
    np.testing.assert_allclose(written.iloc[:, 2:].to_numpy(), expected, rtol=0, atol=1e-9)
    bacc = balanced_accuracy_score(data["test"]["label"], expected.argmax(1))
    assert json.loads((run_dir / "test_metrics.json").read_text())["balanced_accuracy"] == pytest.approx(bacc)
    cells = _ham_cells(out)
    assert cells[(rt.HAM10000_MINI_ROWS[0][0], "B-ACC ↑ [95% CI]")]["value"] == pytest.approx(bacc)


@pytest.mark.slow
def test_ham10000_mini_collect_only_reads_agreement_and_scores_runs_trained_elsewhere(ham_results, tmp_path):
    from skinclip.run_calibration import CALIBRATION_FILE

    out, _ = ham_results
    copy = tmp_path / "results"
    shutil.copytree(out / "runs", copy / "runs")
    shutil.copytree(out / "tiny", copy / "tiny")
    metrics_file = copy / "runs" / "ham10000_mini_full_cfa" / "test_metrics.json"
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), rt.RATIONALE_AGREEMENT_KEY: 0.625}))
    # A run trained elsewhere: predictions only; --collect-only scores its calibration from them.
    (copy / "runs" / "ham10000_mini_probe" / CALIBRATION_FILE).unlink()
    shutil.rmtree(copy / "runs" / "ham10000_mini_ce_only")
    assert rt.main(["ham10000_mini", "--out", str(copy), "--tiny", "--collect-only"]) == 0
    header, rows = _markdown_rows((copy / "ham10000_mini.md").read_text())
    column = header.index("Rationale agreement") - 1
    assert rows["(c) Full CFA"][column] == "0.625"
    assert rows["(d) Full CFA, no metadata in the prompt"][column] == "—"
    assert rows["(b) CE only"][0] == "not run"
    recomputed = json.loads((copy / "runs" / "ham10000_mini_probe" / CALIBRATION_FILE).read_text())
    original = json.loads((out / "runs" / "ham10000_mini_probe" / CALIBRATION_FILE).read_text())
    assert recomputed == original
    assert not (copy / "runs" / "ham10000_mini_ce_only").exists()


def test_ham10000_mini_needs_its_base_config_only_when_run(tmp_path, monkeypatch):
    """Without configs/ham10000_mini.yaml (or with it) the other tables plan as before; the rows get own keys."""
    plan = rt.Plan(out=tmp_path)
    canonical = rt.canonical_runs(plan)
    for name in rt.runs_of("ham10000_mini"):
        assert canonical[name] == name
    assert canonical["ablation_full_cfa"] == "skinclip_isic2019"
    tiny = rt.Plan(out=tmp_path, tiny=True, tiny_bases=str(tmp_path / "bases"), data={"ham10000_mini": "/d"})
    argv = rt.command_line(rt.RUNS["ham10000_mini_no_metadata"], tiny)
    written = yaml.safe_load(Path(argv[0]).read_text())
    assert written["use_metadata"] is False and written["lambda_align"] == 0.5 and written["text_encoder"] == "decoder"
    assert '--dataset_path="/d"' in argv
