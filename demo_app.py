"""Local web demo (Gradio, optional extra: ``pip install -e ".[demo]"``).

    python demo_app.py --model outputs/demo                 # http://127.0.0.1:7860, this machine only
    python demo_app.py --model outputs/demo --share         # a public gradio.live link: only if you mean it

The app binds to 127.0.0.1 and opens no public share link unless ``--share`` is given: a skin image and a
patient's metadata are health data. Nothing the user uploads is logged or kept by this script.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SEX_CHOICES = ["unknown", "female", "male"]


def build_app(model, processor, calibration: dict | None = None, max_new_tokens: int = 64):
    """A Gradio Blocks app whose `/diagnose` endpoint returns (probabilities, prediction set, rationale, heatmap)."""
    import gradio as gr

    from predict import Case, ImageInputError, heatmap_overlay, load_image, metadata_sentence, prediction_set

    class_names = model.config.class_names
    output_dir = Path(tempfile.mkdtemp(prefix="skinclip-demo-"))

    def diagnose(image_path, age, sex, site, with_rationale):
        if not image_path:
            raise gr.Error("Upload a dermoscopic image first.")
        try:
            image = load_image(Path(image_path))
        except ImageInputError as error:
            raise gr.Error(str(error)) from error
        case = Case(Path(image_path), age if age not in (None, 0) else None,
                    None if sex in (None, "unknown") else sex, site or None)
        inputs = processor([image], [metadata_sentence(case)])
        inputs = {k: v.to(model.cls_token.device) for k, v in inputs.items()}
        prediction = model.predict(**inputs, max_new_tokens=max_new_tokens if with_rationale else 0)
        probs = prediction.probs[0].float().cpu().numpy()
        rationale = processor.decode(prediction.rationale_ids)[0] if prediction.rationale_ids is not None else ""
        heatmap_path = output_dir / "focal_attention.png"
        heatmap_overlay(image, prediction.attention_map[0].float().cpu().numpy()).save(heatmap_path)
        conformal = prediction_set(probs, calibration or {}, class_names) or "(checkpoint not calibrated)"
        return {name: float(p) for name, p in zip(class_names, probs)}, conformal, rationale, str(heatmap_path)

    with gr.Blocks(title="SkinCLIP-VL", analytics_enabled=False) as app:
        gr.Markdown("# SkinCLIP-VL\nResearch demo, not a medical device.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Dermoscopic image")
                age = gr.Number(label="Age (years, optional)", value=None)
                sex = gr.Dropdown(SEX_CHOICES, value="unknown", label="Sex")
                site = gr.Textbox(label="Anatomical site (optional)", placeholder="posterior torso")
                with_rationale = gr.Checkbox(value=True, label="Generate a rationale")
                button = gr.Button("Diagnose", variant="primary")
            with gr.Column():
                probabilities = gr.Label(num_top_classes=min(5, len(class_names)), label="Diagnosis")
                conformal_set = gr.Textbox(label="Prediction set")
                rationale = gr.Textbox(label="Rationale", lines=4)
                heatmap = gr.Image(type="filepath", label="Focal attention")
        button.click(diagnose, [image, age, sex, site, with_rationale],
                     [probabilities, conformal_set, rationale, heatmap], api_name="diagnose")
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="open a PUBLIC gradio.live link (off by default)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
    from predict import load_calibration

    model = SkinClipVLModel.from_pretrained(args.model, device=args.device)
    processor = SkinClipVLProcessor.from_pretrained(args.model)
    app = build_app(model, processor, load_calibration(args.model) if Path(args.model).is_dir() else {})
    app.launch(server_name="127.0.0.1", server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
