"""Two processes (gloo, CPU) give the single-process CFA loss and gradients of the concatenated batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests import ddp_cfa_worker as worker
from trainer_cfa import CFALoss, report_keys


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # spawns 2 processes
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize(
    "focal_modulation, multi_positive",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["clip_loss", "focal_modulated", "multi_positive", "multi_positive_focal_modulated"],
)
def test_two_process_cfa_loss_and_gradients_equal_single_process(
    tmp_path, make_config, focal_modulation, multi_positive
):
    config = make_config(decoder_overrides=dict(lora_dropout=0.0)).to_dict()
    for key in ("transformers_version", "model_type", "architectures", "auto_map"):
        config.pop(key, None)

    mp.spawn(
        worker.run, args=(2, _free_port(), config, str(tmp_path), focal_modulation, multi_positive), nprocs=2, join=True
    )
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]

    model, processor = worker.build(config)
    reports = worker.REPEATED_REPORTS if multi_positive else worker.REPORTS
    batch, labels = worker.make_batch(processor, [0, 1, 2, 3], reports)
    assert batch["rationale_attention_mask"][:2].sum() != batch["rationale_attention_mask"][2:].sum()  # uneven
    keys = report_keys(batch["report_ids"], batch["report_attention_mask"]) if multi_positive else None
    if multi_positive:  # duplicates within a process and across the two
        assert keys[0] == keys[2] == keys[3] != keys[1]
    outputs = model(**batch)
    loss, terms = CFALoss(**worker.LOSS_WEIGHTS, focal_modulation=focal_modulation)(outputs, labels, report_keys=keys)
    loss.backward()
    expected = worker.gradients(model)

    # DDP averages the per-process losses' gradients; the average of the per-process losses is the loss.
    mean_loss = (ranks[0].pop("__loss__") + ranks[1].pop("__loss__")) / 2
    counted = [r.pop("__loss_counted__") for r in ranks]
    assert [r.pop("__step_is_finite__").item() for r in ranks] == [0.0, 0.0]  # rank 1's NaN loss skips both
    torch.testing.assert_close(mean_loss[0], loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((counted[0] + counted[1])[0] / 2, loss.detach(), rtol=1e-5, atol=1e-5)
    # Logged terms: each merged over both processes equals the term on the concatenated batch (not rank 0's).
    for name, value in terms.items():
        logged = [r.pop(f"__term_{name}__").item() for r in ranks]
        assert logged[0] == logged[1] == pytest.approx(value.item(), rel=1e-5), name
    assert set(ranks[0]) == set(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)  # all-reduced
        torch.testing.assert_close(ranks[0][name], gradient, rtol=1e-5, atol=1e-6, msg=name)  # measured: 7e-7 of max


@pytest.mark.slow  # accelerate launch train.py
def test_accelerate_launch_with_the_ddp_config_runs_train_py_in_two_processes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml train.py` on CPU (gloo), as shipped.

    The training YAML's `use_cpu: true` puts each process on the CPU; the config's multi-GPU launcher still
    starts two processes. (`accelerate launch --cpu` would not: it runs a single process.)
    """
    import json
    import math

    from datasets import load_from_disk

    _launch_demo_training(
        tmp_path, "--num_train_epochs=1", "--save_strategy=epoch", "--eval_strategy=no", "--disable_tqdm=true"
    )
    train_rows = len(load_from_disk(str(tmp_path / "data"))["train"])
    (checkpoint,) = (tmp_path / "out").glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(train_rows / (16 * 2))  # the global batch spans both processes
    assert state["global_step"] != math.ceil(train_rows / 16)
    assert (checkpoint / "checkpoint_complete.json").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow  # accelerate launch train.py
def test_accelerate_launch_trains_an_ablation_without_alignment_in_two_processes(tmp_path):
    """The loss settings of configs/ablations/focal.yaml (lambda_align 0) under 2-process DDP, on the demo.

    DDP runs with find_unused_parameters=False; Focal Pooling, the alignment projections and the logit scale
    get no gradient without the alignment term, which failed at step 2 ("Expected to have finished reduction
    in the prior iteration") until CFATrainer froze them. The logged CFA terms are merged over both processes:
    they add up to the logged loss, itself the mean over processes (rank 0's terms alone would not).
    """
    import json

    import yaml
    from safetensors.torch import load_file

    from tests.conftest import REPO_ROOT

    ablation = yaml.safe_load((REPO_ROOT / "configs/ablations/focal.yaml").read_text())
    loss_settings = {key: value for key, value in ablation.items() if key.startswith(("lambda_", "focal_"))}
    assert loss_settings["lambda_align"] == 0
    _launch_demo_training(
        tmp_path,
        *(f"--{key}={value}" for key, value in loss_settings.items()),
        "--max_steps=3",
        "--logging_steps=1",
        "--save_strategy=steps",
        "--save_steps=3",
        "--eval_strategy=steps",
        "--eval_steps=3",
        "--disable_tqdm=true",
    )

    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    (evaluation,) = [entry for entry in state["log_history"] if "eval_loss" in entry]  # merged at evaluation too
    assert {"eval_loss_focal", "eval_loss_gen"} <= set(evaluation) and "eval_loss_align" not in evaluation
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == 3
    lambda_gen = yaml.safe_load((REPO_ROOT / "configs/demo.yaml").read_text())["lambda_gen"]
    for entry in steps:
        assert "loss_align" not in entry and "loss_cal" not in entry
        assert entry["loss"] == pytest.approx(entry["loss_focal"] + lambda_gen * entry["loss_gen"], rel=1e-4)
    saved = load_file(tmp_path / "out" / "model.safetensors")  # frozen, still saved
    assert "logit_scale" in saved and any(name.startswith("focal_pooling.") for name in saved)


def _launch_demo_training(tmp_path, *fields: str) -> None:
    """`accelerate launch --config_file configs/accelerate/ddp.yaml train.py configs/demo.yaml` (two processes)."""
    _train_demo(tmp_path, tmp_path / "out", *fields, launch=("--config_file", "configs/accelerate/ddp.yaml"))


def _train_demo(tmp_path, out, *fields: str, launch: tuple[str, ...] | None = None) -> None:
    """`train.py configs/demo.yaml` in one process, or under `accelerate launch` with the given launcher flags;
    the generated data and tiny bases are shared through tmp_path."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    command = [sys.executable]
    if launch is not None:
        command += ["-m", "accelerate.commands.launch", *launch, "--main_process_port", str(_free_port())]
    command += [
        "train.py",
        "configs/demo.yaml",
        f"--output_dir={out}",
        f"--dataset_path={tmp_path / 'data'}",
        f"--tiny_bases_dir={tmp_path / 'bases'}",
        *fields,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# configs/accelerate/fsdp.yaml as shipped, with the two settings a CPU run needs: torch refuses
# sync_module_states on the CPU ("FSDP parameter initialization with sync_module_states=True is not supported
# on cpu"; every process builds the same seeded model, so nothing needs broadcasting), and float32 (the demo's
# compute dtype) instead of bf16 mixed precision, so that the two runs can be compared to float32 rounding.
FSDP_ON_CPU = (
    "--config_file",
    "configs/accelerate/fsdp.yaml",
    "--fsdp_sync_module_states",
    "false",
    "--mixed_precision",
    "no",
)


@pytest.mark.slow  # three train.py runs: FSDP in 2 processes, 1 process, FSDP resumed
def test_fsdp_launch_matches_one_process_saves_a_loadable_checkpoint_and_resumes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml train.py` on CPU (gloo), 2 processes x 8,
    against `train.py` in one process x 16 (the same 16 samples a step: accelerate gives process k the k-th
    batch of the one-process order): the same loss and gradient norm at each step, the same weights after the
    second (lr 0 at step 1 under the demo's warm-up, so step 2 applies the gradients), a checkpoint that
    `SkinClipVLModel.from_pretrained` loads, and a resume from step 1 that ends with the same weights."""
    import json
    import shutil

    from modeling_skinclip import SkinClipVLModel

    fields = ("--max_steps=2", "--logging_steps=1", "--save_strategy=steps", "--save_steps=1", "--eval_strategy=no")
    fields += ("--disable_tqdm=true",)
    # Both steps are full batches (the demo's training split has more than 32 rows): a short last batch would be
    # padded with repeated samples by accelerate (even_batches) and differ from the one-process batch.
    _train_demo(tmp_path, tmp_path / "fsdp", *fields, "--per_device_train_batch_size=8", launch=FSDP_ON_CPU)
    _train_demo(tmp_path, tmp_path / "single", *fields, "--per_device_train_batch_size=16")

    def steps(out):
        history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        return [entry for entry in history if "loss" in entry]

    fsdp_steps, single_steps = steps(tmp_path / "fsdp"), steps(tmp_path / "single")
    assert [e["step"] for e in fsdp_steps] == [e["step"] for e in single_steps] == [1, 2]
    for sharded, single in zip(fsdp_steps, single_steps):
        for key in ("loss", "grad_norm", "loss_focal", "loss_align", "loss_cal", "loss_gen"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-4), (sharded["step"], key)
    sharded_weights = load_file(tmp_path / "fsdp" / "model.safetensors")
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    assert set(sharded_weights) == set(single_weights)
    moved = 0
    for name, tensor in single_weights.items():
        torch.testing.assert_close(sharded_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(tensor, load_file(tmp_path / "single" / "checkpoint-1" / "model.safetensors")[name])
    assert moved > len(single_weights) // 2  # step 2 moved the weights: the comparison is not of untouched ones

    # The FSDP-gathered checkpoint loads with from_pretrained and holds the trained tensors.
    model = SkinClipVLModel.from_pretrained(tmp_path / "fsdp" / "checkpoint-2", device="cpu")
    for name, tensor in model.trained_state_dict().items():
        torch.testing.assert_close(tensor, sharded_weights[name], rtol=0, atol=0, msg=name)

    # Resume the sharded run from its step-1 checkpoint: the same final weights as the uninterrupted run.
    shutil.rmtree(tmp_path / "fsdp" / "checkpoint-2")
    resume = ("--per_device_train_batch_size=8", "--resume_from_checkpoint=true")
    _train_demo(tmp_path, tmp_path / "fsdp", *fields, *resume, launch=FSDP_ON_CPU)
    resumed = load_file(tmp_path / "fsdp" / "model.safetensors")
    for name, tensor in sharded_weights.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_config_wraps_the_decoder_layers(make_config):
    """The layer class named in fsdp.yaml exists in a model with a Qwen2.5-VL decoder (accelerate raises if not)."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    from modeling_skinclip import SkinClipVLModel
    from tests.conftest import REPO_ROOT

    fsdp = yaml.safe_load((REPO_ROOT / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is True  # frozen and trained tensors share units
    model = SkinClipVLModel(make_config(decoder="qwen2_5_vl"), device="cpu")
    plugin = FullyShardedDataParallelPlugin(
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","),
    )
    plugin.set_auto_wrap_policy(model)
    wrapped = [
        module for module in model.modules() if plugin.auto_wrap_policy(module, recurse=False, nonwrapped_numel=0)
    ]
    assert wrapped and all(type(module).__name__ == "Qwen2_5_VLDecoderLayer" for module in wrapped)
    assert len(wrapped) == model.config.decoder_config.to_dict().get("num_hidden_layers", len(wrapped))
