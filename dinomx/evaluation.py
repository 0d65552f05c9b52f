"""Fit every head on a frozen backbone and score it on the val split: what ``heads`` registers and
``evaluate`` reports.

Metrics (val split, flat names so runs compare column by column in the MLflow UI):
``linear.*`` / ``knn.*``: accuracy, precision_macro, f1_macro; ``cluster.ami`` (k-means with one
cluster per class against the labels), ``cluster.dbi`` (Davies-Bouldin of the embeddings under the
true labels, lower is better); ``regression.pearson`` / ``r2`` / ``mae``; ``segmentation.dice``;
per category of the default classifier (``category_metrics``): sensitivity, specificity, PPV,
NPV, F1 and accuracy, and Cohen's kappa (quadratic-weighted when the categories are ordered).

The paper's protocol adds grouped k-fold cross-validation (``cross_validate``: no case, slide or
patient in two folds) and external test sets (``external``: fitted on one set, scored on another).
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
    cohen_kappa_score,
    confusion_matrix,
    davies_bouldin_score,
    f1_score,
    mean_absolute_error,
    precision_score,
    r2_score,
)
from sklearn.model_selection import StratifiedGroupKFold

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
    train: Split


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


CATEGORY_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def category_metrics(truth: np.ndarray, predicted: np.ndarray, classes: list[str],
                     order: list[str] | None = None) -> dict[str, float]:
    """Each category against the rest (``<class>.sensitivity``, ``.specificity``, ``.ppv``, ``.npv``,
    ``.f1``, ``.accuracy``), the overall ``accuracy``, and Cohen's ``kappa``: quadratic-weighted
    when ``order`` gives the categories' order (a risk category one off is nearer than three off),
    as the paper reports agreement on ordered calcium categories. A ratio with nothing to count
    (no case of the category) is NaN, not 0."""
    matrix = confusion_matrix(truth, predicted, labels=list(range(len(classes))))
    total = matrix.sum()
    out = {"accuracy": float(np.trace(matrix) / total) if total else float("nan")}
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, name in enumerate(classes):
            tp = matrix[index, index]
            fn, fp = matrix[index].sum() - tp, matrix[:, index].sum() - tp
            tn = total - tp - fn - fp
            values = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp),
                      "npv": tn / (tn + fn), "f1": 2 * tp / (2 * tp + fp + fn), "accuracy": (tp + tn) / total}
            out.update({f"{name}.{key}": float(value) for key, value in values.items()})
    if order:
        rank = np.asarray(ordered_indices(classes, order))
        truth, predicted = rank[np.asarray(truth)], rank[np.asarray(predicted)]
    out["kappa"] = float(cohen_kappa_score(truth, predicted, labels=list(range(len(classes))),
                                           weights="quadratic" if order else None))
    return out


def ordered_indices(classes: list[str], order: list[str]) -> list[int]:
    """The rank of each class in ``order``, which must name exactly the classes."""
    if sorted(order) != sorted(classes):
        raise DataError(f"categories: {order} must name each class once, lowest first; the classes are {classes}")
    return [order.index(name) for name in classes]


def grouped_folds(labels: np.ndarray, groups: list[str], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs in which no group (case, slide, patient) is on both sides,
    classes spread over the folds as evenly as the groups allow."""
    distinct = len(set(groups))
    if k < 2:
        raise DataError(f"folds: at least 2, got {k}")
    if distinct < k:
        raise DataError(f"folds: {k} folds need at least {k} groups (cases, slides or patients), found {distinct}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))


def _regression_metrics(prefix: str, truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {f"{prefix}.pearson": float(np.corrcoef(predicted, truth)[0, 1]), f"{prefix}.r2": float(r2_score(truth, predicted)),
            f"{prefix}.mae": float(mean_absolute_error(truth, predicted))}


def _fit_and_score(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, classes: list[str],
                   knn_k: int, order: list[str] | None) -> tuple[dict[str, float], str, np.ndarray]:
    """Both classifiers fitted on ``train``; their metrics on ``test``, the per-category metrics of
    the better one (by macro F1), its name and predictions."""
    candidates = {"linear": LinearClassifier(len(classes)), "knn": KNNClassifier(len(classes), k=knn_k)}
    metrics, predictions = {}, {}
    for name, head in candidates.items():
        predictions[name] = head.fit(train, y_train).predict_proba(test).argmax(1)
        metrics.update(classification_metrics(name, y_test, predictions[name]))
    best = max(candidates, key=lambda n: metrics[f"{n}.f1_macro"])
    metrics.update({f"category.{k}": v for k, v in category_metrics(y_test, predictions[best], classes, order).items()})
    return metrics, best, predictions[best]


@dataclass
class Folds:
    """Per-fold metrics of a grouped cross-validation, and their mean and standard deviation."""
    per_fold: list[dict[str, float]]
    groups: int

    def summary(self) -> dict[str, float]:
        keys = [k for k in self.per_fold[0] if all(k in f for f in self.per_fold)]
        out = {}
        for key in keys:
            values = np.asarray([f[key] for f in self.per_fold], dtype=np.float64)
            out[f"{key}.mean"], out[f"{key}.sd"] = float(np.nanmean(values)), float(np.nanstd(values, ddof=1))
        return out


def cross_validate(embedder: Embedder, data: str | Path, groups: list[str], k: int, knn_k: int = 20,
                   targets: str | Path | None = None, target_column: str = "", order: list[str] | None = None,
                   seed: int = 0) -> Folds:
    """Grouped k-fold cross-validation over every image of ``<data>/train`` and ``<data>/val``
    together (``groups``: one per image, in that order): each fold's probes are fitted on the
    other folds and scored on it, as the paper's slide-level folds."""
    data = Path(data)
    train, classes = _embed(embedder, data / "train", with_patches=False)
    val, val_classes = _embed(embedder, data / "val", with_patches=False)
    if val_classes != classes:
        raise DataError(f"{data}: val classes {val_classes} differ from train classes {classes}")
    embeddings = np.concatenate([train.embeddings, val.embeddings])
    labels = np.concatenate([train.labels, val.labels])
    if len(groups) != len(labels):
        raise DataError(f"{data}: {len(groups)} groups for {len(labels)} images")
    values = None
    if targets:
        values = np.concatenate([_targets(Path(targets), target_column, split, data) for split in (train, val)])
    per_fold = []
    for fit, held in grouped_folds(labels, groups, k, seed):
        metrics, _, _ = _fit_and_score(embeddings[fit], labels[fit], embeddings[held], labels[held], classes, knn_k, order)
        if values is not None:
            probe = RegressionProbe(target_column).fit(embeddings[fit], values[fit])
            metrics.update(_regression_metrics("regression", values[held], probe.predict(embeddings[held])))
        metrics["images"] = float(len(held))
        per_fold.append(metrics)
    return Folds(per_fold, len(set(groups)))


def external(embedder: Embedder, data: str | Path, test: str | Path, knn_k: int = 20,
             order: list[str] | None = None) -> dict[str, float]:
    """Probes fitted on every image of ``<data>/train`` and ``<data>/val``, scored on the split
    ``test`` of another set (another hospital, scanner or protocol) with the same classes."""
    data = Path(data)
    parts = [_embed(embedder, data / split, with_patches=False) for split in ("train", "val")]
    classes = parts[0][1]
    held, held_classes = _embed(embedder, Path(test), with_patches=False)
    if held_classes != classes:
        missing, unknown = sorted(set(classes) - set(held_classes)), sorted(set(held_classes) - set(classes))
        raise DataError(f"test: {test} has classes {held_classes}; the model's are {classes} "
                        f"(missing {missing}, unknown {unknown})")
    embeddings = np.concatenate([p[0].embeddings for p in parts])
    labels = np.concatenate([p[0].labels for p in parts])
    metrics, _, _ = _fit_and_score(embeddings, labels, held.embeddings, held.labels, classes, knn_k, order)
    return {**metrics, "images": float(len(held.labels))}


RANDOM_INIT = "random_init."  # metric prefix of the same architecture before any training


def random_init_knn(embedder: Embedder, data: str | Path, knn_k: int = 20) -> dict[str, float]:
    """kNN metrics of ``embedder``'s architecture at random init on the same split: what the
    promotion gate's floor compares the trained backbone's kNN with."""
    baseline = embedder.at_random_init()
    train, classes = _embed(baseline, Path(data) / "train", with_patches=False)
    val, _ = _embed(baseline, Path(data) / "val", with_patches=False)
    predicted = KNNClassifier(len(classes), k=knn_k).fit(train.embeddings, train.labels).predict_proba(val.embeddings).argmax(1)
    return classification_metrics(f"{RANDOM_INIT}knn", val.labels, predicted)


def score_heads(embedder: Embedder, heads: TaskHeads, data: str | Path) -> dict[str, float]:
    """How the default classifier of fitted ``heads`` (on ``embedder``'s embeddings) does on
    ``<data>/val``: ``head.accuracy``, ``head.f1_macro``, ``head.precision_macro``. What the
    promotion service measures of a head itself, rather than reading what its training logged."""
    classifier = heads.classifier
    val, classes = _embed(embedder, Path(data) / "val", with_patches=False)
    unknown = sorted(set(classes) - set(classifier.classes))
    if unknown:
        raise DataError(f"{data}/val: classes {unknown} are not among the head's {classifier.classes}")
    truth = np.asarray([classifier.classes.index(classes[label]) for label in val.labels])
    return classification_metrics("head", truth, classifier.predict_proba(val.embeddings).argmax(1))


def evaluate(embedder: Embedder, data: str | Path, knn_k: int = 20, masks: str | Path | None = None,
             targets: str | Path | None = None, target_column: str = "", order: list[str] | None = None) -> Evaluation:
    """Fit on ``<data>/train``, score on ``<data>/val``; optional masks (segmentation) and a targets
    CSV (regression) add their probes and metrics; ``order``: the classes are ordered categories,
    lowest first (kappa is quadratic-weighted)."""
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
    metrics.update({f"category.{k}": v for k, v in category_metrics(val.labels, predictions[default], classes,
                                                                      order).items()})
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
        metrics.update(_regression_metrics("regression", y_val, heads.regression.predict(val.embeddings)))

    confusion = confusion_matrix(val.labels, predictions[default], labels=list(range(len(classes))))
    # The train split's patch tokens are the largest thing here and no caller reads them.
    return Evaluation(heads, metrics, classes, confusion, val, Split(train.paths, train.labels, train.embeddings))


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
