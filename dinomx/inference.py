"""A backbone and its heads applied to a batch of tiles or slices: what slide and series
inference stream their batches through. One forward pass per batch gives the CLS embeddings the
classifier and regression read and, when the heads segment, the patch tokens the segmentation
probe reads."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinomx.embed import Embedder
from dinomx.probes import TaskHeads


@dataclass
class TilePredictions:
    embeddings: np.ndarray  # (N, D)
    probabilities: np.ndarray | None = None  # (N, classes) of the classifier that answered
    values: np.ndarray | None = None  # (N,) the regression target
    segments: np.ndarray | None = None  # (N, h, w) class index of each patch


class TilePredictor:
    """``embedder`` and, if given, ``heads`` (their classifier ``head``, else its default)."""

    def __init__(self, embedder: Embedder, heads: TaskHeads | None = None, head: str | None = None):
        self.embedder, self.heads = embedder, heads
        if heads is not None and head and head not in heads.classifier.heads:
            raise KeyError(f"head: unknown {head!r}; available: {sorted(heads.classifier.heads)}")
        self.head = head or (heads.classifier.default if heads is not None else None)

    @property
    def classes(self) -> list[str]:
        return self.heads.classifier.classes if self.heads is not None else []

    @property
    def segment_classes(self) -> list[str]:
        return self.heads.segmentation.classes if self.heads is not None and self.heads.segmentation else []

    @property
    def target(self) -> str | None:
        return self.heads.regression.target if self.heads is not None and self.heads.regression else None

    def __call__(self, images: Sequence[Image.Image]) -> TilePredictions:
        pixels = self.embedder.preprocess(images)
        segmentation = self.heads.segmentation if self.heads is not None else None
        if segmentation is not None:
            embeddings, patches = self.embedder.tokens(pixels)
        else:
            embeddings, patches = self.embedder.embed_pixels(pixels), None
        out = TilePredictions(embeddings)
        if self.heads is not None:
            out.probabilities = self.heads.classifier.predict_proba(embeddings, self.head)
            if self.heads.regression is not None:
                out.values = self.heads.regression.predict(embeddings)
            if segmentation is not None:
                out.segments = segmentation.predict_grid(patches)
        return out
