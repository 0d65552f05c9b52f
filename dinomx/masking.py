"""Block-wise patch masking for iBOT (BEiT's generator): masks are unions of random rectangles,
so the student must infer whole regions rather than isolated patches."""
from __future__ import annotations

import math

import torch

from dinomx.augmentations import uniform


def block_mask(grid: int, num_masking: int, generator: torch.Generator | None = None,
               min_block: int = 4, max_aspect: float = 3.0) -> torch.Tensor:
    """A (grid, grid) bool mask with about ``num_masking`` patches set, in rectangles."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))
    min_block = min(min_block, max(num_masking, 1))
    attempts = 0
    while int(mask.sum()) < num_masking and attempts < 100:
        attempts += 1
        remaining = num_masking - int(mask.sum())
        area = uniform(min_block, max(remaining, min_block), generator)
        aspect = math.exp(uniform(*log_aspect, generator))
        h = min(grid, max(1, round(math.sqrt(area * aspect))))
        w = min(grid, max(1, round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (), generator=generator))
        block = mask[top : top + h, left : left + w]
        if int((~block).sum()) <= remaining:  # never overshoot the target
            block.fill_(True)
    return mask


def sample_mask(grid: int, ratio_min_max: tuple[float, float], probability: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The flattened mask of one global crop: masked with ``probability``, ratio uniform in range."""
    if torch.rand((), generator=generator).item() >= probability:
        return torch.zeros(grid * grid, dtype=torch.bool)
    ratio = uniform(*ratio_min_max, generator)
    return block_mask(grid, int(grid * grid * ratio), generator).flatten()
