"""BentoML service over the promoted Vision Foundry models.

    VF_MODEL_NAME=demo VF_MODEL_ALIAS=production bentoml serve serving.service:VisionFoundry

Endpoints take images as multipart files (field ``images``): ``/embed``, ``/classify``,
``/segment``, ``/regress``, ``/attention``. Embeddings of concurrent requests are computed in
shared forward passes (adaptive batching, ``serving.batching``: ``VF_BATCH_MAX_SIZE`` images,
waiting at most ``VF_BATCH_MAX_WAIT_MS``). ``/reload`` (and a poll every
``VF_RELOAD_INTERVAL_S`` seconds, 0 to disable) picks up a newly promoted version without a restart;
a set that cannot be served (e.g. a head on another backbone) is refused and the old one kept.
BentoML adds ``/readyz``, ``/livez`` and ``/metrics``.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import threading
from pathlib import Path

import bentoml
import numpy as np
import torch
from bentoml.exceptions import BadInput
from PIL import Image, UnidentifiedImageError

from dinomx.attention import cls_attention
from serving.batching import MicroBatcher
from serving.models import PromotedModels, ServingError, load_promoted, promoted_uris

MAX_IMAGES = int(os.environ.get("VF_MAX_IMAGES", "64"))
MAX_SIDE = int(os.environ.get("VF_MAX_IMAGE_SIDE", "4096"))
RELOAD_INTERVAL_S = float(os.environ.get("VF_RELOAD_INTERVAL_S", "60"))
BATCH_MAX_SIZE = int(os.environ.get("VF_BATCH_MAX_SIZE", "64"))
BATCH_MAX_WAIT_MS = float(os.environ.get("VF_BATCH_MAX_WAIT_MS", "0"))
log = logging.getLogger("bentoml.vision_foundry")


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


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@bentoml.service(name="vision_foundry", traffic={"timeout": 120})
class VisionFoundry:
    def __init__(self) -> None:
        self.name = os.environ.get("VF_MODEL_NAME", "demo")
        self.alias = os.environ.get("VF_MODEL_ALIAS", "production")
        self.models: PromotedModels = load_promoted(self.name, self.alias)
        self.batcher = MicroBatcher(BATCH_MAX_SIZE, BATCH_MAX_WAIT_MS)
        self._reloading = threading.Lock()
        self._attention = threading.Lock()  # attention switches the model to eager attention
        if RELOAD_INTERVAL_S > 0:
            threading.Thread(target=self._poll, daemon=True, name="vf-reload").start()

    def _poll(self) -> None:
        stop = threading.Event()
        while not stop.wait(RELOAD_INTERVAL_S):
            try:
                self._reload()
            except Exception:  # the poller must survive a registry outage
                log.exception("reload check failed; still serving %s", self.models.uris)

    def _reload(self) -> dict:
        with self._reloading:
            current = promoted_uris(self.name, self.alias)
            if current == self.models.uris:
                return {"changed": False, "backbone": current[0], "head": current[1]}
            # Swapped in one assignment: a request sees either the old set or the new one.
            self.models = load_promoted(self.name, self.alias)
            log.info("reloaded @%s: %s", self.alias, self.models.uris)
            return {"changed": True, "backbone": self.models.backbone_uri, "head": self.models.head_uri}

    def _heads(self, models: PromotedModels, endpoint: str, probe: str | None = None):
        if models.heads is None:
            raise BadInput(f"no {self.name}-head holds @{self.alias}; /{endpoint} is unavailable")
        if probe and getattr(models.heads, probe) is None:
            raise BadInput(f"{models.head_uri} has no {probe} head; /{endpoint} is unavailable "
                           f"(train one with `heads --{'masks' if probe == 'segmentation' else 'targets'}`)")
        return models.heads

    async def _embeddings(self, models: PromotedModels, images: list[Image.Image]) -> np.ndarray:
        return await self.batcher(models.embedder.preprocess(images).cpu().numpy(), models.embedder.embed_pixels)

    @bentoml.api
    def reload(self) -> dict:
        try:
            return self._reload()
        except ServingError as exc:
            raise BadInput(f"kept {self.models.uris}: {exc}") from None

    @bentoml.api
    async def embed(self, images: list[Path]) -> dict:
        models = self.models
        embeddings = await self._embeddings(models, _read_images(images))
        return {"model": models.backbone_uri, "dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}

    @bentoml.api
    async def classify(self, images: list[Path], head: str = "") -> dict:
        models = self.models
        classifier = self._heads(models, "classify").classifier
        name = head or classifier.default
        if name not in classifier.heads:
            raise BadInput(f"head: unknown {name!r}; available: {sorted(classifier.heads)}")
        probabilities = classifier.predict_proba(await self._embeddings(models, _read_images(images)), name)
        predictions = [
            {
                "label": classifier.classes[int(np.argmax(p))],
                "confidence": float(np.max(p)),
                "probabilities": {c: float(v) for c, v in zip(classifier.classes, p)},
            }
            for p in probabilities
        ]
        return {"model": models.head_uri, "backbone": models.backbone_uri, "head": name, "predictions": predictions}

    @bentoml.api
    async def regress(self, images: list[Path]) -> dict:
        models = self.models
        probe = self._heads(models, "regress", "regression").regression
        values = probe.predict(await self._embeddings(models, _read_images(images)))
        return {"model": models.head_uri, "target": probe.target, "predictions": [float(v) for v in values]}

    @bentoml.api
    def segment(self, images: list[Path]) -> dict:
        """Per image: a PNG of class indices at the image's own size, and each class's area fraction."""
        models = self.models
        probe = self._heads(models, "segment", "segmentation").segmentation
        decoded = _read_images(images)
        predictions = []
        for img, patches in zip(decoded, models.embedder.patch_features(decoded)):
            mask = probe.predict(patches[None], (img.height, img.width))[0].astype(np.uint8)
            counts = np.bincount(mask.ravel(), minlength=len(probe.classes)) / mask.size
            predictions.append({"width": img.width, "height": img.height, "mask_png": _png(mask),
                                "fractions": {c: float(f) for c, f in zip(probe.classes, counts)}})
        return {"model": models.head_uri, "classes": probe.classes, "predictions": predictions}

    @bentoml.api
    def attention(self, images: list[Path]) -> dict:
        """Last-layer CLS attention per head on the patch grid (each map sums to 1)."""
        models = self.models
        pixels = models.embedder.preprocess(_read_images(images))
        with self._attention, torch.no_grad():
            maps = cls_attention(models.embedder.backbone, pixels)
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
        mean = maps.mean(1)
        return {
            "model": models.backbone_uri,
            "grid": list(maps.shape[-2:]),
            "predictions": [
                {"maps": m.tolist(), "mean_png": _png((255 * (a / a.max()).numpy()).astype(np.uint8))}
                for m, a in zip(maps, mean)
            ],
        }
