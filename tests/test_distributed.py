"""Two processes (gloo, CPU) give the single-process CFA loss and gradients of the concatenated batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests import ddp_cfa_worker as worker
from trainer_cfa import CFALoss


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_process_cfa_loss_and_gradients_equal_single_process(tmp_path, make_config):
    config = make_config(decoder_overrides=dict(lora_dropout=0.0)).to_dict()
    for key in ("transformers_version", "model_type", "architectures", "auto_map"):
        config.pop(key, None)

    mp.spawn(worker.run, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]

    model, processor = worker.build(config)
    batch, labels = worker.make_batch(processor, [0, 1, 2, 3])
    assert batch["rationale_attention_mask"][:2].sum() != batch["rationale_attention_mask"][2:].sum()  # uneven
    loss, _ = CFALoss(**worker.LOSS_WEIGHTS)(model(**batch), labels)
    loss.backward()
    expected = worker.gradients(model)

    # DDP averages the per-process losses' gradients; the average of the per-process losses is the loss.
    mean_loss = (ranks[0].pop("__loss__") + ranks[1].pop("__loss__")) / 2
    torch.testing.assert_close(mean_loss[0], loss.detach(), rtol=1e-5, atol=1e-5)
    assert set(ranks[0]) == set(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)  # all-reduced
        torch.testing.assert_close(ranks[0][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_train_py_runs_with_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 train.py` (gloo on CPU): the same entry point accelerate/DDP uses."""
    import json
    import math
    import subprocess
    import sys

    from datasets import load_from_disk

    from tests.conftest import REPO_ROOT

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "train.py", "configs/demo.yaml", f"--output_dir={tmp_path / 'out'}",
               f"--dataset_path={tmp_path / 'data'}", f"--tiny_bases_dir={tmp_path / 'bases'}", "--num_train_epochs=1",
               "--save_strategy=epoch", "--eval_strategy=no", "--disable_tqdm=true"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train_rows = len(load_from_disk(str(tmp_path / "data"))["train"])
    (checkpoint,) = (tmp_path / "out").glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(train_rows / (16 * 2))  # the global batch spans both processes
    assert (checkpoint / "checkpoint_complete.json").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
