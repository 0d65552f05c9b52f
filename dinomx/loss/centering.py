"""Teacher-output normalisation shared by the DINO and iBOT losses: EMA centering, or
Sinkhorn-Knopp (SwAV/DINOv2), which balances prototype usage within the batch instead."""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    # Single-process runs never touch torch.distributed.
    return dist.is_available() and dist.is_initialized()


class TeacherCentering(nn.Module):
    def __init__(self, out_dim: int, mode: Literal["centering", "sinkhorn_knopp"] = "centering",
                 momentum: float = 0.9, sinkhorn_iterations: int = 3):
        super().__init__()
        self.mode, self.momentum, self.sinkhorn_iterations = mode, momentum, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities, (N, K)."""
        if self.mode == "sinkhorn_knopp":
            return self._sinkhorn_knopp(teacher_output.float(), teacher_temp)
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_output: torch.Tensor) -> None:
        if self.mode != "centering":
            return
        total = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_output.shape[0]), device=teacher_output.device)
        if _distributed():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count > 0:
            self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)

    def _sinkhorn_knopp(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        q = torch.exp((teacher_output - teacher_output.max()) / teacher_temp).T  # (K, N)
        n = torch.tensor(float(q.shape[1]), device=q.device)
        k = q.shape[0]
        total = q.sum()
        if _distributed():
            dist.all_reduce(n)
            dist.all_reduce(total)
        q /= total
        for _ in range(self.sinkhorn_iterations):
            rows = q.sum(dim=1, keepdim=True)
            if _distributed():
                dist.all_reduce(rows)
            q /= rows * k  # every prototype gets an equal share
            q /= q.sum(dim=0, keepdim=True) * n  # every sample is a distribution
        return (q * n).T


class CenteredTeacherLoss(nn.Module):
    """Base of the losses that compare student logits with normalised teacher distributions."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: Literal["centering", "sinkhorn_knopp"] = "centering"):
        super().__init__()
        self.student_temp = student_temp
        self.centering = TeacherCentering(out_dim, centering, center_momentum)

    def teacher_probs(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return self.centering(teacher_output, teacher_temp)

    def update_center(self, teacher_output: torch.Tensor) -> None:
        self.centering.update(teacher_output)
