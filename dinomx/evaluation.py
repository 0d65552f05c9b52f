"""Fit every head on a frozen backbone and score it on the val split: what ``heads`` registers and
``evaluate`` reports.

Metrics (val split, flat names so runs compare column by column in the MLflow UI):
``linear.*`` / ``knn.*``: accuracy, precision_macro, f1_macro; ``cluster.ami`` (k-means with one
cluster per class against the labels), ``cluster.dbi`` (Davies-Bouldin of the embeddings under the
true labels, lower is better); ``regression.pearson`` / ``r2`` / ``mae``; ``segmentation.dice``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import (
    accuracy_score,
    adjusted_mutual_info_score,
    confusion_matrix,
    davies_bouldin_score,
    f1_score,
    mean_absolute_error,
    precision_score,
    r2_score,
)

from dinomx.classifiers import ClassifierHeads, KNNClassifier, LinearClassifier
from dinomx.data import labelled_images
from dinomx.embed import Embedder
from dinomx.errors import DataError, MissingInput
from dinomx.images import load_image
from dinomx.probes import RegressionProbe, SegmentationProbe, TaskHeads, dice
from dinomx.shards import is_sharded


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray
    embeddings: np.ndarray
    patches: np.ndarray | None = None  # (N, h, w, D), kept only for segmentation


@dataclass
class Evaluation:
    heads: TaskHeads
    metrics: dict[str, float]
    classes: list[str]
    confusion: np.ndarray  # default classifier, rows = true class
    val: Split


def _embed(embedder: Embedder, root: Path, with_patches: bool) -> tuple[Split, list[str]]:
    """The split's CLS embeddings and, for segmentation, its patch tokens, from one forward pass."""
    paths, images, labels, classes = labelled_images(root, embedder.num_channels)
    if with_patches:
        embeddings, patches = embedder.features(images)
        return Split(paths, np.asarray(labels), embeddings, patches), classes
    return Split(paths, np.asarray(labels), embedder.embed(images)), classes


def _masks(split: Split, data: Path, masks_root: Path) -> np.ndarray:
    """The masks of the split's images (``masks_root`` mirrors ``data``)."""
    missing = [p for p in split.paths if not (masks_root / p.relative_to(data)).is_file()]
    if missing:
        raise MissingInput(f"masks: {len(missing)} images have no mask under {masks_root}, e.g. {missing[0]}")
    return np.stack([np.asarray(load_image(masks_root / p.relative_to(data), 1)) for p in split.paths])


def _targets(csv: Path, column: str, split: Split, data: Path) -> np.ndarray:
    table = pd.read_csv(csv)
    if "path" not in table or column not in table:
        raise DataError(f"{csv}: expected columns 'path' and '{column}', found {list(table.columns)}")
    values = dict(zip(table["path"], table[column]))
    keys = [p.relative_to(data).as_posix() for p in split.paths]
    missing = [k for k in keys if k not in values]
    if missing:
        raise DataError(f"{csv}: no '{column}' for {len(missing)} images (paths relative to {data}), e.g. {missing[0]}")
    return np.asarray([values[k] for k in keys], dtype=np.float64)


def classification_metrics(prefix: str, truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}.accuracy": float(accuracy_score(truth, predicted)),
        f"{prefix}.precision_macro": float(precision_score(truth, predicted, average="macro", zero_division=0)),
        f"{prefix}.f1_macro": float(f1_score(truth, predicted, average="macro")),
    }


RANDOM_INIT = "random_init."  # metric prefix of the same architecture before any training


def random_init_knn(embedder: Embedder, data: str | Path, knn_k: int = 20) -> dict[str, float]:
    """kNN metrics of ``embedder``'s architecture at random init on the same split: what the
    promotion gate's floor compares the trained backbone's kNN with."""
    baseline = embedder.at_random_init()
    train, classes = _embed(baseline, Path(data) / "train", with_patches=False)
    val, _ = _embed(baseline, Path(data) / "val", with_patches=False)
    predicted = KNNClassifier(len(classes), k=knn_k).fit(train.embeddings, train.labels).predict_proba(val.embeddings).argmax(1)
    return classification_metrics(f"{RANDOM_INIT}knn", val.labels, predicted)


def evaluate(embedder: Embedder, data: str | Path, knn_k: int = 20, masks: str | Path | None = None,
             targets: str | Path | None = None, target_column: str = "") -> Evaluation:
    """Fit on ``<data>/train``, score on ``<data>/val``; optional masks (segmentation) and a targets
    CSV (regression) add their probes and metrics."""
    data = Path(data)
    if (masks or targets) and is_sharded(data / "train"):
        raise DataError(f"{data}: segmentation masks and regression targets are read beside image folders; "
                        "ingest with --layout folder to fit those heads")
    train, classes = _embed(embedder, data / "train", with_patches=bool(masks))
    val, val_classes = _embed(embedder, data / "val", with_patches=bool(masks))
    if val_classes != classes:
        raise DataError(f"{data}: val classes {val_classes} differ from train classes {classes}")
    candidates = {
        "linear": LinearClassifier(len(classes)).fit(train.embeddings, train.labels),
        "knn": KNNClassifier(len(classes), k=knn_k).fit(train.embeddings, train.labels),
    }
    metrics, predictions = {}, {}
    for name, head in candidates.items():
        predictions[name] = head.predict_proba(val.embeddings).argmax(1)
        metrics.update(classification_metrics(name, val.labels, predictions[name]))
    default = max(candidates, key=lambda n: metrics[f"{n}.f1_macro"])
    clusters = KMeans(n_clusters=len(classes), n_init=10, random_state=0).fit_predict(val.embeddings)
    metrics["cluster.ami"] = float(adjusted_mutual_info_score(val.labels, clusters))
    metrics["cluster.dbi"] = float(davies_bouldin_score(val.embeddings, val.labels))
    heads = TaskHeads(ClassifierHeads(classes, candidates, default, embedder.dim))

    if masks:
        masks = Path(masks)
        mask_classes = json.loads((masks.parent / "classes.json").read_text())
        train_masks = _masks(train, data / "train", masks / "train")
        val_masks = _masks(val, data / "val", masks / "val")
        heads.segmentation = SegmentationProbe(mask_classes).fit(train.patches, train_masks)
        predicted = heads.segmentation.predict(val.patches, val_masks.shape[1:])
        metrics["segmentation.dice"] = dice(predicted, val_masks, len(mask_classes))

    if targets:
        if not target_column:
            raise DataError("target_column: name the column of the targets CSV to regress")
        y_train = _targets(Path(targets), target_column, train, data)
        y_val = _targets(Path(targets), target_column, val, data)
        heads.regression = RegressionProbe(target_column).fit(train.embeddings, y_train)
        predicted = heads.regression.predict(val.embeddings)
        metrics["regression.pearson"] = float(np.corrcoef(predicted, y_val)[0, 1])
        metrics["regression.r2"] = float(r2_score(y_val, predicted))
        metrics["regression.mae"] = float(mean_absolute_error(y_val, predicted))

    confusion = confusion_matrix(val.labels, predictions[default], labels=list(range(len(classes))))
    return Evaluation(heads, metrics, classes, confusion, val)


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(evaluation.classes), 1 + 0.6 * len(evaluation.classes)))
    ax.imshow(evaluation.confusion, cmap="Blues")
    ticks = range(len(evaluation.classes))
    ax.set_xticks(ticks, evaluation.classes, rotation=45, ha="right")
    ax.set_yticks(ticks, evaluation.classes)
    for (i, j), value in np.ndenumerate(evaluation.confusion):
        ax.text(j, i, str(value), ha="center", va="center")
    ax.set_xlabel(f"predicted ({evaluation.heads.classifier.default})")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_embeddings(evaluation: Evaluation, path: Path) -> Path:
    """Val embeddings on their first two principal components, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = evaluation.val.embeddings - evaluation.val.embeddings.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4))
    for index, name in enumerate(evaluation.classes):
        chosen = evaluation.val.labels == index
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=8, label=name)
    ax.legend(fontsize=7)
    ax.set_title("val embeddings (PCA)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
