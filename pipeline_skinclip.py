"""One call from a skin-lesion image (and optional metadata) to the diagnosis: a transformers custom pipeline.

    from transformers import pipeline
    diagnose = pipeline("skin-lesion-diagnosis", model="org/skinclip-vl", trust_remote_code=True)
    diagnose("lesion.jpg", metadata={"age": 55, "sex": "male", "site": "posterior torso"})
    diagnose([{"image": "a.jpg", "metadata": {"age": 40}}, "b.jpg"], max_new_tokens=0)   # a batch, no rationale

Shipped in every checkpoint as remote code and named in its ``config.json`` under ``custom_pipelines``, which is
where `transformers.pipeline` looks for a task it does not know (transformers' custom-pipeline convention: the
entry gives the class as ``"module.Class"`` and the Auto class that loads the model). The pipeline reads the
checkpoint's processor and ``calibration.json`` from the folder the model was loaded from.

Each result is a dict:

- ``diagnosis``: ``[{"label", "score"}, ...]`` most probable first (``top_k`` of them; default all), the
  probabilities `model.predict` gives (with the checkpoint's calibration temperature), as predict.py prints;
- ``prediction_set`` / ``coverage``: the split-conformal set (labels) and its target coverage when the checkpoint
  was calibrated (``evaluate_skinclip.py --save-calibration``), else None;
- ``rationale``: the generated text (None with ``max_new_tokens=0``);
- ``attention_map``: the focal-attention map over the patch grid, a float32 array ``(grid_height, grid_width)``;
- ``metadata_text``: the sentence the prompt was built from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import Pipeline

try:
    from .processing_skinclip import SkinClipVLProcessor
except ImportError:  # a checkout, rather than Hub remote code
    from processing_skinclip import SkinClipVLProcessor

PIPELINE_TASK = "skin-lesion-diagnosis"
CALIBRATION_FILE = "calibration.json"


def pipeline_task_entry() -> dict:
    """The ``custom_pipelines`` entry of config.json that lets `transformers.pipeline` build this pipeline."""
    return {"impl": f"{__name__.split('.')[-1]}.SkinLesionDiagnosisPipeline", "pt": ["AutoModel"], "tf": []}


def conformal_set(probs: np.ndarray, conformal: Mapping[str, Any]) -> list[int]:
    """Class indices of one image's split-conformal set, most probable first; never empty.

    The rule of `skinclip.classification_metrics.SplitConformal.predict_sets` without randomisation (as predict.py
    and the demo use it), for the ``conformal`` entry that evaluate_skinclip.py writes in calibration.json:
    LAC keeps every class with ``1 - p <= qhat``; APS/RAPS keep the ranked classes up to and including the one
    whose cumulative mass (plus the RAPS rank penalty) crosses ``qhat``. The checkout's tests compare the two.
    """
    probs = np.asarray(probs, dtype=np.float64)
    qhat, method = float(conformal["qhat"]), conformal["method"]
    if method == "lac":
        members = 1.0 - probs <= qhat
    elif method in ("aps", "raps"):
        order = np.argsort(-probs, kind="stable")
        ranks = np.argsort(order, kind="stable")
        mass_above = np.cumsum(probs[order])[ranks] - probs
        if method == "raps":
            penalty = np.maximum(ranks + 1 - int(conformal.get("raps_k_reg", 1)), 0)
            mass_above = mass_above + float(conformal.get("raps_lambda", 0.01)) * penalty
        members = mass_above < qhat
    else:
        raise ValueError(f"{CALIBRATION_FILE}: unknown conformal method {method!r} (lac, aps or raps)")
    members[probs.argmax()] = True
    chosen = np.flatnonzero(members)
    return chosen[np.argsort(-probs[chosen], kind="stable")].tolist()


class SkinLesionDiagnosisPipeline(Pipeline):
    """Image (a path, URL or PIL image) and optional metadata → diagnosis, conformal set, rationale, attention map.

    ``metadata`` holds the fields the model's training sentences were built from (``age``, ``sex``, ``site`` and the
    dataset's extra observations); the processor words them exactly as the dataset converters did. A batch item
    may be ``{"image": ..., "metadata": {...}}`` to give each image its own metadata.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = False

    def __init__(self, model, processor: SkinClipVLProcessor | None = None, **kwargs):
        folder = getattr(model, "source_folder", None)
        if processor is None:
            if folder is None:
                raise ValueError(
                    "pass processor=SkinClipVLProcessor.from_pretrained(<checkpoint>) for a model that was not "
                    "loaded with from_pretrained"
                )
            processor = SkinClipVLProcessor.from_pretrained(folder)
        calibration_file = Path(folder) / CALIBRATION_FILE if folder is not None else None
        self.calibration = (
            json.loads(calibration_file.read_text()) if calibration_file and calibration_file.is_file() else {}
        )
        super().__init__(model=model, processor=processor, **kwargs)

    def _sanitize_parameters(self, metadata=None, max_new_tokens=None, top_k=None, **kwargs):
        if kwargs:
            raise TypeError(f"{PIPELINE_TASK} pipeline got unexpected arguments {sorted(kwargs)}")
        preprocess = {} if metadata is None else {"metadata": metadata}
        forward = {} if max_new_tokens is None else {"max_new_tokens": int(max_new_tokens)}
        postprocess = {} if top_k is None else {"top_k": int(top_k)}
        return preprocess, forward, postprocess

    def __call__(self, inputs, **kwargs):
        """One image (or ``{"image", "metadata"}``) gives one result dict; a list gives a list of them."""
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs, metadata: Mapping[str, Any] | None = None) -> dict:
        from transformers.image_utils import load_image

        if isinstance(inputs, Mapping):
            metadata = inputs.get("metadata", metadata)
            inputs = inputs["image"]
        image = load_image(inputs)
        sentence = self.processor.metadata_text(metadata)
        model_inputs = self.processor([image], [sentence])
        model_inputs["metadata_text"] = sentence
        return model_inputs

    def _forward(self, model_inputs: dict, max_new_tokens: int = 64) -> dict:
        sentence = model_inputs.pop("metadata_text")
        prediction = self.model.predict(**model_inputs, max_new_tokens=max_new_tokens)
        rationale = None
        if prediction.rationale_ids is not None:
            rationale = self.processor.decode(prediction.rationale_ids.cpu())[0]
        return {
            "probs": prediction.probs[0].float().cpu(),
            "attention_map": prediction.attention_map[0].float().cpu(),
            "rationale": rationale,
            "metadata_text": sentence,
        }

    def postprocess(self, model_outputs: dict, top_k: int | None = None) -> dict:
        class_names = self.model.config.class_names
        probs = model_outputs["probs"].numpy()
        order = np.argsort(-probs, kind="stable")[: top_k or len(class_names)]
        conformal = self.calibration.get("conformal")
        members = conformal_set(probs, conformal) if conformal else None
        return {
            "diagnosis": [{"label": class_names[i], "score": float(probs[i])} for i in order],
            "prediction_set": [class_names[i] for i in members] if members is not None else None,
            "coverage": float(conformal["coverage"]) if conformal else None,
            "rationale": model_outputs["rationale"],
            "attention_map": model_outputs["attention_map"].numpy(),
            "metadata_text": model_outputs["metadata_text"],
        }


__all__ = ["SkinLesionDiagnosisPipeline", "PIPELINE_TASK", "conformal_set"]
