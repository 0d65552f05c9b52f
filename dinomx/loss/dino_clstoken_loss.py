"""DINO self-distillation loss on the CLS token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinomx.loss.centering import CenteredTeacherLoss


class DINOLoss(CenteredTeacherLoss):
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
