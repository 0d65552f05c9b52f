"""How far served images lie from what a backbone was evaluated on, per image and per window.

A ``Reference`` is built from a backbone's embeddings of an evaluation split: a PCA fitted on its
train images (embeddings L2-normalised first, as the kNN probes see them) and a bounded sample of
its val images projected on it (their coordinates on the principal axes, and their distance off
them). An image's score is the distance to its k-th nearest reference
point, and its percentile is the share of the reference's own leave-one-out distances at or below
that score: an in-distribution image lands above the 99th percentile about 1 % of the time,
whatever the model or the data. A window of recent images is compared with the reference as a
whole by a two-sample test on the same projection (``WINDOW_TESTS``): per-component
Kolmogorov-Smirnov with a Bonferroni correction, which Rabanser et al. ("Failing Loudly", 2019)
found among the strongest on image data, or MMD with a permutation p-value.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.special import kolmogorov

from dinomx.errors import DataError

FORMAT = 1


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _kth_distance(queries: np.ndarray, points: np.ndarray, k: int, leave_one_out: bool = False) -> np.ndarray:
    """Euclidean distance from each query to its k-th nearest point (the query itself excluded
    when ``leave_one_out``: queries are then the points)."""
    squared = (queries ** 2).sum(1)[:, None] - 2 * queries @ points.T + (points ** 2).sum(1)[None]
    if leave_one_out:
        np.fill_diagonal(squared, np.inf)
    kth = np.partition(squared, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(kth, 0.0))


@dataclass
class Reference:
    """What served images are compared with: the projection and the reference sample."""

    mean: np.ndarray  # (D,) of the normalised train embeddings
    components: np.ndarray  # (C, D) principal axes of the train embeddings
    points: np.ndarray  # (N, C + 1) the val sample, projected (``project``)
    loo: np.ndarray  # (N,) sorted leave-one-out k-th neighbour distances of ``points``
    k: int
    threshold: float  # percentile above which an image is out of distribution
    about: dict  # what it was built from: backbone, data, data_md5, train and val counts

    @cached_property
    def sorted_points(self) -> np.ndarray:
        """Each coordinate of the reference sample in order: what a KS test reads."""
        return np.sort(self.points, axis=0)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, components: int = 32, max_points: int = 5000, k: int = 5,
            threshold: float = 99.0, seed: int = 0, about: dict | None = None) -> "Reference":
        train, val = _normalise(train), _normalise(val)
        if len(train) < 2 or len(val) <= k:
            raise DataError(f"reference: needs at least 2 train and {k + 1} val embeddings, got {len(train)} and {len(val)}")
        if not 0 < threshold < 100:
            raise DataError(f"reference: threshold is a percentile between 0 and 100, got {threshold}")
        mean = train.mean(0)
        # The axes along which the train images vary most; the rest is noise a test would spend its power on.
        _, _, axes = np.linalg.svd(train - mean, full_matrices=False)
        axes = axes[:min(components, axes.shape[0])].astype(np.float32)
        if len(val) > max_points:
            val = val[np.random.default_rng(seed).choice(len(val), max_points, replace=False)]
        reference = cls(mean, axes, np.zeros((0, len(axes) + 1)), np.zeros(0), k, float(threshold),
                        {**(about or {}), "train": int(len(train)), "val": int(len(val))})
        reference.points = reference._project(val)
        reference.loo = np.sort(_kth_distance(reference.points, reference.points, k, leave_one_out=True))
        return reference

    def check(self, backbone: str) -> "Reference":
        """Refuses (``DataError``) a reference built for another backbone than ``backbone``."""
        if self.about.get("backbone") != backbone:
            raise DataError(f"built for {self.about.get('backbone')}, not {backbone}")
        return self

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Coordinates on the principal axes, and the distance off them: a shift along a direction
        the train images never varied in leaves the axes' coordinates alone, not that distance."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise DataError(f"reference: expected embeddings of dimension {self.dim}, got shape {embeddings.shape}")
        return self._project(_normalise(embeddings))

    def _project(self, normalised: np.ndarray) -> np.ndarray:
        centred = normalised - self.mean
        coordinates = centred @ self.components.T
        off = np.linalg.norm(centred - coordinates @ self.components, axis=1, keepdims=True)
        return np.concatenate([coordinates, off], axis=1).astype(np.float32)

    def score(self, projected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each projected image's k-th neighbour distance to the reference, and its percentile
        among the reference's own leave-one-out distances (0-100)."""
        distances = _kth_distance(projected, self.points, self.k)
        return distances, 100.0 * np.searchsorted(self.loo, distances, side="right") / len(self.loo)

    def save(self, path: str | Path) -> str:
        """Written as one ``.npz``; returns its SHA-256, by which a reader knows it is this one."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, components=self.components, points=self.points, loo=self.loo,
                 meta=np.frombuffer(json.dumps({"format": FORMAT, "k": self.k, "threshold": self.threshold,
                                                "about": self.about}).encode(), dtype=np.uint8))
        Path(path).write_bytes(buffer.getvalue())
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "Reference":
        """The reference at ``path``; refused (``DataError``, one line) when it is not the one
        ``sha256`` names or not a reference."""
        raw = Path(path).read_bytes()
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
            raise DataError(f"{path}: not the reference its record names (SHA-256 differs)")
        try:
            with np.load(io.BytesIO(raw)) as stored:
                meta = json.loads(stored["meta"].tobytes())
                arrays = {name: stored[name] for name in ("mean", "components", "points", "loo")}
        except (ValueError, KeyError, OSError) as exc:
            raise DataError(f"{path}: not a reference ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{path}: reference format {meta.get('format')!r}, expected {FORMAT}")
        return cls(**arrays, k=int(meta["k"]), threshold=float(meta["threshold"]), about=meta["about"])


@dataclass(frozen=True)
class WindowResult:
    test: str
    statistic: float
    p_value: float
    drifted: bool
    size: int
    ood_fraction: float  # of the window's images beyond the threshold
    mean_percentile: float


def ks_bonferroni(reference: Reference, window: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Largest per-component two-sample Kolmogorov-Smirnov statistic, and the smallest p-value
    times the number of components. The statistic is read at the window's points only (the
    empirical CDFs differ most at a jump, and between two window points only the reference's
    moves), so a window costs the same whatever the reference's size; p-values are the asymptotic
    Kolmogorov distribution with Stephens' small-sample correction. Parity with scipy's
    ``ks_2samp`` is tested (``tests/test_drift.py``)."""
    ordered, sorted_window = reference.sorted_points, np.sort(window, axis=0)
    n, m = len(ordered), len(window)
    statistics = np.empty(ordered.shape[1])
    for c in range(ordered.shape[1]):
        r, w = ordered[:, c], sorted_window[:, c]
        at = np.searchsorted(r, w, side="right") / n - np.searchsorted(w, w, side="right") / m
        before = np.searchsorted(r, w, side="left") / n - np.searchsorted(w, w, side="left") / m
        statistics[c] = max(np.abs(at).max(), np.abs(before).max())
    root = np.sqrt(n * m / (n + m))
    p_values = kolmogorov((root + 0.12 + 0.11 / root) * statistics)
    return float(statistics.max()), float(min(1.0, p_values.min() * len(statistics)))


def mmd_permutation(reference: Reference, window: np.ndarray, rng: np.random.Generator,
                    permutations: int = 200, max_reference: int = 500) -> tuple[float, float]:
    """Squared MMD with a Gaussian kernel (median heuristic), and its permutation p-value."""
    reference = reference.points
    if len(reference) > max_reference:
        reference = reference[rng.choice(len(reference), max_reference, replace=False)]
    both = np.concatenate([reference, window]).astype(np.float64)
    squared = np.maximum((both ** 2).sum(1)[:, None] - 2 * both @ both.T + (both ** 2).sum(1)[None], 0.0)
    kernel = np.exp(-squared / np.median(squared[squared > 0]))
    n, m = len(reference), len(window)

    def mmd(labels: np.ndarray) -> float:
        a, b = labels == 0, labels == 1
        return kernel[a][:, a].mean() + kernel[b][:, b].mean() - 2 * kernel[a][:, b].mean()

    labels = np.r_[np.zeros(n, int), np.ones(m, int)]
    observed = mmd(labels)
    null = [mmd(rng.permutation(labels)) for _ in range(permutations)]
    return float(observed), (1 + sum(v >= observed for v in null)) / (1 + permutations)


WINDOW_TESTS: dict[str, Callable[[Reference, np.ndarray, np.random.Generator], tuple[float, float]]] = {
    "ks": ks_bonferroni, "mmd": mmd_permutation}


def window_test(reference: Reference, window: np.ndarray, test: str = "ks", alpha: float = 0.01,
                seed: int = 0) -> WindowResult:
    """``window``: projected embeddings of recent images."""
    statistic, p_value = WINDOW_TESTS[test](reference, window, np.random.default_rng(seed))
    _, percentiles = reference.score(window)
    return WindowResult(test, float(statistic), float(p_value), bool(p_value < alpha), int(len(window)),
                        float((percentiles > reference.threshold).mean()), float(percentiles.mean()))
