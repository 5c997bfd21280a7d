"""Worker for tests/test_distributed.py: one DDP process (gloo, CPU) computing the CFA loss, gradients and logs."""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from configuration_skinclip import SkinClipVLConfig
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from trainer_cfa import CFALoss, NonFiniteGuard, TermAverages, report_keys

METADATA = [
    "A lesion on the back.",
    "A skin lesion.",
    "A lesion on the lower extremity of a female patient.",
    "A lesion on the face of a male patient aged about 70.",
]
REPORTS = [
    "Melanoma: atypical network and blue-whitish veil.",
    "Nevus.",
    "Basal cell carcinoma: arborizing vessels.",
    "Melanoma: irregular streaks, regression structures and irregular dots and globules.",
]
# ISIC-style repeated reports: sample 0's report again on the other process (twice) for multi-positive targets.
REPEATED_REPORTS = [REPORTS[0], REPORTS[1], REPORTS[0], REPORTS[0]]
LABELS = [0, 1, 2, 0]
LOSS_WEIGHTS = dict(gamma=2.0, lambda_align=0.5, lambda_cal=1.0, lambda_gen=0.5)


def build(config_dict: dict):
    torch.manual_seed(0)
    config = SkinClipVLConfig(**config_dict)
    model = SkinClipVLModel(config, device="cpu").eval()  # eval: no dropout, gradients still flow
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.trained_state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model, SkinClipVLProcessor.from_pretrained(None, config=config)


def make_batch(processor, indices, reports=REPORTS):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in METADATA]
    batch = processor(
        [images[i] for i in indices],
        [METADATA[i] for i in indices],
        reports=[reports[i] for i in indices],
        rationales=[reports[i] for i in indices],
    )
    return batch, torch.tensor([LABELS[i] for i in indices])


def term_weights(terms, outputs, labels):
    """What CFATrainer weighs each logged term by: samples, or rationale tokens for the LM term."""
    return {name: outputs.lm_tokens if name == "gen" else labels.shape[0] for name in terms}


def gradients(model):
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def run(
    rank: int,
    world_size: int,
    port: int,
    config_dict: dict,
    out_dir: str,
    focal_modulation: bool = False,
    multi_positive: bool = False,
) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model, processor = build(config_dict)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        per_rank = len(METADATA) // world_size
        batch, labels = make_batch(
            processor,
            list(range(rank * per_rank, (rank + 1) * per_rank)),
            REPEATED_REPORTS if multi_positive else REPORTS,
        )
        keys = report_keys(batch["report_ids"], batch["report_attention_mask"]) if multi_positive else None
        cfa_loss = CFALoss(**LOSS_WEIGHTS, focal_modulation=focal_modulation, rank=rank, world_size=world_size)
        outputs = ddp(**batch)
        loss, terms = cfa_loss(outputs, labels, report_keys=keys)
        # The LM normalisation CFATrainer uses: the step's rationale tokens counted over every process up front.
        step_tokens = outputs.lm_tokens.detach().clone()
        torch.distributed.all_reduce(step_tokens)
        counted, _ = cfa_loss(outputs, labels, report_keys=keys, num_items_in_batch=step_tokens)
        loss.backward()
        tensors = gradients(model)
        tensors["__loss__"] = loss.detach().reshape(1)
        tensors["__loss_counted__"] = counted.detach().reshape(1)
        # What CFATrainer.log reports: each term merged over both processes.
        averages = TermAverages()
        for name, weight in term_weights(terms, outputs, labels).items():
            averages.add(name, terms[name], weight)
        for name, value in averages.compute(list(terms), "cpu").items():
            tensors[f"__term_{name}__"] = torch.tensor([value])
        # The non-finite guard's decision is shared: a NaN loss on rank 1 only makes both processes skip.
        guard = NonFiniteGuard()
        guard.observe_loss(torch.tensor(float("nan")) if rank == 1 else loss)
        tensors["__step_is_finite__"] = torch.tensor(
            [float(guard._step_is_finite(SimpleNamespace(device="cpu"), model))]
        )
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()
