"""The DINO-MX self-distillation loop: student/teacher, multi-crop, centering, EMA teacher.

The engine knows nothing of experiment tracking: callers pass ``on_log`` to receive metrics.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from dinomx.augmentations import DataAugmentationDINO, collate_crops
from dinomx.backbone import Backbone
from dinomx.config import DinoMXConfig
from dinomx.data import ImageFolderDataset
from dinomx.dino_head import DINOHead
from dinomx.loss import DINOLoss
from dinomx.schedules import CosineScheduler

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]


class DINOModel(nn.Module):
    """Backbone + DINO head; one forward per crop resolution so DDP sees every pass."""

    def __init__(self, backbone: Backbone, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *crop_batches: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(self.backbone(x)[0]) for x in crop_batches]


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


@dataclass
class TrainResult:
    backbone_dir: Path
    steps: int
    metrics: dict[str, float]


_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "register_tokens", "position_embeddings")


def _collate_views(samples: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    return collate_crops([crops for crops, _ in samples])


def _param_groups(model: nn.Module) -> list[dict]:
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases, norms and tokens are not decayed; the prototype layer has its own lr schedule.
        decay = param.ndim > 1 and not name.endswith(_NO_DECAY_SUFFIXES)
        groups.setdefault((decay, "last_layer" in name), []).append(param)
    return [
        {"params": params, "apply_wd": decay, "is_last_layer": last, "weight_decay": 0.0}
        for (decay, last), params in groups.items()
    ]


def build_models(cfg: DinoMXConfig) -> tuple[DINOModel, DINOModel]:
    backbone = Backbone.from_config(cfg.student)
    h = cfg.dino_head
    head = DINOHead(backbone.embed_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.norm_last_layer)
    student = DINOModel(backbone, head)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def train(
    cfg: DinoMXConfig,
    data_root: str | Path,
    on_log: MetricsCallback | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    accelerator = accelerator or Accelerator()
    set_seed(cfg.train.seed)
    output_dir = Path(cfg.train.output_dir)
    total = cfg.total_steps

    augment = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std)
    dataset = ImageFolderDataset(data_root, cfg.student.num_channels, transform=augment)
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is larger than the dataset at {data_root} "
            f"({len(dataset)} images)"
        )
    sampler = RandomSampler(
        dataset,
        num_samples=total * cfg.train.batch_size * accelerator.num_processes,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=_collate_views,
        num_workers=cfg.dataset.num_workers,
        drop_last=True,
    )

    student, teacher = build_models(cfg)
    teacher.to(accelerator.device)
    dino_loss = DINOLoss(cfg.dino_head.out_dim, cfg.dino_head.student_temp, cfg.dino_head.center_momentum)
    dino_loss.to(accelerator.device)
    optimizer = torch.optim.AdamW(_param_groups(student), betas=cfg.optim.betas)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    schedules = Schedules.from_config(cfg)
    student_params = [p for p in accelerator.unwrap_model(student).parameters()]
    teacher_params = [p for p in teacher.parameters()]

    n_local = cfg.crops.local_crops_number
    # Each student global crop is matched with the other teacher crop; each local crop with both.
    global_terms, local_terms = 2, 2 * n_local
    metrics: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    student.train()
    for it, batch in enumerate(loader):
        if it >= total:
            break
        lr, wd = schedules.lr[it], schedules.weight_decay[it]
        momentum, teacher_temp = schedules.momentum[it], schedules.teacher_temp[it]
        for group in optimizer.param_groups:
            group["lr"] = schedules.last_layer_lr[it] if group["is_last_layer"] else lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0

        global_crops = batch["global_crops"]
        with torch.no_grad():
            (teacher_out,) = teacher(global_crops)
            teacher_probs = list(dino_loss.softmax_center_teacher(teacher_out, teacher_temp).chunk(2))
        crops = [global_crops] + ([batch["local_crops"]] if n_local else [])
        with accelerator.autocast():
            outputs = student(*crops)
            global_loss = dino_loss(list(outputs[0].float().chunk(2)), teacher_probs, skip_same_view=True)
            loss = global_loss * global_terms
            local_loss = torch.zeros(())
            if n_local:
                local_loss = dino_loss(list(outputs[1].float().chunk(n_local)), teacher_probs, skip_same_view=False)
                loss = loss + local_loss * local_terms
            loss = loss / (global_terms + local_terms)

        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it} (lr={lr:.3g}, teacher_temp={teacher_temp:.3g}); "
                "lower optim.lr or raise optim.warmup_epochs"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.optim.clip_grad > 0:
            accelerator.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        optimizer.step()

        with torch.no_grad():
            dino_loss.update_center(teacher_out)
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1 - momentum)

        window_steps += 1
        if (it + 1) % cfg.train.log_every == 0 or it + 1 == total:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "total_loss": loss.item(),
                "dino_global_loss": global_loss.item(),
                "dino_local_loss": local_loss.item(),
                "lr": lr,
                "wd": wd,
                "teacher_momentum": momentum,
                "teacher_temp": teacher_temp,
                "epoch": it / cfg.train.steps_per_epoch,
                "images_per_sec": window_steps * cfg.train.batch_size * accelerator.num_processes / elapsed,
            }
            if accelerator.is_main_process:
                logger.info(
                    "it %d/%d  loss %.4f (global %.4f, local %.4f)  lr %.3g  wd %.3g  mom %.5f  "
                    "temp %.4f  batch %d  %.1f img/s%s",
                    it + 1, total, metrics["total_loss"], metrics["dino_global_loss"],
                    metrics["dino_local_loss"], lr, wd, momentum, teacher_temp,
                    cfg.train.batch_size, metrics["images_per_sec"], _memory_note(accelerator),
                )
                if on_log is not None:
                    on_log(it + 1, metrics)
            window_start, window_steps = time.perf_counter(), 0

    backbone_dir = output_dir / "backbone"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # The EMA teacher is the better encoder (DINO evaluates the teacher).
        teacher.backbone.save_pretrained(backbone_dir, cfg.dataset, cfg.crops.global_crops_size)
        cfg.to_yaml(output_dir / "config.yaml")
    return TrainResult(backbone_dir=backbone_dir, steps=min(total, it + 1), metrics=metrics)


def _memory_note(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return f"  max mem {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return ""
