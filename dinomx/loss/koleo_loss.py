"""KoLeo regulariser (Sablayrolles et al., 2018): spread features by maximising the log-distance
of each one to its nearest neighbour in the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: (B, D). A batch of one has no neighbour and contributes 0; duplicates give
        a large but finite loss rather than infinity."""
        if features.shape[0] < 2:
            return features.sum() * 0.0
        x = F.normalize(features.float(), dim=-1, p=2, eps=self.eps)
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a point is never its own neighbour
        nearest = similarity.argmax(dim=1)
        distances = (x - x[nearest]).norm(dim=-1)
        return -torch.log(distances + self.eps).mean()
