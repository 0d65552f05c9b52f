"""BentoML service over the promoted Vision Foundry models.

    VF_MODEL_NAME=demo VF_MODEL_ALIAS=production bentoml serve serving.service:VisionFoundry

``POST /embed`` and ``POST /classify`` take images as multipart files (field ``images``).
BentoML adds ``/readyz``, ``/livez`` and ``/metrics``.
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BadInput
from PIL import Image, UnidentifiedImageError

from serving.models import load_promoted

MAX_IMAGES = int(os.environ.get("VF_MAX_IMAGES", "64"))
MAX_SIDE = int(os.environ.get("VF_MAX_IMAGE_SIDE", "4096"))


def _read_images(files: list[Path]) -> list[Image.Image]:
    """Decode uploads ourselves so that a bad file is the client's error (400), named by index."""
    if not files:
        raise BadInput("images: send at least one image")
    if len(files) > MAX_IMAGES:
        raise BadInput(f"images: at most {MAX_IMAGES} per request, got {len(files)}")
    images = []
    for index, path in enumerate(files):
        try:
            with Image.open(path) as img:
                # The header gives the size: refuse oversized images before decoding them.
                if max(img.size) > MAX_SIDE or min(img.size) < 1:
                    raise BadInput(f"images[{index}]: size {img.size[0]}x{img.size[1]} outside 1..{MAX_SIDE} px")
                img.load()
                images.append(img.copy())
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise BadInput(f"images[{index}]: not a readable image ({type(exc).__name__})") from None
    return images


@bentoml.service(name="vision_foundry", traffic={"timeout": 120})
class VisionFoundry:
    def __init__(self) -> None:
        self.name = os.environ.get("VF_MODEL_NAME", "demo")
        self.alias = os.environ.get("VF_MODEL_ALIAS", "production")
        self.models = load_promoted(self.name, self.alias)

    @bentoml.api
    def embed(self, images: list[Path]) -> dict:
        embeddings = self.models.embedder.embed(_read_images(images))
        return {"model": self.models.backbone_uri, "dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}

    @bentoml.api
    def classify(self, images: list[Path], head: str = "") -> dict:
        heads = self.models.heads
        if heads is None:
            raise BadInput(f"no {self.name}-head holds @{self.alias}; /classify is unavailable")
        name = head or heads.default
        if name not in heads.heads:
            raise BadInput(f"head: unknown {name!r}; available: {sorted(heads.heads)}")
        probabilities = heads.predict_proba(self.models.embedder.embed(_read_images(images)), name)
        predictions = [
            {
                "label": heads.classes[int(np.argmax(p))],
                "confidence": float(np.max(p)),
                "probabilities": {c: float(v) for c, v in zip(heads.classes, p)},
            }
            for p in probabilities
        ]
        return {"model": self.models.head_uri, "backbone": self.models.backbone_uri, "head": name, "predictions": predictions}
