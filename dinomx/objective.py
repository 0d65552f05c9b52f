"""The DINO-MX objective for one batch, in the shape of DINOv2's ``SSLMetaArch.forward_backward``:
crops and the teacher temperature in; the loss, its parts and what the diagnostics read out.

    DINO   student global/local CLS  vs  teacher's other global crop (centred, sharpened)
    iBOT   student masked patches    vs  teacher's same patches, unmasked
    KoLeo  spread of the student's global CLS tokens within each crop
    distil student projections       vs  frozen teachers' CLS (or their low-magnification pair)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinomx.config import DinoMXConfig
from dinomx.diagnostics import batch_diagnostics
from dinomx.distillation import FrozenTeacher
from dinomx.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, RelationalDistillationLoss
from dinomx.model import DINOModel


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    teacher_probs: list[torch.Tensor]  # per global crop, (B, K)
    student: dict[str, torch.Tensor]


class SSLObjective(nn.Module):
    """The loss modules and their weights; the modules' centres checkpoint with it."""

    def __init__(self, cfg: DinoMXConfig):
        super().__init__()
        h = cfg.dino_head
        self.dino = DINOLoss(h.out_dim, h.student_temp, h.center_momentum, h.centering)
        self.koleo = KoLeoLoss()
        ibot_dim = cfg.ibot.out_dim if cfg.ibot.separate_head else h.out_dim
        self.ibot = IBOTPatchLoss(ibot_dim, h.student_temp, h.center_momentum, h.centering)
        self.distillation = RelationalDistillationLoss()
        self.n_local = cfg.crops.local_crops_number
        self.dino_weight, self.koleo_weight = h.loss_weight, h.koleo_loss_weight
        self.ibot_weight, self.distill_weight = cfg.ibot.loss_weight, cfg.distillation.loss_weight

    def forward(self, student: nn.Module, teacher: DINOModel, batch: dict[str, torch.Tensor], teacher_temp: float,
                frozen: list[FrozenTeacher] = ()) -> StepOutput:
        global_crops, masks = batch["global_crops"], batch.get("masks")
        with torch.no_grad():
            teacher_out = teacher(global_crops, masks=masks, mask_input=False)
            teacher_probs = list(self.dino.teacher_probs(teacher_out["global_logits"].float(), teacher_temp).chunk(2))
        out = student(global_crops, batch.get("local_crops"), masks)

        # Each student global crop is matched with the other teacher crop; each local crop with both.
        global_terms, local_terms = 2, 2 * self.n_local
        parts = {"dino_global_loss": self.dino(list(out["global_logits"].float().chunk(2)), teacher_probs, skip_same_view=True)}
        dino = parts["dino_global_loss"] * global_terms
        if self.n_local:
            parts["dino_local_loss"] = self.dino(list(out["local_logits"].float().chunk(self.n_local)), teacher_probs,
                                                 skip_same_view=False)
            dino = dino + parts["dino_local_loss"] * local_terms
        loss = self.dino_weight * dino / (global_terms + local_terms)
        if self.koleo_weight > 0:
            parts["koleo_loss"] = sum(self.koleo(c) for c in out["global_cls"].chunk(2))
            loss = loss + self.koleo_weight * parts["koleo_loss"]
        if frozen:
            with torch.no_grad():
                # MAD: both student crops of the high-magnification tile face its low-magnification pair.
                seen = batch["paired"].repeat(2, 1, 1, 1) if "paired" in batch else global_crops
                targets = [t(seen) for t in frozen]
            parts["distill_loss"] = self.distillation(out["global_cls"], targets)
            loss = loss + self.distill_weight * parts["distill_loss"]
        if self.ibot_weight > 0 and masks.any():
            patch_probs = self.ibot.teacher_probs(teacher_out["masked_patch_logits"].float(), teacher_temp)
            parts["ibot_loss"] = self.ibot(out["masked_patch_logits"].float(), patch_probs, masks)
            loss = loss + self.ibot_weight * parts["ibot_loss"]
        return StepOutput(loss, parts, teacher_out, teacher_probs, out)

    @torch.no_grad()
    def update_centers(self, step: StepOutput) -> None:
        self.dino.update_center(step.teacher["global_logits"])
        if "masked_patch_logits" in step.teacher:
            self.ibot.update_center(step.teacher["masked_patch_logits"])

    @torch.no_grad()
    def diagnostics(self, step: StepOutput) -> dict[str, float]:
        """Collapse indicators of the step: the teacher's answers against the student's
        predictions of them (each student crop faces the other teacher crop, as in the loss)."""
        student_view0, student_view1 = step.student["global_logits"].chunk(2)
        return batch_diagnostics(
            torch.cat(step.teacher_probs),
            torch.cat([student_view1, student_view0]),
            self.dino.student_temp,
            step.teacher["global_cls"],
        )
