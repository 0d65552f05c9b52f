"""Per-iteration schedules as plain objects (indexable by iteration), as in DINOv2."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinomx.config import DinoMXConfig


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
        # Where the cosine starts: before it the value is frozen or still warming up.
        self.warmup_iters = min(freeze_iters + warmup_iters, total_iters)
        self.schedule = np.concatenate((freeze, warmup, cosine))[:total_iters]

    def __getitem__(self, it: int) -> float:
        if it >= len(self.schedule):
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


@dataclass
class Schedules:
    lr: CosineScheduler
    weight_decay: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    @classmethod
    def from_config(cls, cfg: DinoMXConfig) -> "Schedules":
        total, per_epoch = cfg.total_steps, cfg.train.steps_per_epoch
        o, t = cfg.optim, cfg.teacher
        lr = dict(base_value=o.lr, final_value=o.min_lr, total_iters=total, warmup_iters=min(o.warmup_epochs * per_epoch, total))
        return cls(
            lr=CosineScheduler(**lr),
            weight_decay=CosineScheduler(o.weight_decay, o.weight_decay_end, total),
            momentum=CosineScheduler(t.momentum_teacher, t.final_momentum_teacher, total),
            teacher_temp=CosineScheduler(
                t.teacher_temp,
                t.teacher_temp,
                total,
                warmup_iters=min(t.warmup_teacher_temp_epochs * per_epoch, total),
                start_warmup_value=t.warmup_teacher_temp,
            ),
            last_layer_lr=CosineScheduler(**lr, freeze_iters=min(o.freeze_last_layer_epochs * per_epoch, total)),
        )

    @property
    def warmup_steps(self) -> int:
        """Iterations until the lr and teacher-temperature warm-ups are over. Frozen prototypes
        do not count: a recipe may keep them frozen for the whole run."""
        return max(self.lr.warmup_iters, self.teacher_temp.warmup_iters)
