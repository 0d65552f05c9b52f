"""BentoML service over the promoted Vision Foundry models.

    VF_MODEL_NAME=demo VF_MODEL_ALIAS=production bentoml serve serving.service:VisionFoundry

Endpoints take images as multipart files (field ``images``): ``/embed``, ``/classify``,
``/segment``, ``/regress``, ``/attention``. Embeddings of concurrent requests are computed in
shared forward passes (adaptive batching, ``serving.batching``: ``VF_BATCH_MAX_SIZE`` images,
waiting at most ``VF_BATCH_MAX_WAIT_MS``). A poll every ``VF_RELOAD_INTERVAL_S`` seconds (0 to
disable), and ``/reload`` with the operator's ``VF_RELOAD_TOKEN``, pick up a newly promoted
version without a restart; a set that cannot be served (a head on another backbone, a head
that is gone) is refused and the old one kept, and so it is while the registry does not answer.
BentoML adds ``/readyz``, ``/livez`` and ``/metrics``; ``/docs`` is the OpenAPI page, its version
the served model versions.

At start the server checks the alias once, before any worker starts, and fetches the models'
files once for all workers: no version holding it, or files the artifact store will not give,
and the process exits 2 within seconds with one line saying what to do. Workers load that copy
beside the server, so ``/readyz`` answers 503 with the reason while they load (or if loading
failed) and never hangs. The engine (torch, transformers) is imported by the workers only.

Image requests are answered from the form the guard parsed and checked (``serving.guard``): one
parse per upload, in memory.

What a request may cost is bounded before it is decoded: ``VF_MAX_REQUEST_BYTES`` of body,
``VF_MAX_IMAGES`` images, ``VF_MAX_IMAGE_PIXELS`` per image and ``VF_MAX_REQUEST_PIXELS`` in all
(413 naming the limit). Images are decoded one at a time per request and at most
``VF_DECODE_SLOTS`` at once in the process, off the event loop, each reduced to the model's input
right away, so health checks answer while large uploads are decoded and memory does not grow
with what arrives.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import gc
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import bentoml
import numpy as np
from bentoml.exceptions import BadInput, BentoMLException
from PIL import Image, UnidentifiedImageError
from pydantic import Field
from starlette.responses import JSONResponse

from dinomx.errors import DataError, UserError
from dinomx.images import upright_size
from registry.lineage import RegistryUnavailable
from serving import log, uploads
from serving.batching import MicroBatcher
from serving.guard import ClientErrorLog, RequestGuard, ServingState
from serving.models import PromotedModels, ServingError, load, load_at_start, prefetch, servable_uris
from serving.openapi import describe
from serving.schemas import (
    Attention,
    AttentionMaps,
    Classification,
    ClassPrediction,
    Embeddings,
    Mask,
    Regression,
    Reloaded,
    Segmentation,
    SeriesPrediction,
    SeriesUpload,
    SlidePrediction,
    SlideUpload,
)

if TYPE_CHECKING:
    import torch

MAX_IMAGES = int(os.environ.get("VF_MAX_IMAGES", "64"))
MAX_IMAGE_PIXELS = int(os.environ.get("VF_MAX_IMAGE_PIXELS", str(4096 * 4096)))
MAX_REQUEST_PIXELS = int(os.environ.get("VF_MAX_REQUEST_PIXELS", str(64 * 1024 * 1024)))
MAX_REQUEST_BYTES = int(os.environ.get("VF_MAX_REQUEST_BYTES", str(64 * 1024 * 1024)))
DECODE_SLOTS = int(os.environ.get("VF_DECODE_SLOTS", "2"))
MAX_UPLOAD_BYTES = int(os.environ.get("VF_MAX_UPLOAD_BYTES", str(8 << 30)))
# Whole slides or series predicted at once per worker: each takes the cores for minutes, and the
# image routes must keep answering beside it.
PREDICT_SLOTS = int(os.environ.get("VF_PREDICT_SLOTS", "1"))
RELOAD_INTERVAL_S = float(os.environ.get("VF_RELOAD_INTERVAL_S", "60"))
# How long /reload waits for the registry before answering 503 (the service keeps its set).
REGISTRY_TIMEOUT_S = float(os.environ.get("VF_REGISTRY_TIMEOUT_S", "20"))
BATCH_MAX_SIZE = int(os.environ.get("VF_BATCH_MAX_SIZE", "64"))
BATCH_MAX_WAIT_MS = float(os.environ.get("VF_BATCH_MAX_WAIT_MS", "0"))
# Intra-op threads of a worker's forward passes. One core is left to the event loop, which parses
# requests and decodes images: a pool on every core makes them queue behind it, and OpenMP's
# spin-waiting between passes burns the core they need (a one-worker service on 2 cores answered
# ~13 % more one-image requests per second with 1 thread than with 2). Several workers: set it.
TORCH_THREADS = int(os.environ.get("VF_TORCH_THREADS", "0")) or max(1, len(os.sched_getaffinity(0)) - 1)
# Shared with the request guard, which answers /readyz with it while a moved alias is refused.
STATE = ServingState()
# MLflow's REST client retries a dead server for minutes by default; a service answers sooner.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLog())
# Whether BENTOML_RESULT_STORE is this module's choice (then each server makes its own) or the operator's.
TASK_STORE_CHOSEN = "VF_TASK_STORE_CHOSEN"


def _task_store_of_this_server() -> None:
    """BentoML keeps the async tasks' results (whole slides and series) in one SQLite file per
    BENTOML_HOME, which every ``bentoml serve`` deletes and makes anew as it starts: a second
    service on the host erased the first's task table under it ("disk I/O error" on every task).
    The results live no longer than their server anyway, so each server takes a file of its own,
    before BentoML reads the setting, and its workers inherit it; an operator's setting stands."""
    worker = getattr(sys.modules["__main__"], "__spec__", None)
    if worker is not None and worker.name == "_bentoml_impl.worker.service":
        return
    if os.environ.get("BENTOML_RESULT_STORE") and not os.environ.get(TASK_STORE_CHOSEN):
        return
    folder = tempfile.mkdtemp(prefix="vision-foundry-tasks-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["BENTOML_RESULT_STORE"] = os.path.join(folder, "task_result.db")
    os.environ[TASK_STORE_CHOSEN] = "1"


_task_store_of_this_server()
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)
LIMITS = {"VF_MAX_IMAGES": MAX_IMAGES, "VF_MAX_IMAGE_PIXELS": MAX_IMAGE_PIXELS,
          "VF_MAX_REQUEST_PIXELS": MAX_REQUEST_PIXELS, "VF_MAX_REQUEST_BYTES": MAX_REQUEST_BYTES,
          "VF_MAX_UPLOAD_BYTES": MAX_UPLOAD_BYTES}


class TooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def _open(upload: Path | BinaryIO) -> Image.Image:
    """An upload (a file BentoML saved, or the guard's in-memory one) opened from its start."""
    if hasattr(upload, "seek"):
        upload.seek(0)
    return Image.open(upload)


def _check_sizes(files: list[Path | BinaryIO]) -> None:
    """Every upload's size from its header alone, refused before anything is decoded when one
    image or the request as a whole would exceed the pixel limits. (Not its upright size: a PNG's
    orientation may lie after its pixels, and turning does not change the count.)"""
    if not files:
        raise BadInput("images: send at least one image")
    if len(files) > MAX_IMAGES:
        raise BadInput(f"images: at most {MAX_IMAGES} per request, got {len(files)}")
    sizes = []
    for index, path in enumerate(files):
        try:
            with _open(path) as img:
                width, height = img.size
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


def _decode(files: list[Path | BinaryIO], preprocess) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The model's input for every upload, and each one's upright (width, height), decoding one
    at a time (at most ``DECODE_SLOTS`` in the process) and keeping only its reduced pixels, never
    every full-size image at once."""
    import torch  # loaded with the models, in the worker; not by the process that only starts them

    pixels, sizes = [], []
    for index, path in enumerate(files):
        with _decoding:
            try:
                with _open(path) as img:
                    img.load()
                    sizes.append(upright_size(img))  # /segment answers at the size the image is seen
                    pixels.append(preprocess([img]))
            except DataError as exc:
                raise BadInput(f"images[{index}]: {exc}") from None
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
                raise BadInput(f"images[{index}]: not a readable image ({type(exc).__name__})") from None
    return torch.cat(pixels), sizes


def _output(path: Path, kind: str):
    """A prediction's output file as the answer carries it (None when the head wrote none)."""
    if not path.is_file():
        return None
    if kind == "json":
        return json.loads(path.read_text())
    return base64.b64encode(path.read_bytes()).decode() if kind == "png" else path.read_text()


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGES = Field(description="Image files (PNG, JPEG, TIFF, BMP, GIF, WebP; 8- or 16-bit), one to VF_MAX_IMAGES per "
               "request; each is turned upright by its EXIF orientation")
# As BentoML declares them (the OpenAPI page, its clients); the guard passes its in-memory uploads.
Images = Annotated[list[Path], IMAGES]


def _target() -> tuple[str, str]:
    return os.environ.get("VF_MODEL_NAME", "demo"), os.environ.get("VF_MODEL_ALIAS", "production")


@bentoml.service(name="vision_foundry", traffic={"timeout": 120})
class VisionFoundry:
    @bentoml.on_deployment
    def preflight() -> None:
        """Once, before any worker starts: the alias must name models that can be served, else the
        server exits at once with the reason (a worker that cannot load would be restarted forever).
        Their files are fetched here, once for all workers, which load them without the registry."""
        name, alias = _target()
        try:
            uris = prefetch(name, alias)
            uploads.folder()  # made here, so that every worker finds what another one stored
        except (ServingError, RegistryUnavailable) as exc:
            print(f"vision-foundry: cannot serve {name}@{alias}: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        log.info("%s@%s: serving %s", name, alias, uris)

    def __init__(self) -> None:
        self.name, self.alias = _target()
        self.models: PromotedModels | None = None
        self.batcher = MicroBatcher(BATCH_MAX_SIZE, BATCH_MAX_WAIT_MS)
        self._predict_slots = asyncio.Semaphore(PREDICT_SLOTS)
        self._reloading = threading.Lock()
        # Loaded beside the server, so that /readyz answers (503, loading) instead of hanging.
        STATE.loading = f"loading {self.name}@{self.alias}"
        threading.Thread(target=self._load, daemon=True, name="vf-load").start()
        STATE.endpoints = self._answer

    async def _answer(self, path: str, images: list[BinaryIO], options: dict[str, str]):
        """An image route answered from the guard's parsed form (see ``serving.guard``). The
        method's own function: in the worker, BentoML's attribute is a client of the HTTP route."""
        return await getattr(type(self), path.removeprefix("/")).func(self, images=images, **options)

    def __is_ready__(self) -> bool:
        return self.models is not None

    def _load(self) -> None:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        try:
            models = load_at_start(self.name, self.alias)
        except Exception as exc:  # whatever it is, /readyz says it and nothing is served on a guess
            STATE.loading, STATE.failed = None, f"cannot serve {self.name}@{self.alias}: {exc}"
            log.error("%s", STATE.failed)
            return
        # The libraries and weights just loaded live as long as the process: kept out of the
        # collector's full passes, which would otherwise walk them all and stall requests.
        gc.freeze()
        self.models = models
        STATE.serving, STATE.refused, STATE.loading, STATE.watch = models.uris, None, None, models.watch.note or None
        if models.heads is None:
            log.warning("no %s-head holds @%s: serving /embed and /attention only", self.name, self.alias)
        log.info("ready: %s", models.uris)
        if RELOAD_INTERVAL_S > 0:
            threading.Thread(target=self._poll, daemon=True, name="vf-reload").start()

    def _poll(self) -> None:
        """Follows the alias; the first check is at once, since a worker restarted long after the
        server started loads the set the server fetched then."""
        while True:
            try:
                with self._reloading:
                    self._reload()
            except ServingError as exc:
                STATE.refused = str(exc)
                log.warning("reload check: %s; still serving %s", exc, self.models.uris)
            except Exception as exc:  # the poller must outlive a registry outage or a bad promotion
                log.warning("reload check: %s; still serving %s", exc, self.models.uris)
            time.sleep(RELOAD_INTERVAL_S)

    def _reload(self) -> Reloaded:
        """Swap in the set holding the alias now (caller holds ``_reloading``). A registry that
        does not answer raises ``RegistryUnavailable``: nothing changes on a guess."""
        current = servable_uris(self.name, self.alias)
        if current == self.models.uris:
            STATE.refused = None
            return Reloaded(changed=False, backbone=current[0], head=current[1])
        if self.models.head_uri and current[1] is None:
            raise ServingError(f"no {self.name}-head holds @{self.alias} any more; serving on without the head "
                               "would answer /classify with errors: promote a head (or restart the service)")
        models = load(current)
        # Swapped in one assignment: a request sees either the old set or the new one.
        self.models = models
        STATE.serving, STATE.refused, STATE.watch = models.uris, None, models.watch.note or None
        log.info("reloaded @%s: %s", self.alias, models.uris)
        return Reloaded(changed=True, backbone=models.backbone_uri, head=models.head_uri)

    def _heads(self, models: PromotedModels, endpoint: str, probe: str | None = None):
        if models.heads is None:
            raise BadInput(f"no {self.name}-head holds @{self.alias}; /{endpoint} is unavailable")
        if probe and getattr(models.heads, probe) is None:
            raise BadInput(f"{models.head_uri} has no {probe} head; /{endpoint} is unavailable "
                           f"(train one with `heads --{'masks' if probe == 'segmentation' else 'targets'}`)")
        return models.heads

    async def _pixels(self, models: PromotedModels, images: list[Path | BinaryIO]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        _check_sizes(images)
        return await asyncio.to_thread(_decode, images, models.embedder.preprocess)

    async def _embeddings(self, models: PromotedModels, images: list[Path | BinaryIO]) -> np.ndarray:
        pixels, _ = await self._pixels(models, images)
        return await self.batcher(pixels.cpu().numpy(), models.embedder.embed_pixels)

    @bentoml.api
    async def reload(self) -> Reloaded:
        """Check the registry now and serve what holds the alias (header `Authorization: Bearer
        <VF_RELOAD_TOKEN>`). 409 while another reload runs; 503, with the set still served, when the
        registry does not answer; 400 when the new set cannot be served (the old one is kept)."""
        if self.models is None:
            return JSONResponse({"error": STATE.failed or STATE.loading}, HTTPStatus.SERVICE_UNAVAILABLE)
        if not self._reloading.acquire(blocking=False):
            return JSONResponse({"error": "a reload is already running; try again shortly"}, HTTPStatus.CONFLICT)

        def locked_reload() -> Reloaded:
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
    async def embed(self, images: Images) -> Embeddings:
        """An embedding per image from the promoted backbone (its EMA teacher's CLS token): for
        search, clustering or a model of your own. Concurrent requests share forward passes."""
        models = self.models
        embeddings = await self._embeddings(models, images)
        return Embeddings(model=models.backbone_uri, dim=int(embeddings.shape[1]), embeddings=embeddings.tolist(),
                          ood=models.watch.answer(embeddings))

    @bentoml.api
    async def classify(
        self, images: Images,
        head: Annotated[str, Field(description="Which probe answers (`linear`, `knn`, ...); empty for the head's default")] = "",
    ) -> Classification:
        """The class of each image, with every class's probability, from the promoted head on the
        promoted backbone (400 when no head is promoted)."""
        models = self.models
        classifier = self._heads(models, "classify").classifier
        name = head or classifier.default
        if name not in classifier.heads:
            raise BadInput(f"head: unknown {name[:64]!r}; available: {sorted(classifier.heads)}")
        embeddings = await self._embeddings(models, images)
        probabilities = classifier.predict_proba(embeddings, name)
        predictions = [
            ClassPrediction(label=classifier.classes[int(np.argmax(p))], confidence=float(np.max(p)),
                            probabilities={c: float(v) for c, v in zip(classifier.classes, p)})
            for p in probabilities
        ]
        return Classification(model=models.head_uri, backbone=models.backbone_uri, head=name, predictions=predictions,
                              ood=models.watch.answer(embeddings))

    @bentoml.api
    async def regress(self, images: Images) -> Regression:
        """The promoted head's regression target per image (e.g. the fraction of a structure)."""
        models = self.models
        probe = self._heads(models, "regress", "regression").regression
        embeddings = await self._embeddings(models, images)
        values = probe.predict(embeddings)
        return Regression(model=models.head_uri, target=probe.target, predictions=[float(v) for v in values],
                          ood=models.watch.answer(embeddings))

    @bentoml.api
    async def segment(self, images: Images) -> Segmentation:
        """Per image: a PNG of class indices at the image's own size, and each class's area fraction."""
        models = self.models
        probe = self._heads(models, "segment", "segmentation").segmentation
        pixels, sizes = await self._pixels(models, images)

        def masks() -> tuple[list[Mask], np.ndarray]:
            predictions = []
            embeddings, tokens = models.embedder.tokens(pixels)
            for (width, height), patches in zip(sizes, tokens):
                mask = probe.predict(patches[None], (height, width))[0].astype(np.uint8)
                counts = np.bincount(mask.ravel(), minlength=len(probe.classes)) / mask.size
                predictions.append(Mask(width=width, height=height, mask_png=_png(mask),
                                        fractions={c: float(f) for c, f in zip(probe.classes, counts)}))
            return predictions, embeddings

        predictions, embeddings = await asyncio.to_thread(masks)
        return Segmentation(model=models.head_uri, classes=probe.classes, predictions=predictions,
                            ood=models.watch.answer(embeddings))

    @bentoml.api
    async def upload_slide(
        self, slide: Annotated[Path, Field(description="A whole-slide image (SVS, NDPI, MRXS, TIFF, ...), sent with a "
                                                        "Content-Length, at most VF_MAX_UPLOAD_BYTES")],
    ) -> SlideUpload:
        """Keep a whole slide for `/predict_slide` (streamed to disk by the request guard, opened to
        check it is a slide); answers its id. 411 without a Content-Length, 413 over VF_MAX_UPLOAD_BYTES."""
        return SlideUpload(**await self._store(slide, "slide"))

    @bentoml.api
    async def upload_series(
        self, series: Annotated[Path, Field(description="A .zip of one CT series' DICOM files, sent with a "
                                                         "Content-Length, at most VF_MAX_UPLOAD_BYTES")],
    ) -> SeriesUpload:
        """Keep a CT series for `/predict_series` (streamed to disk by the request guard, unpacked and
        checked to be one volume with no missing slice); answers its id and geometry."""
        return SeriesUpload(**await self._store(series, "series"))

    @staticmethod
    async def _store(path: Path, kind: str) -> dict:
        with open(path, "rb") as f:
            try:
                return await asyncio.to_thread(uploads.store, f, path.name, kind)
            except uploads.UploadRefused as exc:
                raise BadInput(str(exc)) from None

    async def _predict(self, kind: str, upload_id: str, head: str, run) -> tuple[PromotedModels, Path, dict]:
        """The promoted head, cut as its lineage says, over an upload (``run(path, predictor,
        tiling, out, provenance)``), at most VF_PREDICT_SLOTS at once; (models, outputs, summary)."""
        from data.tiling import Tiling
        from dinomx.inference import TilePredictor

        models = self.models
        heads = self._heads(models, f"predict_{kind}")
        if not models.tiling:
            raise BadInput(f"{models.head_uri} was fitted on images not cut from slides or series (no tiling in its "
                           f"lineage); /predict_{kind} cannot cut the {kind} as its training data was")
        try:
            path = uploads.find(upload_id, kind)
            predictor = TilePredictor(models.embedder, heads, head or None)
        except (uploads.UploadRefused, KeyError) as exc:
            raise BadInput(str(exc.args[0])) from None
        tiling = Tiling.from_json(models.tiling, f"{models.head_uri} tiling")
        out = path.parent / f"prediction-{time.monotonic_ns()}"
        async with self._predict_slots:
            try:
                summary = await asyncio.to_thread(run, path, predictor, tiling, out,
                                                  {"model": models.head_uri, "backbone": models.backbone_uri})
            except UserError as exc:
                raise BadInput(f"{kind}_id {upload_id}: {exc}") from None
        return models, out, summary

    @bentoml.task
    async def predict_slide(
        self, slide_id: Annotated[str, Field(description="The id `/upload_slide` answered")],
        head: Annotated[str, Field(description="Which classifier of the head answers; empty for its default")] = "",
    ) -> SlidePrediction:
        """The promoted head over a whole uploaded slide, cut as the head's training tiles were (its
        lineage's tiling): per-tile table, heatmap, aggregates and QuPath GeoJSON. An asynchronous
        task: `POST /predict_slide/submit` answers a task id, `GET /predict_slide/status?task_id=`
        its state, `GET /predict_slide/get?task_id=` the answer."""
        from clinical.slide import HEATMAP, REGIONS, SEGMENTS, TABLE, predict_slide

        def run(path, predictor, tiling, out, provenance):
            return predict_slide(path, predictor, tiling, out, 32, provenance)

        models, out, summary = await self._predict("slide", slide_id, head, run)
        try:
            return SlidePrediction(model=models.head_uri, backbone=models.backbone_uri, slide_id=slide_id,
                                   summary=summary, regions=_output(out / REGIONS, "json"),
                                   segmentation=_output(out / SEGMENTS, "json"), heatmap_png=_output(out / HEATMAP, "png"),
                                   tiles_csv=_output(out / TABLE, "text"))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    @bentoml.task
    async def predict_series(
        self, series_id: Annotated[str, Field(description="The id `/upload_series` answered")],
        score: Annotated[str, Field(description="A score module over the head's lesion masks (e.g. agatston); "
                                                "empty for the head's per-slice answers only")] = "",
        head: Annotated[str, Field(description="Which classifier of the head answers; empty for its default")] = "",
    ) -> SeriesPrediction:
        """The promoted head over every slice of an uploaded CT series, cut as its training slices
        were, and a score over its lesion masks: per-slice table, the score's total, category and
        lesion list. An asynchronous task like `/predict_slide`."""
        from clinical import scores
        from clinical.series import LESIONS, SLICES, predict_series

        if score:
            try:
                scores.get(score)
            except scores.ScoreError as exc:
                raise BadInput(str(exc)) from None

        def run(path, predictor, tiling, out, provenance):
            return predict_series(path, out, predictor, tiling, score or None, provenance=provenance)

        models, out, summary = await self._predict("series", series_id, head, run)
        try:
            return SeriesPrediction(model=models.head_uri, backbone=models.backbone_uri, series_id=series_id,
                                    summary=summary, slices_csv=_output(out / SLICES, "text"),
                                    lesions_csv=_output(out / LESIONS, "text"))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    @bentoml.api
    async def attention(self, images: Images) -> Attention:
        """Last-layer CLS attention per head on the patch grid (each map sums to 1), and their mean as a PNG."""
        models = self.models
        pixels, _ = await self._pixels(models, images)
        embeddings = await self.batcher(pixels.cpu().numpy(), models.embedder.embed_pixels)
        maps = await asyncio.to_thread(models.embedder.attention, pixels)
        maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
        mean = maps.mean(1)
        return Attention(
            model=models.backbone_uri,
            grid=list(maps.shape[-2:]),
            predictions=[AttentionMaps(maps=m.tolist(), mean_png=_png((255 * (a / a.max()).numpy()).astype(np.uint8)))
                         for m, a in zip(maps, mean)],
            ood=models.watch.answer(embeddings),
        )


VisionFoundry.add_asgi_middleware(RequestGuard, max_body_bytes=MAX_REQUEST_BYTES, max_images=MAX_IMAGES,
                                  reload_token=os.environ.get("VF_RELOAD_TOKEN", ""), state=STATE,
                                  max_upload_bytes=MAX_UPLOAD_BYTES,
                                  describe=lambda spec: describe(spec, STATE.serving, _target(), LIMITS))
