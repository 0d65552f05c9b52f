"""Online kNN evaluation while pretraining (as solo-learn and lightly report it): the teacher's
CLS embeddings of a fixed labelled subset of the training images form the memory bank, a fixed
subset of a labelled validation split is classified against it by weighted k nearest neighbours
(cosine similarity, votes weighted exp(sim / T) as in DINO's eval_knn: dinomx.classifiers.KNNClassifier).

The subsets are read, resized and stored as uint8 once, so each evaluation costs one forward
pass over a few hundred images and a matrix product.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dinomx.classifiers import KNNClassifier
from dinomx.config import ConfigError
from dinomx.images import list_images, load_image
from dinomx.shards import is_sharded, labelled_sample, read_index

Encoder = Callable[[torch.Tensor], torch.Tensor]


def _subset(root: str | Path, limit: int, seed: int, num_channels: int) -> tuple[list[Image.Image], list[str]]:
    """Up to ``limit`` labelled images of an image folder or a split of shards, and their class names."""
    if is_sharded(root):
        return labelled_sample(read_index(root), limit, seed, num_channels)
    paths, labels, classes = list_images(root)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [load_image(paths[i], num_channels) for i in order], [classes[labels[i]] for i in order]


class KNNMonitor:
    def __init__(self, train_root: str | Path, eval_root: str | Path, num_channels: int, size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], max_images: int = 1000, k: int = 20,
                 seed: int = 0, batch_size: int = 256):
        bank_images, bank_names = _subset(train_root, max_images, seed, num_channels)
        query_images, query_names = _subset(eval_root, max_images, seed + 1, num_channels)
        classes = sorted(set(bank_names))
        unknown = sorted(set(query_names) - set(classes))
        if len(classes) < 2:
            raise ConfigError(f"train.eval_every: online kNN needs labelled training images (<root>/<class>/<image>, "
                             f"two classes or more); {train_root} has {len(classes)}")
        if unknown:
            raise ConfigError(f"train.eval_every: {eval_root} has classes the training data lacks: {', '.join(unknown)}")
        self.num_classes, self.k, self.batch_size = len(classes), k, batch_size
        self.size, self.num_channels = size, num_channels
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.bank_images = self._stack(bank_images)
        self.query_images = self._stack(query_images)
        self.bank_labels = torch.tensor([classes.index(n) for n in bank_names])
        self.query_labels = torch.tensor([classes.index(n) for n in query_names])

    def _stack(self, loaded: list[Image.Image]) -> torch.Tensor:
        mode = "RGB" if self.num_channels == 3 else "L"
        images = []
        for img in loaded:
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)  # as the exported processor
            array = np.array(img.convert(mode), dtype=np.uint8)
            images.append(torch.from_numpy(array.reshape(self.size, self.size, -1)).permute(2, 0, 1))
        return torch.stack(images)

    @torch.no_grad()
    def _embed(self, encode: Encoder, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = images[start : start + self.batch_size].float() / 255.0
            pixels = ((pixels - self.mean) / self.std).to(device)
            chunks.append(encode(pixels).float())
        return torch.cat(chunks)

    @torch.no_grad()
    def accuracy(self, encode: Encoder, device: torch.device | str = "cpu") -> float:
        """``encode``: normalised pixels (N, C, H, W) -> CLS embeddings (N, D)."""
        device = torch.device(device)
        bank = self._embed(encode, self.bank_images, device)
        queries = self._embed(encode, self.query_images, device)
        knn = KNNClassifier(self.num_classes, self.k).fit(bank.cpu().numpy(), self.bank_labels.numpy())
        predicted = knn.predict_proba(queries.cpu().numpy()).argmax(1)
        return float((torch.from_numpy(predicted) == self.query_labels).float().mean())


# kNN points over the step-0 network (random init, or the pretrained start) that count as learning;
# below it the change is within what a different eval subset or seed moves.
LEARNING_MARGIN = 0.02


def verdict_sentence(first: float, last: float) -> str:
    """The verdict as a person reads it where a run ends: "learned: kNN ..." or "did NOT learn: ..."."""
    learned, summary = learning_verdict(first, last)
    return f"learned: {summary}" if learned else summary.replace("did not learn", "did NOT learn", 1)


def learning_verdict(first: float, last: float, margin: float = LEARNING_MARGIN) -> tuple[bool, str]:
    """(learned, one line) from the online kNN of the network before any update and at the end."""
    gain = last - first
    summary = f"kNN {first:.3f} -> {last:.3f} ({gain:+.3f} over the network before training)"
    if gain >= margin:
        return True, summary
    return False, f"did not learn: {summary}; needs at least +{margin}"
