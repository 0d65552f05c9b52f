"""Per-iteration schedules as plain objects (indexable by iteration), as in DINOv2."""
from __future__ import annotations

import numpy as np


class CosineScheduler:
    """Linear warmup from ``start_warmup_value``, then cosine from ``base_value`` to ``final_value``.

    ``freeze_iters`` leading iterations hold 0 (used to keep the last head layer still).
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ):
        self.final_value = final_value
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(max(total_iters - warmup_iters - freeze_iters, 0))
        span = max(len(iters), 1)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / span))
        self.schedule = np.concatenate((freeze, warmup, cosine))[:total_iters]

    def __getitem__(self, it: int) -> float:
        if it >= len(self.schedule):
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters
