"""Feature distillation from frozen teachers: the student's projected CLS token must point where
each teacher's does (cosine distance, so teachers of any scale weigh the same)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineDistillationLoss(nn.Module):
    def forward(self, student_projected: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
        """One (N, D_t) student projection per teacher, against that teacher's (N, D_t) features."""
        if len(student_projected) != len(teacher_features) or not teacher_features:
            raise ValueError(f"expected one projection per teacher, got {len(student_projected)} for {len(teacher_features)}")
        distances = [1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean() for s, t in zip(student_projected, teacher_features)]
        return torch.stack(distances).mean()
