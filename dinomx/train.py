"""The DINO-MX self-distillation loop: student/teacher, multi-crop, DINO + iBOT + KoLeo losses,
EMA teacher, resumable checkpoints.

The engine knows nothing of experiment tracking: callers pass ``on_log`` to receive metrics.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from dinomx.augmentations import DataAugmentationDINO, collate_crops
from dinomx.backbone import Backbone, layer_depth
from dinomx.config import DinoMXConfig, DistributionConfig
from dinomx.data import ImageFolderDataset, load_image, to_tensor
from dinomx.distillation import FrozenTeacher, projection_heads
from dinomx.dino_head import DINOHead
from dinomx.loss import CosineDistillationLoss, DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinomx.masking import sample_mask
from dinomx.schedules import CosineScheduler

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_NAME = "checkpoint.pt"


class ResumeError(ValueError):
    """The checkpoint cannot continue this run."""


class DINOModel(nn.Module):
    """Backbone + DINO head (+ iBOT head, possibly the same module). One forward per training
    step so that DDP sees every pass."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead, ibot_head: DINOHead | None = None,
                 distill_heads: nn.ModuleList | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.distill_heads = distill_heads

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_input: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``masks`` (N, P) selects the patches whose iBOT logits are returned; with
        ``mask_input`` they are also hidden from the backbone (student), otherwise seen (teacher)."""
        cls, patches = self.backbone(global_crops, masks if mask_input and masks is not None else None)
        out = {"global_cls": cls, "global_logits": self.dino_head(cls)}
        if self.distill_heads is not None:
            out["distill"] = [head(cls) for head in self.distill_heads]
        if masks is not None and self.ibot_head is not None:
            out["masked_patch_logits"] = self.ibot_head(patches[masks])
        if local_crops is not None:
            out["local_logits"] = self.dino_head(self.backbone(local_crops)[0])
        return out


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
    checkpoint: Path
    steps: int
    metrics: dict[str, float]


class StreamSampler(Sampler):
    """Positions ``start..end`` of an endless stream of seeded epoch permutations, as
    ``(position, index)`` pairs. The position seeds the sample's augmentation, so a run resumed
    from a checkpoint (or read by more workers) sees exactly the same views.

    With ``shards`` > 1 (multi-expert training) the images are dealt round-robin into shards and
    training step ``s`` (``step_size`` positions) draws only from shard ``s % shards``."""

    def __init__(self, num_items: int, start: int, end: int, seed: int, shards: int = 1, step_size: int = 1):
        self.num_items, self.start, self.end, self.seed = num_items, start, end, seed
        self.shards, self.step_size = shards, step_size

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        current: dict[int, tuple[int, torch.Tensor]] = {}  # shard -> (epoch, its permutation)
        for position in range(self.start, self.end):
            step, offset = divmod(position, self.step_size)
            shard = step % self.shards
            items = range(shard, self.num_items, self.shards)
            local = (step // self.shards) * self.step_size + offset
            epoch = local // len(items)
            if current.get(shard, (None,))[0] != epoch:
                seed = _mix(self.seed + 7919 * shard, epoch)
                current[shard] = (epoch, torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)))
            yield position, items[int(current[shard][1][local % len(items)])]


class CropDataset(Dataset):
    """Multi-crop views (and iBOT masks of the global crops) of an image folder."""

    def __init__(self, images: ImageFolderDataset, cfg: DinoMXConfig):
        self.images = images
        self.augment = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std, cfg.dataset.augmentation)
        self.seed = cfg.train.seed
        self.ibot = cfg.ibot if cfg.ibot.loss_weight > 0 else None
        self.grid = cfg.crops.global_crops_size // cfg.student.patch_size
        self.masks = None
        if cfg.crops.label_masks_root:
            self.masks = _parallel_paths(images, Path(cfg.crops.label_masks_root), "crops.label_masks_root", "label mask")
        self.pairs = None
        if cfg.distillation.paired_root:
            self.pairs = _parallel_paths(images, Path(cfg.distillation.paired_root), "distillation.paired_root",
                                         "low-magnification pair")
            self.paired_size = cfg.crops.global_crops_size
            self.mean = torch.tensor(cfg.dataset.mean).view(-1, 1, 1)
            self.std = torch.tensor(cfg.dataset.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, list[torch.Tensor]]:
        position, index = key
        generator = torch.Generator().manual_seed(_mix(self.seed, position))
        img, _ = self.images[index]
        label_mask = None
        if self.masks is not None:
            label_mask = to_tensor(load_image(self.masks[index], num_channels=1))[0]
            if label_mask.shape != img.shape[1:]:
                raise ValueError(f"{self.masks[index]}: mask {tuple(label_mask.shape)} does not match its image {tuple(img.shape[1:])}")
        views = self.augment(img, generator, label_mask)
        if self.ibot is not None:
            views["masks"] = [
                sample_mask(self.grid, self.ibot.mask_ratio_min_max, self.ibot.mask_sample_probability, generator)
                for _ in views["global_crops"]
            ]
        if self.pairs is not None:
            low = to_tensor(load_image(self.pairs[index], self.images.num_channels)).unsqueeze(0)
            low = F.interpolate(low, size=(self.paired_size, self.paired_size), mode="bilinear", antialias=True)[0]
            views["paired"] = [(low - self.mean) / self.std]
        return views


def _parallel_paths(images: ImageFolderDataset, root: Path, key: str, what: str) -> list[Path]:
    """The file at each image's relative path under another root; all must exist."""
    paths = [root / path.relative_to(images.root) for path in images.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: {len(missing)} of {len(paths)} tiles have no {what}, e.g. {missing[0]}")
    return paths


def _mix(seed: int, value: int) -> int:
    return (seed * 1_000_003 + value) % (2**63)


# A transformer block module: Dinov2 `encoder.layer.3`, ViT `layers.3`.
_BLOCK_MODULE = re.compile(r"(?:^|\.)layers?\.\d+$")
_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "register_tokens", "position_embeddings")


def param_groups(model: "DINOModel", layerwise_decay: float) -> list[dict]:
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    num_layers = model.backbone.model.config.num_hidden_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases, norms and tokens are not decayed; the prototype layer has its own lr schedule.
        decay = param.ndim > 1 and not name.endswith(_NO_DECAY_SUFFIXES)
        depth = layer_depth(name, num_layers) if name.startswith("backbone.") else num_layers + 1
        lr_scale = layerwise_decay ** (num_layers + 1 - depth)
        groups.setdefault((decay, "last_layer" in name, lr_scale), []).append(param)
    return [
        {"params": params, "apply_wd": decay, "is_last_layer": last, "lr_scale": scale, "weight_decay": 0.0}
        for (decay, last, scale), params in groups.items()
    ]


def _head(in_dim: int, section, norm_last_layer: bool = True) -> DINOHead:
    return DINOHead(in_dim, section.out_dim, section.hidden_dim, section.bottleneck_dim, section.nlayers, norm_last_layer)


def build_models(cfg: DinoMXConfig, teachers: list[FrozenTeacher] = ()) -> tuple[DINOModel, DINOModel]:
    backbone = Backbone.from_config(cfg.student)
    # Adapters and freezing go in before the teacher is copied, so teacher and student have the
    # same parameters and the EMA pairs them one to one (frozen ones stay equal).
    if cfg.lora_config.enabled:
        backbone.add_lora(cfg.lora_config)
    backbone.freeze_blocks(cfg.student.freeze_blocks)
    if cfg.ibot.loss_weight == 0:
        for name, param in backbone.named_parameters():
            if name.endswith("mask_token"):
                param.requires_grad = False  # only masked crops (iBOT) use it
    dino_head = _head(backbone.embed_dim, cfg.dino_head, cfg.dino_head.norm_last_layer)
    ibot_head = None
    if cfg.ibot.loss_weight > 0:
        ibot_head = _head(backbone.embed_dim, cfg.ibot, cfg.dino_head.norm_last_layer) if cfg.ibot.separate_head else dino_head
    distill_heads = projection_heads(backbone.embed_dim, list(teachers)) if teachers else None
    student = DINOModel(backbone, dino_head, ibot_head, distill_heads)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


class Losses(nn.Module):
    """The loss modules, grouped so their centres checkpoint together."""

    def __init__(self, cfg: DinoMXConfig):
        super().__init__()
        h = cfg.dino_head
        self.dino = DINOLoss(h.out_dim, h.student_temp, h.center_momentum, h.centering)
        self.koleo = KoLeoLoss()
        ibot_dim = cfg.ibot.out_dim if cfg.ibot.separate_head else h.out_dim
        self.ibot = IBOTPatchLoss(ibot_dim, h.student_temp, h.center_momentum, h.centering)
        self.distillation = CosineDistillationLoss()


def make_accelerator(cfg: DinoMXConfig) -> Accelerator:
    # Several processes without CUDA (torchrun --nproc_per_node N on CPU) must be told to use
    # the CPU for accelerate to set up gloo DDP instead of running N independent copies.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A batch may hold no masked crop, leaving the mask token without gradient on that step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.ibot.loss_weight > 0)
    return Accelerator(mixed_precision=cfg.distribution.mixed_precision, cpu=multi_cpu, kwargs_handlers=[ddp])


def train(
    cfg: DinoMXConfig,
    data_root: str | Path,
    on_log: MetricsCallback | None = None,
    accelerator: Accelerator | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train, or continue from ``resume_from`` (a checkpoint file or a directory holding one)."""
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)
    output_dir = Path(cfg.train.output_dir)
    total, batch_size = cfg.total_steps, cfg.train.batch_size
    per_step = batch_size * accelerator.num_processes

    images = ImageFolderDataset(data_root, cfg.student.num_channels)
    if len(images) < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the dataset at {data_root} ({len(images)} images)")

    d = cfg.distillation
    frozen = [FrozenTeacher.load(t, cfg.dataset.mean, cfg.dataset.std, cfg.crops.global_crops_size) for t in d.teachers]
    student, teacher = build_models(cfg, frozen)
    losses = Losses(cfg)
    # Multi-expert: experts start equal, each learns from its own data shard, and the EMA teacher
    # aggregates them all into the one model that is saved.
    experts = cfg.train.num_experts
    students = [student] + [copy.deepcopy(student) for _ in range(experts - 1)]
    state = _read_checkpoint(resume_from, cfg) if resume_from is not None else None
    if state is not None:
        for model, model_state in zip(students, state["students"]):
            model.load_state_dict(model_state)
        teacher.load_state_dict(state["teacher"])
        losses.load_state_dict(state["losses"])
    start = state["step"] if state is not None else 0
    for module in (*students, teacher, losses, *frozen):
        module.to(accelerator.device)
    fsdp = cfg.distribution.type == "fsdp"
    if fsdp:
        if accelerator.num_processes < 2:
            raise ValueError("distribution.type: fsdp shards over several processes; launch with torchrun or accelerate launch")
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for model in (*students, teacher):
            _shard(model, mesh)
    optimizers = [torch.optim.AdamW(param_groups(s, cfg.optim.layerwise_decay), betas=cfg.optim.betas) for s in students]
    if state is not None:
        for model, optimizer, optimizer_state in zip(students, optimizers, state["optimizers"]):
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
        logger.info("resumed from %s at iteration %d/%d", resume_from, start, total)

    loader = DataLoader(
        CropDataset(images, cfg),
        batch_size=batch_size,
        sampler=StreamSampler(len(images), start * per_step, total * per_step, cfg.train.seed, experts, per_step),
        collate_fn=collate_crops,
        num_workers=cfg.dataset.num_workers,
        drop_last=True,
    )
    loader = accelerator.prepare(loader)
    if not fsdp:  # FSDP modules are already distributed; DDP wraps the rest
        prepared = [accelerator.prepare(model, opt) for model, opt in zip(students, optimizers)]
        students, optimizers = [m for m, _ in prepared], [o for _, o in prepared]
    expert_params = [list(accelerator.unwrap_model(model).parameters()) for model in students]
    schedules = Schedules.from_config(cfg)
    teacher_params = list(teacher.parameters())

    n_local = cfg.crops.local_crops_number
    # Each student global crop is matched with the other teacher crop; each local crop with both.
    global_terms, local_terms = 2, 2 * n_local
    use_ibot, use_koleo = cfg.ibot.loss_weight > 0, cfg.dino_head.koleo_loss_weight > 0
    checkpoint = output_dir / CHECKPOINT_NAME
    metrics: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    # A live bar for people at a terminal; logs and MLflow get the periodic log line instead.
    progress = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    for model in students:
        model.train()
    for it, batch in enumerate(loader, start=start):
        student, optimizer, student_params = students[it % experts], optimizers[it % experts], expert_params[it % experts]
        lr, wd = schedules.lr[it], schedules.weight_decay[it]
        momentum, teacher_temp = schedules.momentum[it], schedules.teacher_temp[it]
        for group in optimizer.param_groups:
            group["lr"] = (schedules.last_layer_lr[it] if group["is_last_layer"] else lr) * group["lr_scale"]
            group["weight_decay"] = wd if group["apply_wd"] else 0.0

        global_crops, masks = batch["global_crops"], batch.get("masks")
        with torch.no_grad():
            teacher_out = teacher(global_crops, masks=masks, mask_input=False)
            teacher_probs = list(losses.dino.teacher_probs(teacher_out["global_logits"], teacher_temp).chunk(2))
        with accelerator.autocast():
            out = student(global_crops, batch.get("local_crops"), masks)
            parts = {"dino_global_loss": losses.dino(list(out["global_logits"].float().chunk(2)), teacher_probs, skip_same_view=True)}
            dino = parts["dino_global_loss"] * global_terms
            if n_local:
                parts["dino_local_loss"] = losses.dino(list(out["local_logits"].float().chunk(n_local)), teacher_probs, skip_same_view=False)
                dino = dino + parts["dino_local_loss"] * local_terms
            loss = cfg.dino_head.loss_weight * dino / (global_terms + local_terms)
            if use_koleo:
                parts["koleo_loss"] = sum(losses.koleo(c) for c in out["global_cls"].chunk(2))
                loss = loss + cfg.dino_head.koleo_loss_weight * parts["koleo_loss"]
            if frozen:
                with torch.no_grad():
                    # MAD: both student crops of the high-magnification tile face its low-magnification pair.
                    seen = batch["paired"].repeat(2, 1, 1, 1) if "paired" in batch else global_crops
                    targets = [t(seen) for t in frozen]
                parts["distill_loss"] = losses.distillation(out["distill"], targets)
                loss = loss + d.loss_weight * parts["distill_loss"]
            if use_ibot and masks.any():
                patch_probs = losses.ibot.teacher_probs(teacher_out["masked_patch_logits"], teacher_temp)
                parts["ibot_loss"] = losses.ibot(out["masked_patch_logits"].float(), patch_probs, masks)
                loss = loss + cfg.ibot.loss_weight * parts["ibot_loss"]

        if not math.isfinite(loss.item()):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it} ({detail}; lr={lr:.3g}, teacher_temp={teacher_temp:.3g}); "
                "lower optim.lr or raise optim.warmup_epochs"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.optim.clip_grad > 0:
            accelerator.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
        optimizer.step()

        with torch.no_grad():
            losses.dino.update_center(teacher_out["global_logits"])
            if "masked_patch_logits" in teacher_out:
                losses.ibot.update_center(teacher_out["masked_patch_logits"])
            # Under FSDP each process averages its own shards: student and teacher shard alike.
            local_teacher = _local(teacher_params)
            torch._foreach_mul_(local_teacher, momentum)
            torch._foreach_add_(local_teacher, [p.detach() for p in _local(student_params)], alpha=1 - momentum)

        step = it + 1
        progress.update()
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
            _save_checkpoint(accelerator, checkpoint, step, cfg, students, teacher, losses, optimizers)
        window_steps += 1
        if step % cfg.train.log_every == 0 or step == total:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "total_loss": loss.item(),
                **{k: v.item() for k, v in parts.items()},
                "lr": lr,
                "wd": wd,
                "teacher_momentum": momentum,
                "teacher_temp": teacher_temp,
                "epoch": it / cfg.train.steps_per_epoch,
                "images_per_sec": window_steps * per_step / elapsed,
            }
            if accelerator.is_main_process:
                logger.info(
                    "it %d/%d  loss %.4f (%s)  lr %.3g  wd %.3g  mom %.5f  temp %.4f  batch %d  %.1f img/s%s",
                    step, total, metrics["total_loss"], ", ".join(f"{k} {v.item():.4f}" for k, v in parts.items()),
                    lr, wd, momentum, teacher_temp, per_step, metrics["images_per_sec"], _memory_note(accelerator),
                )
                if on_log is not None:
                    on_log(step, metrics)
            window_start, window_steps = time.perf_counter(), 0
            progress.set_postfix(loss=f"{metrics['total_loss']:.4f}", lr=f"{lr:.2e}")

    progress.close()
    final = _save_checkpoint(accelerator, checkpoint, total, cfg, students, teacher, losses, optimizers)
    backbone_dir = output_dir / "backbone"
    if accelerator.is_main_process:
        export = teacher
        if fsdp:  # rebuild an unsharded teacher from the gathered weights
            export = build_models(cfg, frozen)[1]
            export.load_state_dict(final["teacher"])
        # The EMA teacher is the better encoder (DINO evaluates the teacher).
        export.backbone.save_pretrained(backbone_dir, cfg.dataset, cfg.crops.global_crops_size)
        cfg.to_yaml(output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return TrainResult(backbone_dir=backbone_dir, checkpoint=checkpoint, steps=total, metrics=metrics)


def _shard(model: DINOModel, mesh) -> None:
    """FSDP2: each transformer block is its own unit, the rest belongs to the root."""
    for name, module in model.named_modules():
        if _BLOCK_MODULE.search(name):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _local(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save_checkpoint(accelerator, path: Path, step: int, cfg: DinoMXConfig, students, teacher, losses, optimizers) -> dict | None:
    """Full (gathered, unwrapped) states, so a checkpoint loads under any number of processes and
    either distribution type. Every process must call it; the main one writes and gets the state."""
    models = [accelerator.unwrap_model(s) for s in students]
    inner = [getattr(o, "optimizer", o) for o in optimizers]  # accelerate wraps optimizers
    state = {
        "step": step,
        "config_sha256": _resume_key(cfg),
        "students": [get_model_state_dict(m, options=_FULL_STATE) for m in models],
        "teacher": get_model_state_dict(teacher, options=_FULL_STATE),
        "losses": losses.state_dict(),
        "optimizers": [get_optimizer_state_dict(m, o, options=_FULL_STATE) for m, o in zip(models, inner)],
    }
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a kill mid-write never leaves a truncated checkpoint
    return state


def _read_checkpoint(source: str | Path, cfg: DinoMXConfig) -> dict:
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume_from: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config_sha256"] != _resume_key(cfg):
        raise ResumeError(f"resume_from: {path} was written with a different config; resume with the same one")
    if state["step"] >= cfg.total_steps:
        raise ResumeError(f"resume_from: {path} is already at iteration {state['step']} of {cfg.total_steps}")
    return state


def _resume_key(cfg: DinoMXConfig) -> str:
    """The config hash without what may differ between the interrupted and the resumed run: where
    outputs go, where (registered) teachers were downloaded to, and how processes cooperate."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, output_dir=""),
        distillation=dataclasses.replace(cfg.distillation, teachers=[str(len(cfg.distillation.teachers))]),
        distribution=DistributionConfig(),
    ).sha256()


def _memory_note(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        return f"  max mem {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return ""
