"""Embedding extraction with a frozen backbone (CLS token after the final norm)."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel

from dinomx.attention import cls_attention, eager_twin
from dinomx.backbone import Backbone, load_image_processor
from dinomx.images import list_images, load_image, to_model_mode


class Embedder:
    def __init__(self, backbone: Backbone, processor, device: str | torch.device = "cpu"):
        self.backbone = backbone.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Embedder":
        return cls(Backbone.from_pretrained(directory), load_image_processor(directory), device)

    def at_random_init(self, seed: int = 0) -> "Embedder":
        """The same architecture and preprocessing with fresh random weights: the baseline a
        trained backbone has to beat."""
        torch.manual_seed(seed)
        return Embedder(Backbone(AutoModel.from_config(self.backbone.model.config)), self.processor, self.device)

    @property
    def num_channels(self) -> int:
        return self.backbone.model.config.num_channels

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = [to_model_mode(img, self.num_channels) for img in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device)

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """CLS embeddings of already preprocessed pixel values (N, C, H, W)."""
        return self.backbone(torch.as_tensor(pixels, device=self.device))[0].float().cpu().numpy()

    @cached_property
    def _eager(self):
        return eager_twin(self.backbone.model)

    def attention(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, heads, h, w) last-layer CLS attention, from a twin of the backbone that shares its
        weights: the backbone itself keeps its fused attention for concurrent callers."""
        return cls_attention(self._eager, torch.as_tensor(pixels, device=self.device))

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        chunks = [self.embed_pixels(self.preprocess(images[start : start + batch_size]))
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CLS embeddings (N, D) and final-layer patch tokens (N, h, w, D) of preprocessed pixels."""
        cls, patches = self.backbone(torch.as_tensor(pixels, device=self.device))
        side = int(round(patches.shape[1] ** 0.5))
        return cls.float().cpu().numpy(), patches.float().cpu().reshape(patches.shape[0], side, side, -1).numpy()

    def features(self, images: Sequence[Image.Image], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """CLS embeddings (N, D) and final-layer patch tokens (N, h, w, D) from one forward pass."""
        chunks = [self.tokens(self.preprocess(images[start : start + batch_size]))
                  for start in range(0, len(images), batch_size)]
        return np.concatenate([c for c, _ in chunks]), np.concatenate([p for _, p in chunks])

    def embed_folder(self, root: str | Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Embeddings, integer labels and class names of an image folder."""
        paths, labels, classes = list_images(root)
        images = [load_image(p, self.num_channels) for p in paths]
        return self.embed(images, batch_size), np.asarray(labels), classes
