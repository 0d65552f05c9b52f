"""Classification heads on frozen embeddings: weighted kNN (as in DINO) and a linear probe.

Both save to and load from a directory (JSON + safetensors, no pickles), bundled by
``ClassifierHeads`` so that one registered head carries every classifier and its class names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class KNNClassifier:
    kind = "knn"

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.bank = torch.zeros(0)
        self.bank_labels = torch.zeros(0, dtype=torch.long)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "KNNClassifier":
        self.bank = F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
        self.bank_labels = torch.as_tensor(y, dtype=torch.long)
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        query = F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
        similarity = query @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / self.temperature).exp()
        votes = torch.zeros(query.shape[0], self.num_classes)
        votes.scatter_add_(1, self.bank_labels[top_idx], weights)
        return (votes / votes.sum(1, keepdim=True)).numpy()

    def save(self, directory: Path) -> None:
        save_file({"bank": self.bank.contiguous(), "labels": self.bank_labels}, directory / "knn.safetensors")
        write_json(directory / "knn.json", {"num_classes": self.num_classes, "k": self.k, "temperature": self.temperature})

    @classmethod
    def load(cls, directory: Path) -> "KNNClassifier":
        head = cls(**read_json(directory / "knn.json"))
        tensors = load_file(directory / "knn.safetensors")
        head.bank, head.bank_labels = tensors["bank"], tensors["labels"]
        return head


class LinearClassifier:
    """Multinomial logistic regression on standardised embeddings, trained full-batch."""

    kind = "linear"

    def __init__(self, num_classes: int, epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-4, seed: int = 0):
        self.num_classes, self.epochs, self.lr, self.weight_decay, self.seed = num_classes, epochs, lr, weight_decay, seed
        self.linear: torch.nn.Linear | None = None
        self.mean = self.std = torch.zeros(0)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearClassifier":
        features = torch.as_tensor(x, dtype=torch.float32)
        targets = torch.as_tensor(y, dtype=torch.long)
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        features = (features - self.mean) / self.std
        generator = torch.Generator().manual_seed(self.seed)
        self.linear = torch.nn.Linear(features.shape[1], self.num_classes)
        with torch.no_grad():
            self.linear.weight.normal_(0, 0.01, generator=generator)
            self.linear.bias.zero_()
        optimizer = torch.optim.AdamW(self.linear.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs):
            optimizer.zero_grad()
            F.cross_entropy(self.linear(features), targets).backward()
            optimizer.step()
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.linear is None:
            raise RuntimeError("LinearClassifier.predict_proba called before fit/load")
        features = (torch.as_tensor(x, dtype=torch.float32) - self.mean) / self.std
        return F.softmax(self.linear(features), dim=1).numpy()

    def save(self, directory: Path) -> None:
        assert self.linear is not None
        save_file(
            {"weight": self.linear.weight.detach().contiguous(), "bias": self.linear.bias.detach(), "mean": self.mean, "std": self.std},
            directory / "linear.safetensors",
        )
        write_json(directory / "linear.json", {"num_classes": self.num_classes, "epochs": self.epochs, "lr": self.lr,
                                                "weight_decay": self.weight_decay, "seed": self.seed})

    @classmethod
    def load(cls, directory: Path) -> "LinearClassifier":
        head = cls(**read_json(directory / "linear.json"))
        tensors = load_file(directory / "linear.safetensors")
        head.linear = torch.nn.Linear(tensors["weight"].shape[1], head.num_classes)
        head.linear.load_state_dict({"weight": tensors["weight"], "bias": tensors["bias"]})
        head.mean, head.std = tensors["mean"], tensors["std"]
        return head


_KINDS = {cls.kind: cls for cls in (KNNClassifier, LinearClassifier)}


class ClassifierHeads:
    """Named classifiers sharing one label space; ``default`` answers when none is named."""

    def __init__(self, classes: list[str], heads: dict[str, KNNClassifier | LinearClassifier], default: str, embed_dim: int):
        if default not in heads:
            raise ValueError(f"default head {default!r} is not among {sorted(heads)}")
        self.classes, self.heads, self.default, self.embed_dim = classes, heads, default, embed_dim

    def predict_proba(self, embeddings: np.ndarray, head: str | None = None) -> np.ndarray:
        name = head or self.default
        if name not in self.heads:
            raise KeyError(f"unknown head {name!r}; available: {sorted(self.heads)}")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"expected embeddings of shape (n, {self.embed_dim}), got {tuple(embeddings.shape)}")
        return self.heads[name].predict_proba(embeddings)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for head in self.heads.values():
            head.save(directory)
        write_json(directory / "heads.json", {"classes": self.classes, "heads": sorted(self.heads),
                                               "default": self.default, "embed_dim": self.embed_dim})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ClassifierHeads":
        directory = Path(directory)
        meta = read_json(directory / "heads.json")
        heads = {name: _KINDS[name].load(directory) for name in meta["heads"]}
        return cls(meta["classes"], heads, meta["default"], meta["embed_dim"])


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
