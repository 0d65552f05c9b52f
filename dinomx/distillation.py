"""Frozen teachers for distillation: larger or different backbones, one or several.

A teacher sees the student's own global crops (standard distillation) or, for
Magnification-Aware Distillation, the spatially aligned low-magnification tile of the student's
high-magnification tile. Crops arrive normalised with the student's statistics and are
re-normalised with the teacher's own image processor's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from dinomx.backbone import Backbone, load_image_processor
from dinomx.config import ConfigError
from dinomx.hub import resolve_pretrained


class FrozenTeacher(nn.Module):
    def __init__(self, backbone: Backbone, mean: torch.Tensor, std: torch.Tensor,
                 student_mean: torch.Tensor, student_std: torch.Tensor):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        # Re-normalising is one affine map: x_t = x_s * scale + shift.
        self.register_buffer("scale", (student_std / std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((student_mean - mean) / std).view(1, -1, 1, 1))

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @classmethod
    def load(cls, source: str, student_mean: tuple[float, ...], student_std: tuple[float, ...],
             crop_size: int) -> "FrozenTeacher":
        path = resolve_pretrained(source, "distillation.teachers")
        config = AutoConfig.from_pretrained(path)
        if crop_size % config.patch_size:
            raise ConfigError(
                f"distillation.teachers: {source} has patch size {config.patch_size}, which does not divide "
                f"crops.global_crops_size={crop_size}"
            )
        if config.num_channels != len(student_mean):
            raise ConfigError(
                f"distillation.teachers: {source} takes {config.num_channels}-channel input, the student "
                f"{len(student_mean)}"
            )
        try:
            processor = load_image_processor(path)
            mean, std = processor.image_mean, processor.image_std
        except OSError:  # no preprocessor_config.json: the teacher was trained on the student's statistics
            mean, std = student_mean, student_std
        return cls(Backbone.from_pretrained(path), torch.tensor(mean), torch.tensor(std),
                   torch.tensor(student_mean), torch.tensor(student_std))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cls, _ = self.backbone(pixels * self.scale + self.shift)
        return F.normalize(cls.float(), dim=-1)

