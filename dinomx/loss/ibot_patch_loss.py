"""iBOT masked-image-modelling loss: the student predicts, for its masked patches, the teacher's
distribution on the same (unmasked) patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinomx.loss.centering import CenteredTeacherLoss


class IBOTPatchLoss(CenteredTeacherLoss):
    def forward(self, student_masked: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``student_masked``: (M, K) logits and ``teacher_probs``: (M, K) probabilities of the M
        masked patches, in ``masks.nonzero()`` order; ``masks``: (N, P) bool.

        Each image weighs the same whatever its number of masked patches, as in DINOv2."""
        per_patch = -(teacher_probs * F.log_softmax(student_masked / self.student_temp, dim=-1)).sum(-1)
        counts = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
        weights = (1.0 / counts).expand_as(masks)[masks]
        return (per_patch * weights).sum() / masks.shape[0]
