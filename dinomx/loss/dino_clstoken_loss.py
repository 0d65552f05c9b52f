"""DINO self-distillation loss on the CLS token, with teacher centering."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

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

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_output.shape[0]), device=teacher_output.device)
        # Only reduce across processes when a process group exists: single-process runs must
        # never touch torch.distributed.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
