"""Regenerate the paper's tables, one command per table: train/evaluate every run, then write one Markdown table
in the paper's layout with the paper's numbers and the difference beside each measured one.

    python reproduce_tables.py table1 --out results/            # Table I: baselines + SkinCLIP-VL, 3 data sets
    python reproduce_tables.py ablation --out results/          # Table II: CE → +focal → +align / +cal → full CFA
    python reproduce_tables.py lambda3 --out results/           # Fig. 3: lambda_3 in {0.1, 0.25, 0.5, 1.0}
    python reproduce_tables.py data_efficiency --out results/   # Table III: 100% vs 12% of the ISIC 2019 train split
    python reproduce_tables.py all --out results/ --tiny        # every table, tiny random bases on demo data (CPU)
    python reproduce_tables.py ham10000_mini --out results/     # not a paper table: probe / CE / CFA / no metadata

Every run writes its own directory ``<out>/runs/<run>/`` (the files of ``train.py``: ``test_metrics.json``,
``test_predictions.csv``, ...; plus ``ood_metrics.json`` for runs trained on ISIC 2019, scored on ISIC 2024 by
`skinclip.baselines.ood`). The tables are read from those files only, never recomputed: ``<out>/<table>.md`` and
``<out>/<table>.json`` (each cell with its value, the paper's, the difference and the file it came from). A run
whose files are missing is shown as "not run", one that failed as "failed", a paper row this project does not
reproduce as "—". Finished runs are reused (``--force`` reruns them); runs whose resolved settings are identical
(``ablations/full_cfa.yaml``, ``ablations/lambda_gen_0.5.yaml`` and ``isic2019.yaml``) are trained once.
``--collect-only`` only rebuilds the tables from existing run directories (e.g. after training on a cluster).
See REPRODUCING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from skinclip.errors import UserError
from skinclip.output_folder import OutputFolder, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/, train.py
PAPER_NUMBERS = REPO_ROOT / "configs" / "tables" / "paper_numbers.yaml"
TABLES = ("table1", "ablation", "lambda3", "data_efficiency")  # the paper's; `all` runs these
EXTRA_TABLES = ("ham10000_mini",)  # this project's own comparisons, on other data than the paper's
METRICS = (("balanced_accuracy", "B-ACC ↑"), ("auroc_macro", "AUROC ↑"), ("ece", "ECE ↓"))
DATASET_LABELS = {"isic2019": "ISIC 2019", "derm7pt": "Derm7pt", "isic2024": "ISIC 2024 (OOD)"}
# Fields that name where a run writes, not what it computes: left out when deciding that two runs are the same.
_NOT_IN_RUN_KEY = {"output_dir", "run_name", "logging_dir", "hub_model_id"}
# --tiny: a same-family tiny timm model per paper baseline (random weights, no download).
TINY_TIMM_MODELS = {"efficientnet": "test_efficientnet", "resnet": "test_resnet", "convnext": "test_convnext"}
TINY_DEMO = {"num_per_class": 12, "image_size": 32}
TINY_DEMO_SEEDS = {"isic2019": 0, "derm7pt": 1, "isic2024": 2, "ham10000_mini": 3}
# The key under which a run's test_metrics.json holds the rationale-agreement score (ham10000_mini table).
RATIONALE_AGREEMENT_KEY = "rationale_agreement"
WALL_TIME_FILE = "wall_time.json"  # the runner's wall clock around a run's entry point

logger = logging.getLogger("skinclip.reproduce")


@dataclass(frozen=True)
class Run:
    """One training/evaluation: which entry point, which config, which data set it is trained and tested on."""

    name: str
    # "skinclip" (train.py), "timm" (skinclip.baselines.timm_finetune), "zero_shot" (skinclip.baselines.zero_shot_clip)
    runner: str
    config: str  # relative to the repository
    dataset: str  # "isic2019" or "derm7pt"
    ood: bool = False  # also scored on ISIC 2024 (runs trained on ISIC 2019)
    # Temperature scaling + bootstrap CIs from the run's prediction files (skinclip.run_calibration).
    calibrate: bool = False
    # --tiny: (the base config its `extends` chain reaches, the stand-in read in its place).
    tiny_base: tuple[str, str] | None = None


RUNS = {
    run.name: run
    for run in [
        Run("skinclip_isic2019", "skinclip", "configs/isic2019.yaml", "isic2019", ood=True),
        Run("skinclip_derm7pt", "skinclip", "configs/derm7pt.yaml", "derm7pt"),
        Run(
            "efficientnet_b4_isic2019", "timm", "configs/baselines/efficientnet_b4_isic2019.yaml", "isic2019", ood=True
        ),
        Run("efficientnet_b4_derm7pt", "timm", "configs/baselines/efficientnet_b4_derm7pt.yaml", "derm7pt"),
        Run("resnet34_isic2019", "timm", "configs/baselines/resnet34_isic2019.yaml", "isic2019", ood=True),
        Run("resnet34_derm7pt", "timm", "configs/baselines/resnet34_derm7pt.yaml", "derm7pt"),
        Run("convnext_base_isic2019", "timm", "configs/baselines/convnext_base_isic2019.yaml", "isic2019", ood=True),
        Run("convnext_base_derm7pt", "timm", "configs/baselines/convnext_base_derm7pt.yaml", "derm7pt"),
        Run(
            "zero_shot_clip_isic2019",
            "zero_shot",
            "configs/baselines/zero_shot_clip_isic2019.yaml",
            "isic2019",
            ood=True,
        ),
        Run("zero_shot_clip_derm7pt", "zero_shot", "configs/baselines/zero_shot_clip_derm7pt.yaml", "derm7pt"),
        *[
            Run(f"ablation_{name}", "skinclip", f"configs/ablations/{name}.yaml", "isic2019", ood=True)
            for name in ("ce_only", "focal", "focal_align", "focal_cal", "full_cfa")
        ],
        *[
            Run(f"lambda_gen_{value}", "skinclip", f"configs/ablations/lambda_gen_{value}.yaml", "isic2019", ood=True)
            for value in ("0.1", "0.25", "0.5", "1.0")
        ],
        Run("skinclip_isic2019_train12", "skinclip", "configs/isic2019_train12.yaml", "isic2019", ood=True),
        Run(
            "efficientnet_b4_isic2019_train12",
            "timm",
            "configs/baselines/efficientnet_b4_isic2019_train12.yaml",
            "isic2019",
            ood=True,
        ),
        *[
            Run(
                f"ham10000_mini_{name}",
                "probe" if name == "probe" else "skinclip",
                f"configs/tables/ham10000_mini/{name}.yaml",
                "ham10000_mini",
                calibrate=True,
                tiny_base=("configs/ham10000_mini.yaml", "configs/tables/ham10000_mini/tiny_base.yaml"),
            )
            for name in ("probe", "ce_only", "full_cfa", "no_metadata")
        ],
    ]
}

# Table I rows: (group heading, [(row label, key in paper_numbers.yaml or None, {dataset: run name})]).
TABLE1_ROWS = [
    (
        'Image models (the paper\'s heading: "Multimodal Models")',
        [
            (
                "EfficientNet-B4",
                "EfficientNet-B4",
                {"isic2019": "efficientnet_b4_isic2019", "derm7pt": "efficientnet_b4_derm7pt"},
            ),
            ("ResNet-34", "ResNet-34", {"isic2019": "resnet34_isic2019", "derm7pt": "resnet34_derm7pt"}),
            (
                "ConvNeXt-Base",
                "ConvNeXt-Base",
                {"isic2019": "convnext_base_isic2019", "derm7pt": "convnext_base_derm7pt"},
            ),
            ("CaFormer-B36", "CaFormer-B36", {}),
            ("HEALNet", "HEALNet", {}),
        ],
    ),
    (
        "Vision-Language Models",
        [
            (
                "Zero-shot CLIP ViT-L/14 (this project)",
                None,
                {"isic2019": "zero_shot_clip_isic2019", "derm7pt": "zero_shot_clip_derm7pt"},
            ),
            ("MedCLIP", "MedCLIP", {}),
            ("Qwen2.5-VL-7B", "Qwen2.5-VL-7B", {}),
            ("LLaVA-Med-7B", "LLaVA-Med-7B", {}),
            ("SkinVL-MM", "SkinVL-MM", {}),
            ("InternVL2.5-8B", "InternVL2.5-8B", {}),
            ("SkinGPT-4", "SkinGPT-4", {}),
            ("SkinCLIP-VL (Ours)", "SkinCLIP-VL", {"isic2019": "skinclip_isic2019", "derm7pt": "skinclip_derm7pt"}),
        ],
    ),
]
ABLATION_ROWS = [
    ("Baseline (CE loss)", "ce_only", "ablation_ce_only"),
    ("+ L_focal", "focal", "ablation_focal"),
    ("+ L_focal + L_align", "focal_align", "ablation_focal_align"),
    ("+ L_focal + L_cal", "focal_cal", "ablation_focal_cal"),
    ("+ L_CFA (full)", "full_cfa", "ablation_full_cfa"),
]
LAMBDA3_ROWS = [(f"λ3 = {value}", value, f"lambda_gen_{value}") for value in ("0.1", "0.25", "0.5", "1.0")]
DATA_EFFICIENCY_ROWS = [
    ("EfficientNet-B4", "EfficientNet-B4", "efficientnet_b4_isic2019", "efficientnet_b4_isic2019_train12"),
    ("SkinGPT-4", "SkinGPT-4", None, None),
    ("SkinCLIP-VL", "SkinCLIP-VL", "skinclip_isic2019", "skinclip_isic2019_train12"),
]
# ham10000_mini rows: (label, run, paper numbers as (column, path in paper_numbers.yaml)). The paper has no
# linear probe and no metadata ablation; its CE-only row exists only on ISIC 2024 (OOD, Table II).
PAPER_ISIC2019 = "Paper, ISIC 2019 (Table I)"
PAPER_ISIC2024 = "Paper, ISIC 2024 OOD (Table II)"
HAM10000_MINI_ROWS = [
    ("(a) Linear probe, frozen features", "ham10000_mini_probe", {}),
    ("(b) CE only", "ham10000_mini_ce_only", {PAPER_ISIC2024: ("ablation", "ce_only", "isic2024")}),
    (
        "(c) Full CFA",
        "ham10000_mini_full_cfa",
        {
            PAPER_ISIC2019: ("table1", "SkinCLIP-VL", "isic2019"),
            PAPER_ISIC2024: ("ablation", "full_cfa", "isic2024"),
        },
    ),
    ("(d) Full CFA, no metadata in the prompt", "ham10000_mini_no_metadata", {}),
]


def runs_of(table: str) -> list[str]:
    if table == "table1":
        return [name for _, rows in TABLE1_ROWS for _, _, runs in rows for name in runs.values()]
    if table == "ablation":
        return [run for _, _, run in ABLATION_ROWS]
    if table == "lambda3":
        return [run for _, _, run in LAMBDA3_ROWS]
    if table == "data_efficiency":
        return [name for *_, full, small in DATA_EFFICIENCY_ROWS for name in (full, small) if name]
    if table == "ham10000_mini":
        return [run for _, run, _ in HAM10000_MINI_ROWS]
    raise ValueError(f"unknown table {table!r}; choose from {TABLES + EXTRA_TABLES}")


# --------------------------------------------------------------------------------------------------------
# Planning: the exact arguments of every run
# --------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the runs need that is not in their configs: data locations, --tiny settings, launcher."""

    out: Path
    tiny: bool = False
    data: dict[str, str] = field(default_factory=dict)  # dataset → DatasetDict path (overrides the configs)
    ood_split: str = "test"
    tiny_bases: str | None = None

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def overrides(self, run: Run, resolved: dict) -> dict:
        """--field=value settings of ``run`` on top of its config (data paths, OOD set, --tiny sizes)."""
        values: dict = {}
        if run.dataset in self.data:
            values.update(dataset_path=self.data[run.dataset], demo_dataset=False)
        if run.ood and run.runner != "skinclip":
            values.update(ood_dataset_path=self.data.get("isic2024", "data/isic2024"), ood_split=self.ood_split)
        if self.tiny:
            values.update(tiny_overrides(run, resolved, self.tiny_bases))
        return values


def tiny_overrides(run: Run, resolved: dict, tiny_bases: str | None) -> dict:
    """Swap a run to tiny random bases, few steps and float32 on CPU; the data paths come from the Plan."""
    if run.runner == "skinclip":
        return dict(
            tiny_bases_dir=tiny_bases,
            quantization="none",
            compute_dtype="float32",
            bf16=False,
            use_cpu=True,
            num_train_epochs=2,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=16,
            lora_r=4,
            lora_alpha=8,
            focal_dim=16,
            alignment_dim=8,
            max_rationale_tokens=24,
            save_strategy="no",
            eval_strategy="no",
            load_best_model_at_end=False,
            activation_checkpointing=False,
            dataloader_num_workers=0,
            logging_steps=1,
            report_to="none",
            warmup_steps=0,
            augment=False,
        )
    if run.runner == "timm":
        family = next(
            (
                tiny
                for prefix, tiny in TINY_TIMM_MODELS.items()
                if str(resolved.get("model_name", "")).startswith(prefix)
            ),
            "test_resnet",
        )
        return dict(
            model_name=family,
            pretrained=False,
            image_size=32,
            num_train_epochs=1,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=16,
            dataloader_num_workers=0,
            device="cpu",
            bf16=False,
            select_best=False,
        )
    if run.runner == "zero_shot":
        return dict(tiny_bases_dir=tiny_bases, device="cpu", per_device_eval_batch_size=16)
    if run.runner == "probe":
        return dict(
            tiny_bases_dir=tiny_bases,
            quantization="none",
            compute_dtype="float32",
            device="cpu",
            per_device_eval_batch_size=16,
            probe_c_grid=[0.01, 1.0],
            probe_cv_folds=3,
        )
    raise ValueError(f"unknown runner {run.runner!r}")


def load_config_with_stand_in(path: Path, base: Path, stand_in: Path) -> dict:
    """A config whose ``extends`` chain reaches ``base``, read with ``stand_in`` in its place (--tiny)."""
    from skinclip.run_io import load_yaml_config, read_yaml

    values = read_yaml(path.read_text()) or {}
    parent = values.pop("extends", None)
    if not parent:
        return values
    parent_path = (path.parent / parent).resolve()
    if parent_path == base.resolve():
        inherited = load_yaml_config(stand_in)
    else:
        inherited = load_config_with_stand_in(parent_path, base, stand_in)
    return {**inherited, **values}


def resolved_settings(run: Run, plan: Plan) -> tuple[dict, dict]:
    """(the config with its ``extends`` chain read, the overrides the plan adds)."""
    from skinclip.run_io import load_yaml_config

    if plan.tiny and run.tiny_base:
        base, stand_in = run.tiny_base
        resolved = load_config_with_stand_in(REPO_ROOT / run.config, REPO_ROOT / base, REPO_ROOT / stand_in)
    else:
        resolved = load_yaml_config(REPO_ROOT / run.config)
    return resolved, plan.overrides(run, resolved)


def run_key(run: Run, plan: Plan) -> str:
    """What a run computes: runner + resolved settings, without where it writes. Equal keys → one training.

    A run whose config cannot be read (a base config not yet written) gets a key of its own: it is merged with
    no other run, and running it fails with the reason in its error.txt.
    """
    try:
        resolved, overrides = resolved_settings(run, plan)
    except FileNotFoundError as error:
        return json.dumps({"runner": run.runner, "config": run.config, "unreadable": str(error)}, sort_keys=True)
    settings = {k: v for k, v in {**resolved, **overrides}.items() if k not in _NOT_IN_RUN_KEY}
    return json.dumps({"runner": run.runner, "settings": settings, "ood": run.ood}, sort_keys=True, default=str)


def canonical_runs(plan: Plan) -> dict[str, str]:
    """Run name → the name of the first run (in RUNS order) that computes the same thing."""
    first_of_key: dict[str, str] = {}
    canonical = {}
    for name, run in RUNS.items():
        canonical[name] = first_of_key.setdefault(run_key(run, plan), name)
    return canonical


def command_line(run: Run, plan: Plan) -> list[str]:
    """The arguments after the entry point: ``config.yaml --field=value ...`` (values written as YAML).

    Under --tiny a run with a stand-in base reads its resolved config from ``<out>/tiny/configs/<run>.yaml``
    (written here), since the entry point would follow the real ``extends`` chain.
    """
    resolved, overrides = resolved_settings(run, plan)
    overrides["output_dir"] = str(plan.run_dir(run.name))
    config = REPO_ROOT / run.config
    if plan.tiny and run.tiny_base:
        config = plan.out / "tiny" / "configs" / f"{run.name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f"# --tiny: {run.config} with {run.tiny_base[0]} replaced by {run.tiny_base[1]}\n"
            + yaml.safe_dump(resolved, sort_keys=False)
        )
    return [str(config)] + [f"--{key}={json.dumps(value)}" for key, value in overrides.items()]


# --------------------------------------------------------------------------------------------------------
# Executing
# --------------------------------------------------------------------------------------------------------


ENTRY_POINTS = {
    "skinclip": ("skinclip.training", "train.py"),
    "timm": ("skinclip.baselines.timm_finetune", None),
    "zero_shot": ("skinclip.baselines.zero_shot_clip", None),
    "probe": ("skinclip.baselines.linear_probe", None),
}
CALIBRATION_BOOTSTRAP = {False: 1000, True: 100}  # resamples of the CIs: full runs, --tiny


def required_files(run: Run) -> list[str]:
    from skinclip.run_calibration import CALIBRATION_FILE

    return (
        ["test_metrics.json"]
        + (["ood_metrics.json"] if run.ood else [])
        + ([CALIBRATION_FILE] if run.calibrate else [])
    )


def is_complete(run: Run, plan: Plan) -> bool:
    run_dir = plan.run_dir(run.name)
    key_file = run_dir / "run_key.json"
    return (
        key_file.is_file()
        and key_file.read_text() == run_key(run, plan)
        and all((run_dir / name).is_file() for name in required_files(run))
    )


def execute(run: Run, plan: Plan, launcher: str) -> None:
    """Train/evaluate ``run`` into its directory, then (SkinCLIP-VL on ISIC 2019) score the OOD set."""
    import importlib

    module_name, script = ENTRY_POINTS[run.runner]
    argv = command_line(run, plan)
    if run.runner == "skinclip":
        # The runner owns its run folders and reruns a stale or failed run in place: train.py then replaces that
        # run's earlier outputs (and keeps command.txt); it refuses a non-empty output_dir otherwise.
        argv.append("--overwrite_output_dir=true")
    run_dir = plan.run_dir(run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    (run_dir / "command.txt").write_text(" ".join([module_name] + argv) + "\n")
    (run_dir / WALL_TIME_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    if launcher == "inprocess":
        importlib.import_module(module_name).main(argv)
    else:
        if launcher == "accelerate" and run.runner == "skinclip":
            prefix = ["accelerate", "launch", str(REPO_ROOT / script)]
        else:
            prefix = [sys.executable, str(REPO_ROOT / script)] if script else [sys.executable, "-m", module_name]
        subprocess.run(prefix + argv, check=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    # Under the run folder's lock once train.py has released it: its manifest then lists the OOD files too, so
    # that a rerun's --overwrite_output_dir replaces them rather than refusing a folder it did not write.
    with OutputFolder(run_dir, "reproduce_tables.py"):
        atomic_write_text(
            run_dir / WALL_TIME_FILE,
            json.dumps(
                {"seconds": round(seconds, 1), "measured": "the entry point's call, start to end", "launcher": launcher}
            ),
        )
        if run.calibrate:
            from skinclip.run_calibration import calibrate_run

            calibrate_run(run_dir, n_bootstrap=CALIBRATION_BOOTSTRAP[plan.tiny])
        if run.ood and run.runner == "skinclip":
            from skinclip.baselines.ood import evaluate_skinclip_checkpoint

            evaluate_skinclip_checkpoint(run_dir, plan.data.get("isic2024", "data/isic2024"), plan.ood_split, run_dir)
        atomic_write_text(run_dir / "run_key.json", run_key(run, plan))


def prepare_tiny(plan: Plan) -> None:
    """Tiny random bases and three demo data sets (ISIC 2019 / Derm7pt stand-ins, a binary OOD stand-in)."""
    from datasets import concatenate_datasets, load_from_disk

    from datasets_scripts.demo import build_demo_dataset
    from skinclip.baselines.ood import binary_dataset_from
    from skinclip.labels import MALIGNANT_CLASSES
    from skinclip.tiny_bases import build_tiny_bases

    root = plan.out / "tiny"
    plan.tiny_bases = str(root / "bases")
    build_tiny_bases(plan.tiny_bases, ("clip", "open_clip", "decoder-qwen2_5_vl"))
    for dataset, seed in TINY_DEMO_SEEDS.items():
        path = root / "data" / dataset
        if dataset == "isic2024":
            # ISIC 2024 stand-in: a fresh demo draw, every split, MEL/BCC (the demo's malignant classes) → malignant.
            if not (path / "dataset_dict.json").is_file():
                source = root / "data" / "isic2024-source"
                build_demo_dataset(seed=seed, output_dir=str(source), **TINY_DEMO)
                splits = list(load_from_disk(str(source)))
                binary = binary_dataset_from(source, root / "data" / "isic2024-splits", MALIGNANT_CLASSES, splits)
                from datasets import DatasetDict

                DatasetDict({"test": concatenate_datasets([binary[s] for s in splits])}).save_to_disk(str(path))
        elif not (path / "dataset_dict.json").is_file():
            build_demo_dataset(seed=seed, output_dir=str(path), **TINY_DEMO)
        plan.data.setdefault(dataset, str(path))


def run_all(names: list[str], plan: Plan, launcher: str, force: bool = False, collect_only: bool = False) -> dict:
    """Execute the canonical run of each name (once per key); return {run name: status, dir, seconds}."""
    canonical = canonical_runs(plan)
    statuses: dict[str, dict] = {}
    done: dict[str, dict] = {}
    for name in names:
        target = canonical[name]
        if target not in done:
            run = RUNS[target]
            started = time.time()
            if collect_only:  # files trained elsewhere (other paths, a cluster): their presence is enough
                run_dir = plan.run_dir(target)
                if run.calibrate:
                    calibrate_collected(run_dir, plan)
                status = "reused" if all((run_dir / f).is_file() for f in required_files(run)) else "not run"
            elif is_complete(run, plan) and not force:
                status = "reused"
            else:
                try:
                    logger.info("running %s", target)
                    execute(run, plan, launcher)
                    status = "ran"
                except Exception as error:  # one failed run must not lose the others' results
                    logger.exception("run %s failed", target)
                    (plan.run_dir(target)).mkdir(parents=True, exist_ok=True)
                    (plan.run_dir(target) / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
                    status = "failed"
            done[target] = {"status": status, "seconds": round(time.time() - started, 1)}
        statuses[name] = {**done[target], "dir": str(plan.run_dir(target)), "same_as": target}
    return statuses


def calibrate_collected(run_dir: Path, plan: Plan) -> None:
    """--collect-only: a run trained elsewhere has predictions but no test_calibration.json yet; compute it
    from those files (no model is run: temperature scaling and bootstrap on the written probabilities)."""
    from skinclip.run_calibration import CALIBRATION_FILE, calibrate_run

    predictions = [run_dir / f"{split}_predictions.csv" for split in ("validation", "test")]
    if not (run_dir / CALIBRATION_FILE).is_file() and all(path.is_file() for path in predictions):
        calibrate_run(run_dir, n_bootstrap=CALIBRATION_BOOTSTRAP[plan.tiny])


# --------------------------------------------------------------------------------------------------------
# Reading results and writing tables
# --------------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path, which: str) -> tuple[dict | None, Path]:
    """``which`` is "test" or "ood"; returns (metrics or None, the file)."""
    from skinclip.validation import read_json_file

    path = run_dir / f"{which}_metrics.json"
    return (read_json_file(path, "metrics file") if path.is_file() else None), path


def trainable_parameters(run_dir: Path) -> int | None:
    """From the run's files: run_info.json (baselines) or the trained tensors in model.safetensors (SkinCLIP-VL)."""
    info = run_dir / "run_info.json"
    if info.is_file():
        from skinclip.validation import read_json_file

        count = read_json_file(info, "run info").get("trainable_parameters")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise UserError(f"{info}: trainable_parameters must be an integer >= 0, got {count!r}")
        return count
    weights = run_dir / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return sum(_product(handle.get_slice(key).get_shape()) for key in handle.keys())
    return None


def _product(shape) -> int:
    result = 1
    for size in shape:
        result *= int(size)
    return result


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if metric == "balanced_accuracy" else f"{value:.3f}"


def format_diff(metric: str, diff: float) -> str:
    return f"{100 * diff:+.1f} pp" if metric == "balanced_accuracy" else f"{diff:+.3f}"


def format_count(count: int | None) -> str:
    if count is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


class TableBuilder:
    """Collects cells (value, paper value, difference, source file) and renders Markdown + JSON."""

    LEGEND = (
        "Each cell: measured (paper, measured − paper); `not run`: no evaluation file yet; `—`: not "
        "reproduced by this project or not reported by the paper."
    )

    def __init__(
        self,
        table: str,
        title: str,
        columns: list[str],
        statuses: dict,
        plan: Plan,
        notes: list[str] | None = None,
    ):
        self.table, self.title, self.columns, self.statuses, self.plan = table, title, columns, statuses, plan
        self.notes = [self.LEGEND] if notes is None else notes  # paragraphs between the title and the table
        self.rows: list[tuple[str, list[str]] | str] = []
        self.cells: list[dict] = []
        self.footer: list[str] = []  # paragraphs under the table
        self.extra: dict = {}  # more keys for <table>.json

    def run_state(self, name: str | None) -> tuple[str, Path | None]:
        """("ok"|"not run"|"failed"|"not reproduced", directory)."""
        if name is None:
            return "not reproduced", None
        status = self.statuses.get(name)
        run_dir = Path(status["dir"]) if status else self.plan.run_dir(canonical_runs(self.plan)[name])
        if status and status["status"] == "failed":
            return "failed", run_dir
        return "ok", run_dir

    def metric_cell(self, row: str, column: str, run: str | None, which: str, metric: str, paper: float | None) -> str:
        state, run_dir = self.run_state(run)
        value, source = None, None
        if state == "ok":
            metrics, source = read_metrics(run_dir, which)
            if metrics is None or metrics.get(metric) is None:
                state = "not run"
            else:
                value = float(metrics[metric])
        return self.add_cell(row, column, metric, value, paper, state, source)

    def add_cell(self, row, column, metric, value, paper, state, source) -> str:
        diff = value - paper if value is not None and paper is not None else None
        self.cells.append(
            dict(
                row=row,
                column=column,
                metric=metric,
                value=value,
                paper=paper,
                diff=diff,
                status=state,
                source=str(source) if source else None,
            )
        )
        paper_text = format_value(metric, paper)
        if value is None:
            return f"{'—' if state == 'not reproduced' else state} ({paper_text})"
        return (
            f"{format_value(metric, value)} ({paper_text}, {format_diff(metric, diff)})"
            if diff is not None
            else f"{format_value(metric, value)} (—)"
        )

    def add_row(self, label: str, cells: list[str]) -> None:
        self.rows.append((label, cells))

    def add_group(self, heading: str) -> None:
        self.rows.append(heading)

    def write(self) -> str:
        lines = [f"## {self.title}", ""]
        for note in self.notes:
            lines += [note, ""]
        lines += [
            "| " + " | ".join(["Model"] + self.columns) + " |",
            "|" + "---|" * (len(self.columns) + 1),
        ]
        for row in self.rows:
            if isinstance(row, str):
                lines.append(f"| **{row}** |" + " |" * len(self.columns))
            else:
                lines.append("| " + " | ".join([row[0]] + row[1]) + " |")
        for paragraph in self.footer:
            lines += ["", paragraph]
        markdown = "\n".join(lines) + "\n"
        self.plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.plan.out / f"{self.table}.md", markdown)
        atomic_write_text(
            self.plan.out / f"{self.table}.json",
            json.dumps(
                {
                    "table": self.table,
                    "title": self.title,
                    "columns": self.columns,
                    "tiny": self.plan.tiny,
                    "cells": self.cells,
                    "runs": self.statuses,
                    **self.extra,
                },
                indent=2,
            ),
        )
        return markdown


def metric_columns(dataset_label: str) -> list[str]:
    return [f"{dataset_label} {label}" for _, label in METRICS]


def build_table1(paper: dict, statuses: dict, plan: Plan) -> str:
    datasets = ("isic2019", "derm7pt", "isic2024")
    columns = ["Params (paper)", "Trainable params (run)"] + [
        c for d in datasets for c in metric_columns(DATASET_LABELS[d])
    ]
    table = TableBuilder(
        "table1", "Table I: performance on ISIC 2019, Derm7pt and ISIC 2024 (OOD)", columns, statuses, plan
    )
    for heading, rows in TABLE1_ROWS:
        table.add_group(heading)
        for label, paper_key, runs in rows:
            reported = paper["table1"].get(paper_key, {}) if paper_key else {}
            state, run_dir = table.run_state(runs.get("isic2019"))
            cells = [
                str(reported.get("params", "—")),
                format_count(trainable_parameters(run_dir)) if state == "ok" and run_dir else "—",
            ]
            for dataset in datasets:
                run = runs.get("isic2019" if dataset == "isic2024" else dataset)
                which = "ood" if dataset == "isic2024" else "test"
                values = reported.get(dataset) or [None] * len(METRICS)
                for (metric, metric_label), paper_value in zip(METRICS, values):
                    cells.append(
                        table.metric_cell(
                            label, f"{DATASET_LABELS[dataset]} {metric_label}", run, which, metric, paper_value
                        )
                    )
            table.add_row(label, cells)
    return table.write()


def _per_run_table(name: str, title: str, rows, paper_rows: dict, statuses: dict, plan: Plan) -> str:
    """Ablation / lambda_3 layout: ISIC 2024 (OOD) columns as in the paper, then ISIC 2019 test (not in the paper)."""
    blocks = (("isic2024", "ood", DATASET_LABELS["isic2024"]), ("isic2019", "test", "ISIC 2019 test"))
    columns = [c for _, _, label in blocks for c in metric_columns(label)]
    table = TableBuilder(name, title, columns, statuses, plan)
    for label, paper_key, run in rows:
        reported = paper_rows.get(paper_key, {})
        cells = []
        for dataset, which, block_label in blocks:
            values = reported.get(dataset) or [None] * len(METRICS)
            for (metric, metric_label), paper_value in zip(METRICS, values):
                cells.append(table.metric_cell(label, f"{block_label} {metric_label}", run, which, metric, paper_value))
        table.add_row(label, cells)
    return table.write()


def build_data_efficiency(paper: dict, statuses: dict, plan: Plan) -> str:
    columns = ["Train-100%", "Train-12%", "Drop"]
    table = TableBuilder(
        "data_efficiency",
        "Table III: data efficiency, B-ACC on ISIC 2024 (OOD), trained on ISIC 2019",
        columns,
        statuses,
        plan,
    )
    metric = "balanced_accuracy"
    for label, paper_key, full, small in DATA_EFFICIENCY_ROWS:
        reported = paper["data_efficiency"].get(paper_key, {})
        full_cell = table.metric_cell(label, "Train-100%", full, "ood", metric, reported.get("train100"))
        small_cell = table.metric_cell(label, "Train-12%", small, "ood", metric, reported.get("train12"))
        full_value, small_value = table.cells[-2]["value"], table.cells[-1]["value"]
        drop = small_value - full_value if full_value is not None and small_value is not None else None
        state = "ok" if drop is not None else ("not reproduced" if full is None else "not run")
        drop_cell = table.add_cell(label, "Drop", metric, drop, reported.get("drop"), state, None)
        table.add_row(label, [full_cell, small_cell, drop_cell])
    return table.write()


HAM10000_MINI_METRICS = [
    # (column, metric, report of test_calibration.json holding the value's CI, value read from test_metrics.json)
    ("B-ACC ↑ [95% CI]", "balanced_accuracy", "uncalibrated", True),
    ("Macro AUROC ↑ [95% CI]", "auroc_macro", "uncalibrated", True),
    ("ECE-15 ↓ before TS [95% CI]", "ece", "uncalibrated", True),
    ("ECE-15 ↓ after TS [95% CI]", "ece", "calibrated", False),
]
HAM10000_MINI_COLUMNS = [c for c, *_ in HAM10000_MINI_METRICS] + [
    "T (fitted on validation)",
    "Wall time (s)",
    "Rationale agreement",
    PAPER_ISIC2019,
    PAPER_ISIC2024,
]
# Settings shown per trained row (what differs between rows, and the shared budget).
ROW_SETTINGS = ("focal_gamma", "focal_alpha", "lambda_align", "lambda_cal", "lambda_gen", "use_metadata")
BUDGET_SETTINGS = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "seed",
    "load_best_model_at_end",  # true: the validation split also chose the epoch (the probe never sees it)
)


def _field_default(name: str):
    """train.py's default of a field a config leaves out (e.g. ``use_metadata``)."""
    from dataclasses import MISSING, fields

    from skinclip.training import ModelArguments
    from trainer_cfa import CFATrainingArguments

    for cls in (ModelArguments, CFATrainingArguments):
        for item in fields(cls):
            if item.name == name:
                return item.default if item.default is not MISSING else item.default_factory()
    return None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _settings_of(run_name: str, plan: Plan) -> dict | None:
    """The run's resolved config plus the plan's overrides; None when its config cannot be read."""
    try:
        resolved, overrides = resolved_settings(RUNS[run_name], plan)
    except FileNotFoundError:
        return None
    return {**resolved, **overrides}


def _with_ci(metric: str, value: float, ci: list | None) -> str:
    text = format_value(metric, value)
    if not ci or any(v is None for v in ci):
        return text
    if metric == "balanced_accuracy":
        return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _paper_triple(paper: dict, path: tuple[str, str, str] | None) -> str:
    if path is None:
        return "—"
    section, key, dataset = path
    bacc, auroc, ece = paper[section][key][dataset]
    return f"{100 * bacc:.1f}% / {auroc:.3f} / {ece:.3f}"


def _budget_note(trained: list[str], plan: Plan) -> str:
    settings = {name: _settings_of(name, plan) for name in trained}
    readable = {name: values for name, values in settings.items() if values is not None}
    if not readable:
        return "Training budget: the row configs cannot be read yet (see each run's error.txt)."
    budgets = {
        name: {k: values.get(k, _field_default(k)) for k in BUDGET_SETTINGS} for name, values in readable.items()
    }
    first = next(iter(budgets.values()))
    if all(budget == first for budget in budgets.values()) and len(readable) == len(trained):
        shown = ", ".join(f"{k} = {v}" for k, v in first.items() if v is not None)
        return f"Training budget, the same for every trained row (b)-(d): {shown}."
    rows = "; ".join(f"{name}: {budget}" for name, budget in budgets.items())
    return f"Training budget: **the rows differ** ({rows})."


def _probe_note(run_name: str, plan: Plan, run_dir: Path | None) -> str:
    info = _read_json(run_dir / "run_info.json") if run_dir else None
    if info:
        return (
            f"(a): {info['features']}; StandardScaler + LogisticRegression(class_weight=balanced), C = "
            f"{info['chosen_c']:g} chosen from {info['c_grid']} by {info['cv']} (train split only)."
        )
    settings = _settings_of(run_name, plan) or {}
    from skinclip.baselines.linear_probe import ProbeArguments

    grid = settings.get("probe_c_grid", ProbeArguments().probe_c_grid)
    folds = settings.get("probe_cv_folds", ProbeArguments.probe_cv_folds)
    return f"(a): C from {grid} by {folds}-fold cross-validation on the train split only (not run yet)."


def build_ham10000_mini(paper: dict, statuses: dict, plan: Plan) -> str:
    """The linear probe, CE only, full CFA and full CFA without metadata, all on the converted ham10000-mini."""
    from skinclip.run_calibration import CALIBRATION_FILE

    table = TableBuilder(
        "ham10000_mini",
        "ham10000-mini: linear probe, CE only, full CFA, full CFA without metadata (this project; not a paper table)",
        list(HAM10000_MINI_COLUMNS),
        statuses,
        plan,
        notes=[],
    )
    bacc: dict[str, tuple[float, list | None]] = {}
    num_images: set[int] = set()
    row_settings = []
    for label, run, paper_paths in HAM10000_MINI_ROWS:
        state, run_dir = table.run_state(run)
        metrics = _read_json(run_dir / "test_metrics.json") if state == "ok" else None
        calibration = _read_json(run_dir / CALIBRATION_FILE) if state == "ok" else None
        if state == "ok" and (metrics is None or calibration is None):
            state = "not run"
        cells = []
        for column, metric, report, from_metrics in HAM10000_MINI_METRICS:
            if state != "ok":
                table.add_cell(label, column, metric, None, None, state, None)
                cells.append(state)
                continue
            source = run_dir / ("test_metrics.json" if from_metrics else CALIBRATION_FILE)
            value = metrics[metric] if from_metrics else calibration[report][metric]
            ci = calibration[report].get(f"{metric}_ci")
            table.add_cell(label, column, metric, value, None, state, source)
            table.cells[-1].update(ci=ci, ci_source=str(run_dir / CALIBRATION_FILE))
            cells.append(_with_ci(metric, value, ci) if value is not None else "—")
            if column == HAM10000_MINI_METRICS[0][0] and value is not None:
                bacc[label] = (value, ci)
        if calibration is not None:
            num_images.add(calibration["uncalibrated"]["num_samples"])
            at_bound = " (at its search bound)" if calibration.get("temperature_warning") else ""
            cells.append(f"{calibration['temperature']:.3f}{at_bound}")
        else:
            cells.append(state)
        wall = _read_json(run_dir / WALL_TIME_FILE) if state == "ok" else None
        cells.append(f"{wall['seconds']:.0f}" if wall else "—")
        agreement = metrics.get(RATIONALE_AGREEMENT_KEY) if metrics else None
        cells.append(f"{agreement:.3f}" if isinstance(agreement, (int, float)) else "—")
        for column in (PAPER_ISIC2019, PAPER_ISIC2024):
            cells.append(_paper_triple(paper, paper_paths.get(column)))
        table.add_row(label, cells)
        if RUNS[run].runner == "skinclip":
            values = _settings_of(run, plan)
            shown = (
                ", ".join(f"{k} = {values.get(k, _field_default(k))}" for k in ROW_SETTINGS)
                if values
                else "config unreadable"
            )
            row_settings.append(f"{label.split(' ', 1)[0]} {shown}")

    data_path = plan.data.get("ham10000_mini") or (_settings_of("ham10000_mini_full_cfa", plan) or {}).get(
        "dataset_path"
    )
    if len(num_images) == 1:
        images = f"{next(iter(num_images))} images"
    else:
        images = f"image counts differ between runs: {sorted(num_images)}" if num_images else "no run scored yet"
    trained = [run for _, run, _ in HAM10000_MINI_ROWS if RUNS[run].runner == "skinclip"]
    table.notes = [
        *(
            [
                "**--tiny**: tiny random bases on a generated demo set; the numbers say that the pipeline works, "
                "nothing about skin lesions."
            ]
            if plan.tiny
            else []
        ),
        f"Every row: the same converted ham10000-mini DatasetDict (`{data_path}`), scored on its `test` split "
        f"({images}). B-ACC, AUROC and the first "
        "ECE are each run's own `test_metrics.json`; T is fitted on the `validation` split only and the second "
        "ECE is the test split after dividing the logits by T; [95% CI]: percentile bootstrap over the test "
        f"images ({CALIBRATION_BOOTSTRAP[plan.tiny]} resamples), from `{CALIBRATION_FILE}` "
        "(`skinclip.run_calibration`).",
        _budget_note(trained, plan),
        _probe_note("ham10000_mini_probe", plan, table.run_state("ham10000_mini_probe")[1]),
        "Row settings (resolved configs): " + "; ".join(row_settings) + ". (b) keeps L_gen, as this project "
        'reads the paper\'s "Baseline (CE Loss)" (Table II).',
        "Wall time: the runner's clock around each run's entry point (model loading, feature caching, training and "
        "evaluation; for (a) features, cross-validation and fit), seconds. Rationale agreement: the key "
        f"`{RATIONALE_AGREEMENT_KEY}` of `test_metrics.json`, `—` where a run did not write it.",
        f"**The paper columns are not the same data**: {PAPER_ISIC2019} and {PAPER_ISIC2024} give the paper's "
        "B-ACC / AUROC / ECE on ISIC 2019 and ISIC 2024 at full scale (Qwen2.5-VL-7B with CLIP ViT-L/14, about 17.7k "
        "training images), printed for orientation only; no difference is computed. The paper has no linear probe "
        "and no metadata ablation (`—`), and reports its CE-only row only on ISIC 2024 (OOD).",
    ]
    table.footer, summary = _ham10000_mini_verdict(bacc)
    table.extra = {"summary": summary}
    return table.write()


def _ham10000_mini_verdict(bacc: dict[str, tuple[float, list | None]]) -> tuple[list[str], dict]:
    """Which row has the highest measured B-ACC, and whether (c) full CFA reaches the probe's; from the values."""
    probe, full = HAM10000_MINI_ROWS[0][0], HAM10000_MINI_ROWS[2][0]
    if not bacc:
        lines = ["Highest B-ACC: no row has been scored yet.", "(c) against the probe: cannot be compared yet."]
        return lines, {"best_bacc_rows": [], "full_cfa_reaches_probe": None}
    best = max(value for value, _ in bacc.values())
    winners = [label for label, (value, _) in bacc.items() if value == best]
    lines = [
        f"**Highest B-ACC**: {' and '.join(winners)}, {format_value('balanced_accuracy', best)} "
        f"(of {len(bacc)} scored row{'s' if len(bacc) > 1 else ''})."
    ]
    reaches = None
    if probe in bacc and full in bacc:
        (p, p_ci), (f, f_ci) = bacc[probe], bacc[full]
        reaches = f >= p
        overlap = ""
        if p_ci and f_ci and None not in p_ci + f_ci:
            overlap = "; their 95% CIs " + (
                "overlap" if f_ci[0] <= p_ci[1] and p_ci[0] <= f_ci[1] else "do not overlap"
            )
        lines.append(
            f"**Does (c) full CFA reach the linear probe's B-ACC?** {'Yes' if reaches else 'No'}: "
            f"{format_value('balanced_accuracy', f)} against {format_value('balanced_accuracy', p)} "
            f"({format_diff('balanced_accuracy', f - p)}{overlap})."
        )
    else:
        missing = [label for label in (probe, full) if label not in bacc]
        lines.append(f"(c) against the probe: cannot be compared yet, {' and '.join(missing)} not scored.")
    return lines, {"best_bacc_rows": winners, "best_bacc": best, "full_cfa_reaches_probe": reaches}


def build_table(table: str, statuses: dict, plan: Plan) -> str:
    paper = yaml.safe_load(PAPER_NUMBERS.read_text())
    if table == "table1":
        return build_table1(paper, statuses, plan)
    if table == "ablation":
        return _per_run_table(
            "ablation",
            "Table II: ablation of the CFA terms (trained on ISIC 2019)",
            ABLATION_ROWS,
            paper["ablation"],
            statuses,
            plan,
        )
    if table == "lambda3":
        return _per_run_table(
            "lambda3",
            "Fig. 3: sensitivity to λ3 (lambda_gen; trained on ISIC 2019)",
            LAMBDA3_ROWS,
            paper["lambda3"],
            statuses,
            plan,
        )
    if table == "data_efficiency":
        return build_data_efficiency(paper, statuses, plan)
    if table == "ham10000_mini":
        return build_ham10000_mini(paper, statuses, plan)
    raise ValueError(f"unknown table {table!r}; choose from {TABLES + EXTRA_TABLES}")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "table", choices=TABLES + EXTRA_TABLES + ("all",), help="`all`: the paper's four tables (not ham10000_mini)"
    )
    parser.add_argument("--out", required=True, help="results directory: runs/, <table>.md, <table>.json")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random bases, generated demo data, one short epoch per run (CPU, minutes)",
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated run names to execute; the table's other runs are read if present"
    )
    parser.add_argument("--collect-only", action="store_true", help="run nothing; build tables from existing runs")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument(
        "--launcher",
        choices=("python", "accelerate", "inprocess"),
        default="python",
        help="how to start train.py: a python subprocess, `accelerate launch`, or in this process",
    )
    for dataset in ("isic2019", "derm7pt", "isic2024"):
        parser.add_argument(f"--{dataset}", default=None, help=f"{DATASET_LABELS[dataset]} DatasetDict directory")
    parser.add_argument(
        "--ham10000-mini", default=None, help="converted ham10000-mini DatasetDict directory (ham10000_mini table)"
    )
    parser.add_argument(
        "--ood-split", default="test", help="split of the ISIC 2024 DatasetDict to score ('all': every split)"
    )
    parser.add_argument("--list-runs", action="store_true", help="print the runs of the table and their commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    plan = Plan(
        out=Path(args.out).resolve(),
        tiny=args.tiny,
        ood_split=args.ood_split,
        data={d: getattr(args, d) for d in ("isic2019", "derm7pt", "isic2024", "ham10000_mini") if getattr(args, d)},
    )
    if args.tiny:
        prepare_tiny(plan)
    tables = list(TABLES) if args.table == "all" else [args.table]
    names = list(dict.fromkeys(name for table in tables for name in runs_of(table)))
    if args.only:
        selected = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in selected if name not in RUNS]
        if unknown:
            raise SystemExit(f"--only: unknown run(s) {unknown}; runs are {sorted(RUNS)}")
        names = [name for name in names if name in selected]
    if args.list_runs:
        canonical = canonical_runs(plan)
        for name in names:
            run = RUNS[name]
            print(
                f"{name} (same as {canonical[name]}): {ENTRY_POINTS[run.runner][0]} {' '.join(command_line(run, plan))}"
            )
        return 0
    statuses = run_all(names, plan, args.launcher, force=args.force, collect_only=args.collect_only)
    for table in tables:
        print(build_table(table, {name: statuses[name] for name in runs_of(table) if name in statuses}, plan))
    failed = sorted({s["same_as"] for s in statuses.values() if s["status"] == "failed"})
    if failed:
        print(f"failed runs: {failed} (see <out>/runs/<run>/error.txt)", file=sys.stderr)
        return 1
    return 0
