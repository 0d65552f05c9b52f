"""iBOT masked-image-modelling loss: the student predicts, for its masked patches, the teacher's
distribution on the same (unmasked) patches."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dinomx.loss.centering import TeacherCentering


class IBOTPatchLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Literal["centering", "sinkhorn_knopp"] = "centering"):
        super().__init__()
        self.student_temp = student_temp
        self.centering = TeacherCentering(out_dim, centering, center_momentum)

    def teacher_probs(self, teacher_patch_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering(teacher_patch_output, teacher_temp)

    def update_center(self, teacher_patch_output: torch.Tensor) -> None:
        self.centering.update(teacher_patch_output)

    def forward(self, student_masked: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``student_masked``: (M, K) logits and ``teacher_probs``: (M, K) probabilities of the M
        masked patches, in ``masks.nonzero()`` order; ``masks``: (N, P) bool.

        Each image weighs the same whatever its number of masked patches, as in DINOv2."""
        per_patch = -(teacher_probs * F.log_softmax(student_masked / self.student_temp, dim=-1)).sum(-1)
        counts = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
        weights = (1.0 / counts).expand_as(masks)[masks]
        return (per_patch * weights).sum() / masks.shape[0]
