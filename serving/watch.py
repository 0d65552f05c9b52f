"""The service's watch on what it is sent, against what its backbone was evaluated on.

Every image a route embeds is scored against the drift reference the promotion service's own
evaluation of the served backbone recorded in its ledger (``dinomx.drift``): its distance to the
reference and that distance's percentile among the reference's own. Each worker keeps the last
images it embedded in a window of ``VF_WATCH_WINDOW``; a full window is tested against the
reference (``VF_WATCH_TEST``: ``ks``, per-component Kolmogorov-Smirnov with a Bonferroni
correction, or ``mmd``; drift when p < ``VF_WATCH_ALPHA``) on a thread of its own, off the request
path, and the window starts again. Results go to Prometheus (``/metrics``) and to one MLflow run per
served backbone in the ``VF_WATCH_EXPERIMENT`` experiment (a point per window, written at most every
``VF_WATCH_LOG_INTERVAL_S``), logged as
``VF_WATCH_TRACKING_USERNAME`` where the tracking server wants one (an identity that may only log
there). A backbone without a reference is served as before, and every answer and ``/readyz``
say so; ``VF_WATCH=off`` serves every backbone so.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag, ViewType
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.rest_utils import MlflowHostCreds
from prometheus_client import Counter, Gauge, Histogram

from dinomx.drift import WINDOW_TESTS, Reference, WindowResult, window_test
from registry.lineage import equals
from registry.mlflow_service import MONITORING_EXPERIMENT, Tag
from serving import log
from serving.schemas import OOD, OODScore

ON = os.environ.get("VF_WATCH", "on") != "off"
WINDOW = int(os.environ.get("VF_WATCH_WINDOW", "100"))
ALPHA = float(os.environ.get("VF_WATCH_ALPHA", "0.01"))
TEST = os.environ.get("VF_WATCH_TEST", "ks")
EXPERIMENT = os.environ.get("VF_WATCH_EXPERIMENT", MONITORING_EXPERIMENT)
# Windows tested since the last call are logged to MLflow at most this often, a point each: one call
# per window on a busy service would be a write to the tracking server every few hundred ms.
LOG_INTERVAL_S = float(os.environ.get("VF_WATCH_LOG_INTERVAL_S", "10"))
MAX_POINTS = 1000
if TEST not in WINDOW_TESTS:
    raise SystemExit(f"VF_WATCH_TEST: expected one of {sorted(WINDOW_TESTS)}, got {TEST!r}")
if WINDOW < 2:
    raise SystemExit(f"VF_WATCH_WINDOW: expected at least 2 images, got {WINDOW}")

PERCENTILE = Histogram("vf_ood_percentile", "Percentile of each served image's distance to the backbone's drift "
                       "reference, among the reference's own", ["backbone"], buckets=(50, 90, 95, 99, 99.9, 100))
OUT_OF_DISTRIBUTION = Counter("vf_ood_images", "Served images beyond the reference's threshold", ["backbone"])
P_VALUE = Gauge("vf_drift_p_value", "p-value of the newest window's two-sample test against the reference",
                ["backbone", "test"], multiprocess_mode="mostrecent")
WINDOWS = Counter("vf_drift_windows", "Windows of served images tested against the reference",
                  ["backbone", "drifted"])
DROPPED = Counter("vf_drift_windows_dropped", "Full windows not tested because the tester was behind", ["backbone"])


class Recorder:
    """One MLflow run per watched backbone (found by its tag, else started), a point per window."""

    def __init__(self, tracking_uri: str):
        user, password = os.environ.get("VF_WATCH_TRACKING_USERNAME"), os.environ.get("VF_WATCH_TRACKING_PASSWORD")
        self.user = user or os.environ.get("MLFLOW_TRACKING_USERNAME") or "vision-foundry-service"
        if user and tracking_uri.startswith(("http://", "https://")):
            self.store = RestStore(lambda: MlflowHostCreds(tracking_uri, username=user, password=password))
        else:  # the service's own identity, or an embedded store: the store behind MlflowClient, so that
            # both cases speak MLflow's one store interface (a client takes no credentials of its own)
            self.store = MlflowClient(tracking_uri)._tracking_client.store
        self.runs: dict[str, tuple[str, int]] = {}  # backbone -> (run id, next step)

    def _run(self, backbone: str, reference_run: str) -> tuple[str, int]:
        if backbone not in self.runs:
            experiment = self.store.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                experiment_id = self.store.create_experiment(EXPERIMENT)
            else:
                experiment_id = experiment.experiment_id
            found = self.store.search_runs([experiment_id], equals(f"tags.`{Tag.MONITORED_MODEL}`", backbone),
                                           ViewType.ACTIVE_ONLY,
                                           max_results=1, order_by=["attributes.start_time ASC"])
            if found:
                run_id = found[0].info.run_id
                step = len(self.store.get_metric_history(run_id, "drift.p_value"))
            else:
                run_id = self.store.create_run(experiment_id, self.user, int(time.time() * 1000), [
                    RunTag(Tag.ENTRY_POINT, "monitoring"), RunTag(Tag.MONITORED_MODEL, backbone),
                    RunTag(Tag.REFERENCE_RUN, reference_run), RunTag("mlflow.runName", f"monitoring {backbone}"),
                    RunTag(Tag.NOTE, f"What `{backbone}` was sent, a point per window, against the reference of the "
                                     f"promotion service's evaluation run `{reference_run}`.")],
                                              f"monitoring {backbone}").info.run_id
                step = 0
            self.runs[backbone] = (run_id, step)
        return self.runs[backbone]

    def log(self, tested: list[tuple[Watch, WindowResult, int]]) -> None:
        """Each window's point (at the time it was tested), one call per backbone."""
        points: dict[str, list[Metric]] = {}
        for watch, result, at in tested:
            run_id, step = self._run(watch.backbone, watch.reference_run)
            values = {"drift.p_value": result.p_value, "drift.statistic": result.statistic,
                      "drift.detected": float(result.drifted), "ood.fraction": result.ood_fraction,
                      "ood.mean_percentile": result.mean_percentile, "window.size": float(result.size)}
            points.setdefault(run_id, []).extend(Metric(k, v, at, step) for k, v in values.items())
            self.runs[watch.backbone] = (run_id, step + 1)
        for run_id, batch in points.items():
            for start in range(0, len(batch), MAX_POINTS):  # MLflow takes at most 1,000 metrics a call
                self.store.log_batch(run_id, batch[start:start + MAX_POINTS], [], [])


@dataclass
class Watch:
    """The watch of one served backbone in one worker."""

    backbone: str
    reference: Reference | None
    note: str  # why there is no reference; empty with one
    reference_run: str = ""

    def __post_init__(self):
        self._window: list[np.ndarray] = []
        self._lock = threading.Lock()

    def answer(self, embeddings: np.ndarray) -> OOD:
        """The answer's ``ood``: each image's score; its projection joins the window."""
        if self.reference is None:
            return OOD(reference=None, threshold_percentile=None, window=WINDOW, scores=[], note=self.note)
        projected = self.reference.project(embeddings)
        distances, percentiles = self.reference.score(projected)
        inside = percentiles <= self.reference.threshold
        for percentile in percentiles:
            PERCENTILE.labels(self.backbone).observe(float(percentile))
        if (~inside).any():
            OUT_OF_DISTRIBUTION.labels(self.backbone).inc(int((~inside).sum()))
        with self._lock:
            self._window.extend(projected)
            while len(self._window) >= WINDOW:
                full, self._window = np.stack(self._window[:WINDOW]), self._window[WINDOW:]
                TESTER.submit(self, full)
        return OOD(reference=self.reference_run, threshold_percentile=self.reference.threshold, window=WINDOW,
                   scores=[OODScore(score=float(d), percentile=float(p), in_distribution=bool(i))
                           for d, p, i in zip(distances, percentiles, inside)], note="")


class Tester:
    """Tests full windows on a thread of its own, in order, and publishes each result; a window
    arriving while ``MAX_PENDING`` wait is dropped (counted), never queued without bound."""

    MAX_PENDING = 8

    def __init__(self):
        self.pending: queue.Queue = queue.Queue(self.MAX_PENDING)
        self.recorder: Recorder | None = None
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def start(self) -> None:
        """The tester's thread, which first opens the tracking store: its first connection (SQLite
        runs its migrations check) costs a second, paid at load rather than under load."""
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="vf-watch")
                self._thread.start()

    def submit(self, watch: Watch, window: np.ndarray) -> None:
        self.start()
        try:
            self.pending.put_nowait((watch, window))
        except queue.Full:
            DROPPED.labels(watch.backbone).inc()

    def _run(self) -> None:
        try:
            self.recorder = Recorder(mlflow.get_tracking_uri())
        except Exception as exc:  # said again, and retried, when there is something to log
            log.warning("drift watch: the tracking store cannot be opened yet: %s: %s", type(exc).__name__, exc)
        tested: list[tuple[Watch, WindowResult, int]] = []
        logged = time.monotonic()
        while True:
            try:
                watch, window = self.pending.get(timeout=LOG_INTERVAL_S or None)
            except queue.Empty:
                watch = None
            if watch is not None:
                try:
                    tested.append((watch, self._test(watch, window), int(time.time() * 1000)))
                except Exception as exc:  # the watch must never take the service down with it
                    log.warning("drift watch of %s: %s: %s", watch.backbone, type(exc).__name__, exc)
            if tested and (watch is None or time.monotonic() - logged >= LOG_INTERVAL_S):
                try:
                    if self.recorder is None:
                        self.recorder = Recorder(mlflow.get_tracking_uri())
                    self.recorder.log(tested)
                except Exception as exc:  # a tracking server down loses points, never requests
                    log.warning("drift watch: %d window(s) not logged to MLflow: %s: %s", len(tested),
                                type(exc).__name__, exc)
                tested, logged = [], time.monotonic()

    @staticmethod
    def _test(watch: Watch, window: np.ndarray) -> WindowResult:
        result = window_test(watch.reference, window, TEST, ALPHA)
        P_VALUE.labels(watch.backbone, TEST).set(result.p_value)
        WINDOWS.labels(watch.backbone, str(result.drifted).lower()).inc()
        if result.drifted:
            log.warning("drift: %s was sent %d images unlike its reference (%s p=%.2g, %.0f%% beyond the threshold)",
                        watch.backbone, result.size, result.test, result.p_value, 100 * result.ood_fraction)
        return result


TESTER = Tester()
