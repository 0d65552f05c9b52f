"""MLflow pyfunc flavours of DINO-MX artefacts.

The backbone is stored as its ``save_pretrained`` directory (loadable with
``transformers.AutoModel.from_pretrained``) inside the model's artifacts; the heads as a
``TaskHeads`` directory (classifiers, optional segmentation and regression probes).
``unwrap_python_model()`` gives the engine objects back.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from PIL import Image

from dinomx.embed import Embedder
from dinomx.probes import TaskHeads

BACKBONE_ARTIFACT = "backbone"
HEADS_ARTIFACT = "heads"


class BackboneModel(PythonModel):
    """Images (N, H, W, C) uint8 -> embeddings (N, D) float32."""

    def load_context(self, context) -> None:
        self.embedder = Embedder.from_pretrained(context.artifacts[BACKBONE_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        batch = np.asarray(model_input)
        if batch.ndim == 3:  # (N, H, W): single-channel images
            batch = batch[..., None]
        if batch.ndim != 4 or batch.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {batch.dtype} {batch.shape}")
        images = [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in batch]
        return self.embedder.embed(images)


class HeadModel(PythonModel):
    """Embeddings (N, D) -> predicted label and confidence per row (the default head)."""

    def load_context(self, context) -> None:
        self.heads = TaskHeads.from_pretrained(context.artifacts[HEADS_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        head = (params or {}).get("head") or None
        classifier = self.heads.classifier
        probs = classifier.predict_proba(np.asarray(model_input, dtype=np.float32), head)
        best = probs.argmax(1)
        return pd.DataFrame({"label": [classifier.classes[i] for i in best], "confidence": probs.max(1)})
