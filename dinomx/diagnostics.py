"""What tells a learning self-distillation run from a collapsed one, computed on one batch.

DINO has two ways to fail without a NaN (Caron et al., 2021, sec. 5.3): the teacher's outputs
become uniform (every sample says nothing: per-sample entropy near ln K), or they all pick the
same prototype (entropy of the batch-mean distribution near 0). Both leave the loss looking
calm. The figures here separate them, together with the student's distance from the teacher and
how many directions the embeddings really use (RankMe, Garrido et al., 2023).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dinomx.errors import UserError


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def effective_rank(embeddings: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values, 1..min(N, D)."""
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum().clamp_min(1e-12)
    return float(torch.exp(entropy(p)))


@torch.no_grad()
def batch_diagnostics(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float, embeddings: torch.Tensor
) -> dict[str, float]:
    """``teacher_probs`` and ``student_logits``: (N, K) for the same N global crops;
    ``embeddings``: (N, D) CLS tokens whose spread is measured."""
    teacher_probs = teacher_probs.float()
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    kl = (teacher_probs * (teacher_probs.clamp_min(1e-12).log() - student_log_probs)).sum(-1)
    normalised = F.normalize(embeddings.float(), dim=-1)
    return {
        "teacher_entropy": float(entropy(teacher_probs).mean()),
        "teacher_batch_entropy": float(entropy(teacher_probs.mean(0))),
        "kl_teacher_student": float(kl.mean()),
        "prototypes_in_use": float(teacher_probs.argmax(-1).unique().numel()),
        "embedding_rank": effective_rank(normalised),
        "embedding_std": float(normalised.std(0).mean()),
    }


@dataclass
class CollapseDetector:
    """Flags a collapse once the diagnostics have said so ``patience`` log steps in a row, and
    only after ``grace_steps`` (warm-ups make early teachers legitimately flat)."""

    out_dim: int
    grace_steps: int
    patience: int = 3
    # Uniform: the average teacher answer is nearly as flat as a uniform one.
    uniform_fraction: float = 0.95
    # One prototype: the whole batch's mean answer carries under one nat.
    batch_entropy_floor: float = 1.0
    _streak: int = field(default=0, init=False, repr=False)

    def reason(self, metrics: dict[str, float]) -> str | None:
        max_entropy = math.log(self.out_dim)
        if metrics["teacher_entropy"] >= self.uniform_fraction * max_entropy:
            return (f"uniform collapse: teacher entropy {metrics['teacher_entropy']:.3f} of ln({self.out_dim}) = "
                    f"{max_entropy:.3f}, every sample gets the same flat answer")
        if metrics["teacher_batch_entropy"] < self.batch_entropy_floor:
            return (f"one-prototype collapse: the batch-mean teacher distribution has entropy "
                    f"{metrics['teacher_batch_entropy']:.3f} nats ({int(metrics['prototypes_in_use'])} prototype(s) in use)")
        return None

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        """The collapse reason once it has persisted, else None."""
        reason = self.reason(metrics) if step > self.grace_steps else None
        self._streak = self._streak + 1 if reason else 0
        return reason if self._streak >= self.patience else None


class CollapseError(UserError, RuntimeError):
    """Training stopped because the representation collapsed (``train.stop_on_collapse``)."""
