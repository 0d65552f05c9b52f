"""DINO self-distillation loss on the CLS token."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dinomx.loss.centering import TeacherCentering


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Literal["centering", "sinkhorn_knopp"] = "centering"):
        super().__init__()
        self.student_temp = student_temp
        self.centering = TeacherCentering(out_dim, centering, center_momentum)

    def teacher_probs(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering(teacher_output, teacher_temp)

    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.centering.update(teacher_output)

    def forward(
        self, student_outputs: list[torch.Tensor], teacher_probs: list[torch.Tensor], skip_same_view: bool
    ) -> torch.Tensor:
        """Mean cross-entropy over (teacher view, student view) pairs.

        With ``skip_same_view`` the i-th student view is not matched with the i-th teacher view:
        the student's global crops must predict the teacher's *other* global crop.
        """
        total, terms = 0.0, 0
        for s_idx, student in enumerate(student_outputs):
            log_probs = F.log_softmax(student / self.student_temp, dim=-1)
            for t_idx, teacher in enumerate(teacher_probs):
                if skip_same_view and s_idx == t_idx:
                    continue
                total = total - (teacher * log_probs).sum(dim=-1).mean()
                terms += 1
        if terms == 0:
            raise ValueError("DINO loss needs at least one (teacher view, student view) pair")
        return total / terms
