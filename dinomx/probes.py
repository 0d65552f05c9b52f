"""Dense and continuous probes on frozen features, and the bundle of every head of one backbone.

- ``SegmentationProbe``: a linear classifier on patch tokens (as in DINOv2's linear segmentation
  evaluation), trained on the majority class of each patch's pixels; masks come back at pixel
  resolution by nearest upsampling.
- ``RegressionProbe``: ridge regression on standardised CLS embeddings.
- ``TaskHeads``: classifier heads plus the optional probes, saved as one directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dinomx.classifiers import ClassifierHeads, LinearClassifier, read_json, write_json


def patch_labels(masks: np.ndarray, grid: tuple[int, int], num_classes: int) -> np.ndarray:
    """(N, H, W) class-index masks -> (N, h, w) majority class of each patch's pixels."""
    one_hot = F.one_hot(torch.as_tensor(masks, dtype=torch.long), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid).argmax(1).numpy()


def dice(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes (1..C-1) present in either mask."""
    scores = []
    for c in range(1, num_classes):
        p, t = predicted == c, target == c
        total = p.sum() + t.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else 1.0


class SegmentationProbe:
    def __init__(self, classes: list[str], linear: LinearClassifier | None = None):
        self.classes = classes
        self.linear = linear or LinearClassifier(len(classes), epochs=200, lr=0.05)

    def fit(self, patches: np.ndarray, masks: np.ndarray) -> "SegmentationProbe":
        """``patches`` (N, h, w, D) patch tokens, ``masks`` (N, H, W) class indices."""
        labels = patch_labels(masks, patches.shape[1:3], len(self.classes))
        self.linear.fit(patches.reshape(-1, patches.shape[-1]), labels.reshape(-1))
        return self

    def predict_grid(self, patches: np.ndarray) -> np.ndarray:
        """(N, h, w, D) -> (N, h, w) class index of each patch: what the probe decides."""
        n, h, w, d = patches.shape
        return self.linear.predict_proba(patches.reshape(-1, d)).reshape(n, h, w, -1).argmax(-1)

    def predict(self, patches: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(N, h, w, D) -> (N, H, W) class indices at pixel resolution ``size``: each pixel takes
        the patch its centre lies in, so the mask vectorised along patch edges reads back the same."""
        grid = torch.as_tensor(self.predict_grid(patches), dtype=torch.float32)[:, None]
        return F.interpolate(grid, size=size, mode="nearest-exact")[:, 0].long().numpy()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.linear.save(directory)
        write_json(directory / "segmentation.json", {"classes": self.classes})

    @classmethod
    def load(cls, directory: Path) -> "SegmentationProbe":
        return cls(read_json(directory / "segmentation.json")["classes"], LinearClassifier.load(directory))


class RegressionProbe:
    def __init__(self, target: str, alpha: float = 1.0):
        self.target, self.alpha = target, alpha
        self.weight = self.mean = self.std = torch.zeros(0)
        self.bias = torch.zeros(())

    def fit(self, x: np.ndarray, y: np.ndarray) -> "RegressionProbe":
        features = torch.as_tensor(x, dtype=torch.float64)
        targets = torch.as_tensor(y, dtype=torch.float64)
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        z = (features - self.mean) / self.std
        self.bias = targets.mean()
        gram = z.T @ z + self.alpha * torch.eye(z.shape[1], dtype=torch.float64)
        self.weight = torch.linalg.solve(gram, z.T @ (targets - self.bias))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (torch.as_tensor(x, dtype=torch.float64) - self.mean) / self.std
        return (z @ self.weight + self.bias).numpy()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight, "bias": self.bias.reshape(1), "mean": self.mean, "std": self.std},
                  directory / "regression.safetensors")
        write_json(directory / "regression.json", {"target": self.target, "alpha": self.alpha})

    @classmethod
    def load(cls, directory: Path) -> "RegressionProbe":
        probe = cls(**read_json(directory / "regression.json"))
        tensors = load_file(directory / "regression.safetensors")
        probe.weight, probe.mean, probe.std = tensors["weight"], tensors["mean"], tensors["std"]
        probe.bias = tensors["bias"][0]
        return probe


@dataclass
class TaskHeads:
    classifier: ClassifierHeads
    segmentation: SegmentationProbe | None = None
    regression: RegressionProbe | None = None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.classifier.save_pretrained(directory)
        if self.segmentation is not None:
            self.segmentation.save(directory / "segmentation")
        if self.regression is not None:
            self.regression.save(directory / "regression")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TaskHeads":
        directory = Path(directory)
        return cls(
            ClassifierHeads.from_pretrained(directory),
            SegmentationProbe.load(directory / "segmentation") if (directory / "segmentation").is_dir() else None,
            RegressionProbe.load(directory / "regression") if (directory / "regression").is_dir() else None,
        )
