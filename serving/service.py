"""BentoML service over the promoted Vision Foundry models.

    VF_MODEL_NAME=demo VF_MODEL_ALIAS=production bentoml serve serving.service:VisionFoundry

Endpoints take images as multipart files (field ``images``): ``/embed``, ``/classify``,
``/segment``, ``/regress``, ``/attention``. Embeddings of concurrent requests are computed in
shared forward passes (adaptive batching, ``serving.batching``: ``VF_BATCH_MAX_SIZE`` images,
waiting at most ``VF_BATCH_MAX_WAIT_MS``). A poll every ``VF_RELOAD_INTERVAL_S`` seconds (0 to
disable), and ``/reload`` with the operator's ``VF_RELOAD_TOKEN``, pick up a newly promoted
version without a restart; a set that cannot be served (a head on another backbone, a head
that is gone) is refused and the old one kept, and so it is while the registry does not answer.
BentoML adds ``/readyz``, ``/livez`` and ``/metrics``.

What a request may cost is bounded before it is decoded: ``VF_MAX_REQUEST_BYTES`` of body,
``VF_MAX_IMAGES`` images, ``VF_MAX_IMAGE_PIXELS`` per image and ``VF_MAX_REQUEST_PIXELS`` in all
(413 naming the limit). Images are decoded one at a time per request and at most
``VF_DECODE_SLOTS`` at once in the process, off the event loop, each reduced to the model's input
right away, so health checks answer while large uploads are decoded and memory does not grow
with what arrives.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import threading
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
import torch
from bentoml.exceptions import BadInput, BentoMLException
from PIL import Image, UnidentifiedImageError
from starlette.responses import JSONResponse

from dinomx.errors import DataError
from dinomx.images import upright_size
from registry.lineage import RegistryUnavailable
from serving.batching import MicroBatcher
from serving.guard import ClientErrorLog, RequestGuard, ServingState
from serving.models import PromotedModels, ServingError, load_promoted, promoted_uris

MAX_IMAGES = int(os.environ.get("VF_MAX_IMAGES", "64"))
MAX_IMAGE_PIXELS = int(os.environ.get("VF_MAX_IMAGE_PIXELS", str(4096 * 4096)))
MAX_REQUEST_PIXELS = int(os.environ.get("VF_MAX_REQUEST_PIXELS", str(64 * 1024 * 1024)))
MAX_REQUEST_BYTES = int(os.environ.get("VF_MAX_REQUEST_BYTES", str(64 * 1024 * 1024)))
DECODE_SLOTS = int(os.environ.get("VF_DECODE_SLOTS", "2"))
RELOAD_INTERVAL_S = float(os.environ.get("VF_RELOAD_INTERVAL_S", "60"))
# How long /reload waits for the registry before answering 503 (the service keeps its set).
REGISTRY_TIMEOUT_S = float(os.environ.get("VF_REGISTRY_TIMEOUT_S", "20"))
BATCH_MAX_SIZE = int(os.environ.get("VF_BATCH_MAX_SIZE", "64"))
BATCH_MAX_WAIT_MS = float(os.environ.get("VF_BATCH_MAX_WAIT_MS", "0"))
# Shared with the request guard, which answers /readyz with it while a moved alias is refused.
STATE = ServingState()
# MLflow's REST client retries a dead server for minutes by default; a service answers sooner.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
log = logging.getLogger("bentoml.vision_foundry")
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLog())
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


class TooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _check_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of every upload from its header alone, refused before anything is decoded
    when one image or the request as a whole would exceed the pixel limits."""
    if not files:
        raise BadInput("images: send at least one image")
    if len(files) > MAX_IMAGES:
        raise BadInput(f"images: at most {MAX_IMAGES} per request, got {len(files)}")
    sizes = []
    for index, path in enumerate(files):
        try:
            with Image.open(path) as img:
                width, height = upright_size(img)  # /segment answers at the size the image is seen
        except Image.DecompressionBombError as exc:
            raise TooLarge(f"images[{index}]: {exc}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput(f"images[{index}]: not a readable image ({type(exc).__name__})") from None
        if min(width, height) < 1:
            raise BadInput(f"images[{index}]: size {width}x{height} is empty")
        if width * height > MAX_IMAGE_PIXELS:
            raise TooLarge(f"images[{index}]: {width}x{height} = {width * height} pixels; at most {MAX_IMAGE_PIXELS} "
                           "per image (VF_MAX_IMAGE_PIXELS)")
        sizes.append((width, height))
    total = sum(w * h for w, h in sizes)
    if total > MAX_REQUEST_PIXELS:
        raise TooLarge(f"images: {total} pixels in all; at most {MAX_REQUEST_PIXELS} per request (VF_MAX_REQUEST_PIXELS)")
    return sizes


def _decode(files: list[Path], preprocess) -> torch.Tensor:
    """The model's input for every upload, decoding one at a time (at most ``DECODE_SLOTS`` in the
    process) and keeping only its reduced pixels, never every full-size image at once."""
    pixels = []
    for index, path in enumerate(files):
        with _decoding:
            try:
                with Image.open(path) as img:
                    img.load()
                    pixels.append(preprocess([img]))
            except DataError as exc:
                raise BadInput(f"images[{index}]: {exc}") from None
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
                raise BadInput(f"images[{index}]: not a readable image ({type(exc).__name__})") from None
    return torch.cat(pixels)


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
        STATE.serving, STATE.refused = self.models.uris, None
        if self.models.heads is None:
            log.warning("no %s-head holds @%s: serving /embed and /attention only", self.name, self.alias)
        self.batcher = MicroBatcher(BATCH_MAX_SIZE, BATCH_MAX_WAIT_MS)
        self._reloading = threading.Lock()
        if RELOAD_INTERVAL_S > 0:
            threading.Thread(target=self._poll, daemon=True, name="vf-reload").start()

    def _poll(self) -> None:
        stop = threading.Event()
        while not stop.wait(RELOAD_INTERVAL_S):
            try:
                with self._reloading:
                    self._reload()
            except ServingError as exc:
                STATE.refused = str(exc)
                log.warning("reload check: %s; still serving %s", exc, self.models.uris)
            except Exception as exc:  # the poller must outlive a registry outage or a bad promotion
                log.warning("reload check: %s; still serving %s", exc, self.models.uris)

    def _reload(self) -> dict:
        """Swap in the set holding the alias now (caller holds ``_reloading``). A registry that
        does not answer raises ``RegistryUnavailable``: nothing changes on a guess."""
        current = promoted_uris(self.name, self.alias)
        if current == self.models.uris:
            STATE.refused = None
            return {"changed": False, "backbone": current[0], "head": current[1]}
        if self.models.head_uri and current[1] is None:
            raise ServingError(f"no {self.name}-head holds @{self.alias} any more; serving on without the head "
                               "would answer /classify with errors: promote a head (or restart the service)")
        models = load_promoted(self.name, self.alias)
        # Swapped in one assignment: a request sees either the old set or the new one.
        self.models = models
        STATE.serving, STATE.refused = models.uris, None
        log.info("reloaded @%s: %s", self.alias, models.uris)
        return {"changed": True, "backbone": models.backbone_uri, "head": models.head_uri}

    def _heads(self, models: PromotedModels, endpoint: str, probe: str | None = None):
        if models.heads is None:
            raise BadInput(f"no {self.name}-head holds @{self.alias}; /{endpoint} is unavailable")
        if probe and getattr(models.heads, probe) is None:
            raise BadInput(f"{models.head_uri} has no {probe} head; /{endpoint} is unavailable "
                           f"(train one with `heads --{'masks' if probe == 'segmentation' else 'targets'}`)")
        return models.heads

    async def _pixels(self, models: PromotedModels, images: list[Path]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        sizes = _check_sizes(images)
        return await asyncio.to_thread(_decode, images, models.embedder.preprocess), sizes

    async def _embeddings(self, models: PromotedModels, images: list[Path]) -> np.ndarray:
        pixels, _ = await self._pixels(models, images)
        return await self.batcher(pixels.cpu().numpy(), models.embedder.embed_pixels)

    @bentoml.api
    async def reload(self) -> dict:
        """Check the registry now (the guard lets only the operator's token through). 409 while
        another reload runs, 503 (with the set still served) when the registry does not answer:
        answered directly, since BentoML hides the message of every 5xx."""
        if not self._reloading.acquire(blocking=False):
            return JSONResponse({"error": "a reload is already running; try again shortly"}, HTTPStatus.CONFLICT)

        def locked_reload() -> dict:
            try:
                return self._reload()
            finally:
                self._reloading.release()

        task = asyncio.ensure_future(asyncio.to_thread(locked_reload))
        try:
            return await asyncio.wait_for(asyncio.shield(task), REGISTRY_TIMEOUT_S)
        except asyncio.TimeoutError:
            message = f"the registry did not answer within {REGISTRY_TIMEOUT_S:g} s; still serving {self.models.uris}"
        except ServingError as exc:
            STATE.refused = str(exc)
            log.warning("reload: %s; still serving %s", exc, self.models.uris)
            raise BadInput(f"kept {self.models.uris}: {exc}") from None
        except RegistryUnavailable as exc:
            message = f"{exc}; still serving {self.models.uris}"
        log.warning("reload: %s", message)
        return JSONResponse({"error": message}, HTTPStatus.SERVICE_UNAVAILABLE)

    @bentoml.api
    async def embed(self, images: list[Path]) -> dict:
        models = self.models
        embeddings = await self._embeddings(models, images)
        return {"model": models.backbone_uri, "dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}

    @bentoml.api
    async def classify(self, images: list[Path], head: str = "") -> dict:
        models = self.models
        classifier = self._heads(models, "classify").classifier
        name = head or classifier.default
        if name not in classifier.heads:
            raise BadInput(f"head: unknown {name[:64]!r}; available: {sorted(classifier.heads)}")
        probabilities = classifier.predict_proba(await self._embeddings(models, images), name)
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
        values = probe.predict(await self._embeddings(models, images))
        return {"model": models.head_uri, "target": probe.target, "predictions": [float(v) for v in values]}

    @bentoml.api
    async def segment(self, images: list[Path]) -> dict:
        """Per image: a PNG of class indices at the image's own size, and each class's area fraction."""
        models = self.models
        probe = self._heads(models, "segment", "segmentation").segmentation
        pixels, sizes = await self._pixels(models, images)

        def masks() -> list[dict]:
            predictions = []
            for (width, height), patches in zip(sizes, models.embedder.tokens(pixels)[1]):
                mask = probe.predict(patches[None], (height, width))[0].astype(np.uint8)
                counts = np.bincount(mask.ravel(), minlength=len(probe.classes)) / mask.size
                predictions.append({"width": width, "height": height, "mask_png": _png(mask),
                                    "fractions": {c: float(f) for c, f in zip(probe.classes, counts)}})
            return predictions

        return {"model": models.head_uri, "classes": probe.classes, "predictions": await asyncio.to_thread(masks)}

    @bentoml.api
    async def attention(self, images: list[Path]) -> dict:
        """Last-layer CLS attention per head on the patch grid (each map sums to 1)."""
        models = self.models
        pixels, _ = await self._pixels(models, images)
        maps = await asyncio.to_thread(models.embedder.attention, pixels)
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


VisionFoundry.add_asgi_middleware(RequestGuard, max_body_bytes=MAX_REQUEST_BYTES, max_images=MAX_IMAGES,
                                  reload_token=os.environ.get("VF_RELOAD_TOKEN", ""), state=STATE)
