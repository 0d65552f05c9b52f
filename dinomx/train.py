"""The DINO-MX self-distillation loop: student/teacher, multi-crop, EMA teacher, learning
diagnostics, online kNN, resumable checkpoints.

The engine knows nothing of experiment tracking: callers pass ``on_log`` to receive metrics and
``on_collapse`` to hear that the representation collapsed.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinomx.augmentations import collate_crops
from dinomx.backbone import pretrained_student
from dinomx.checkpoint import CHECKPOINT_NAME, read_checkpoint, restore, restore_optimizers, save_checkpoint
from dinomx.config import ConfigError, DinoMXConfig
from dinomx.data import ImageFolderDataset
from dinomx.diagnostics import CollapseDetector, CollapseError
from dinomx.distillation import FrozenTeacher
from dinomx.interrupt import Interrupted, StopRequest, ignore_stop_signals
from dinomx.model import build_models, ema_update, param_groups, shard
from dinomx.objective import SSLObjective
from dinomx.online_eval import KNNMonitor
from dinomx.sampling import CropDataset, StreamSampler
from dinomx.schedules import Schedules

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
CollapseCallback = Callable[[int, str], None]


@dataclass
class TrainResult:
    backbone_dir: Path
    checkpoint: Path
    steps: int
    metrics: dict[str, float]
    collapse: str | None = None


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
    eval_root: str | Path | None = None,
    on_collapse: CollapseCallback | None = None,
) -> TrainResult:
    """Train, or continue from ``resume_from`` (a checkpoint file or a directory holding one).
    ``eval_root``: a labelled split for the online kNN of ``train.eval_every``.

    SIGTERM or SIGUSR1 (a scheduler's notice) ends the run at the next iteration with a checkpoint
    and ``Interrupted``; resuming from it continues exactly there."""
    # From the start: a notice during set-up stops the run at its first iteration.
    with StopRequest() as stop:
        return _train(cfg, data_root, on_log, accelerator, resume_from, eval_root, on_collapse, stop)


def _train(cfg: DinoMXConfig, data_root: str | Path, on_log: MetricsCallback | None, accelerator: Accelerator | None,
           resume_from: str | Path | None, eval_root: str | Path | None, on_collapse: CollapseCallback | None,
           stop: StopRequest) -> TrainResult:
    cfg = pretrained_student(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)
    total, batch_size = cfg.total_steps, cfg.train.batch_size
    per_step = batch_size * accelerator.num_processes
    images = ImageFolderDataset(data_root, cfg.student.num_channels)
    if len(images) < batch_size:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset at {data_root} ({len(images)} images)")
    monitor = None
    if cfg.train.eval_every and eval_root is not None:
        monitor = KNNMonitor(data_root, eval_root, cfg.student.num_channels, cfg.crops.global_crops_size,
                             cfg.dataset.mean, cfg.dataset.std, cfg.train.eval_images, seed=cfg.train.seed)

    frozen = [FrozenTeacher.load(t, cfg.dataset.mean, cfg.dataset.std, cfg.crops.global_crops_size)
              for t in cfg.distillation.teachers]
    student, teacher = build_models(cfg, frozen)
    objective = SSLObjective(cfg)
    # Multi-expert: experts start equal, each learns from its own data shard, and the EMA teacher
    # aggregates them all into the one model that is saved.
    experts = cfg.train.num_experts
    students = [student] + [copy.deepcopy(student) for _ in range(experts - 1)]
    state = read_checkpoint(resume_from, cfg) if resume_from is not None else None
    if state is not None:
        restore(state, students, teacher, objective)
    start = state["step"] if state is not None else 0
    for module in (*students, teacher, objective, *frozen):
        module.to(accelerator.device)
    fsdp = cfg.distribution.type == "fsdp"
    if fsdp:
        if accelerator.num_processes < 2:
            raise ConfigError("distribution.type: fsdp shards over several processes; launch with torchrun or accelerate launch")
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for model in (*students, teacher):
            shard(model, mesh)
    optimizers = [torch.optim.AdamW(param_groups(s, cfg.optim.layerwise_decay), betas=cfg.optim.betas) for s in students]
    if state is not None:
        restore_optimizers(state, students, optimizers)
        logger.info("resumed from %s at iteration %d/%d", resume_from, start, total)

    loader = accelerator.prepare(DataLoader(
        CropDataset(images, cfg),
        batch_size=batch_size,
        sampler=StreamSampler(len(images), start * per_step, total * per_step, cfg.train.seed, experts, per_step),
        collate_fn=collate_crops,
        num_workers=cfg.dataset.num_workers,
        worker_init_fn=ignore_stop_signals,
        drop_last=True,
    ))
    if not fsdp:  # FSDP modules are already distributed; DDP wraps the rest
        prepared = [accelerator.prepare(model, opt) for model, opt in zip(students, optimizers)]
        students, optimizers = [m for m, _ in prepared], [o for _, o in prepared]
    expert_params = [list(accelerator.unwrap_model(model).parameters()) for model in students]
    teacher_params = list(teacher.parameters())
    schedules = Schedules.from_config(cfg)
    detector = CollapseDetector(cfg.dino_head.out_dim, grace_steps=schedules.warmup_steps)
    checkpoint = Path(cfg.train.output_dir) / CHECKPOINT_NAME
    metrics: dict[str, float] = {}
    collapse: str | None = None
    window_start, window_steps = time.perf_counter(), 0
    # A live bar for people at a terminal; logs and MLflow get the periodic log line instead.
    progress = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    for model in students:
        model.train()
    # Workers ignore the stop signals and end with the loop: ended here, whatever ends the loop, not
    # at interpreter exit, where a held exception (a notebook, a test) keeps them alive and
    # multiprocessing's exit handler, whose SIGTERM they ignore, waits for them forever.
    with closing(iter(loader)) as batches:
        for it, batch in enumerate(batches, start=start):
            expert = it % experts
            student, optimizer = students[expert], optimizers[expert]
            lr, wd = schedules.lr[it], schedules.weight_decay[it]
            momentum, teacher_temp = schedules.momentum[it], schedules.teacher_temp[it]
            for group in optimizer.param_groups:
                group["lr"] = (schedules.last_layer_lr[it] if group["is_last_layer"] else lr) * group["lr_scale"]
                group["weight_decay"] = wd if group["apply_wd"] else 0.0

            with accelerator.autocast():
                out = objective(student, teacher, batch, teacher_temp, frozen)
            _check_finite(out.loss, out.parts, it, lr, teacher_temp)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out.loss)
            # Clipping at infinity only measures: the norm is a diagnostic in its own right.
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad or math.inf)
            optimizer.step()
            objective.update_centers(out)
            ema_update(teacher_params, expert_params[expert], momentum)

            step = it + 1
            progress.update()
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
                save_checkpoint(accelerator, checkpoint, step, cfg, students, teacher, objective, optimizers)
            window_steps += 1
            evaluate = monitor is not None and (step % cfg.train.eval_every == 0 or step == total)
            if step % cfg.train.log_every == 0 or step == total or evaluate:
                metrics = {
                    "total_loss": out.loss.item(),
                    **{k: v.item() for k, v in out.parts.items()},
                    **objective.diagnostics(out),
                    "grad_norm": float(grad_norm),
                    "lr": lr,
                    "wd": wd,
                    "teacher_momentum": momentum,
                    "teacher_temp": teacher_temp,
                    "epoch": it / cfg.train.steps_per_epoch,
                    "images_per_sec": window_steps * per_step / (time.perf_counter() - window_start),
                }
                if evaluate:
                    # Through the root module: under FSDP only its forward gathers the sharded weights.
                    metrics["knn_top1"] = monitor.accuracy(lambda pixels: teacher(pixels, heads=False)["global_cls"],
                                                           accelerator.device)
                collapse = _watch_collapse(detector, step, metrics, collapse, on_collapse, accelerator.is_main_process)
                if accelerator.is_main_process:
                    _log_line(step, total, metrics, out.parts, per_step, accelerator)
                    if on_log is not None:
                        on_log(step, metrics)
                if _agreed_max(accelerator, collapse is not None and cfg.train.stop_on_collapse):
                    save_checkpoint(accelerator, checkpoint, step, cfg, students, teacher, objective, optimizers)
                    raise CollapseError(f"stopped at iteration {step} (train.stop_on_collapse): {collapse}")
                window_start, window_steps = time.perf_counter(), 0
                progress.set_postfix(loss=f"{metrics['total_loss']:.4f}", lr=f"{lr:.2e}")
            # Every process stops at the same iteration; SIGTERM (being killed) outranks SIGUSR1 (a warning).
            signum = _agreed_max(accelerator, stop.signum or 0)
            if signum and step < total:
                save_checkpoint(accelerator, checkpoint, step, cfg, students, teacher, objective, optimizers)
                raise Interrupted(step, checkpoint, signum)

    progress.close()
    final = save_checkpoint(accelerator, checkpoint, total, cfg, students, teacher, objective, optimizers)
    backbone_dir = Path(cfg.train.output_dir) / "backbone"
    if accelerator.is_main_process:
        export = teacher
        if fsdp:  # rebuild an unsharded teacher from the gathered weights
            export = build_models(cfg, frozen)[1]
            export.load_state_dict(final["teacher"])
        # The EMA teacher is the better encoder (DINO evaluates the teacher).
        export.backbone.save_pretrained(backbone_dir, cfg.dataset, cfg.crops.global_crops_size)
        cfg.to_yaml(Path(cfg.train.output_dir) / "config.yaml")
    accelerator.wait_for_everyone()
    return TrainResult(backbone_dir=backbone_dir, checkpoint=checkpoint, steps=total, metrics=metrics, collapse=collapse)


def _check_finite(loss: torch.Tensor, parts: dict[str, torch.Tensor], it: int, lr: float, teacher_temp: float) -> None:
    if not math.isfinite(loss.item()):
        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
        raise FloatingPointError(
            f"loss became {loss.item()} at iteration {it} ({detail}; lr={lr:.3g}, teacher_temp={teacher_temp:.3g}); "
            "lower optim.lr or raise optim.warmup_epochs"
        )


def _agreed_max(accelerator: Accelerator, value: int) -> int:
    """The largest of every process's ``value``: each judges its own batch or signals, and one that
    stops alone would leave the others waiting."""
    flag = torch.tensor(int(value), device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag)


def _watch_collapse(detector: CollapseDetector, step: int, metrics: dict[str, float], known: str | None,
                    on_collapse: CollapseCallback | None, is_main: bool) -> str | None:
    """The collapse reason (the first one seen stays), announced once."""
    reason = detector.update(step, metrics)
    metrics["collapsed"] = float(reason is not None)
    if reason is None or known is not None:
        return known or reason
    if is_main:
        logger.warning("it %d: the representation collapsed: %s", step, reason)
        if on_collapse is not None:
            on_collapse(step, reason)
    return reason


def _log_line(step: int, total: int, m: dict[str, float], parts: dict, per_step: int, accelerator: Accelerator) -> None:
    knn = f"  knn {m['knn_top1']:.3f}" if "knn_top1" in m else ""
    memory = f"  max mem {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if accelerator.device.type == "cuda" else ""
    logger.info(
        "it %d/%d  loss %.4f (%s)  H(t) %.2f  H(mean t) %.2f  KL %.3f  protos %d  rank %.1f  |g| %.2f%s  "
        "lr %.3g  wd %.3g  mom %.5f  temp %.4f  batch %d  %.1f img/s%s",
        step, total, m["total_loss"], ", ".join(f"{k} {m[k]:.4f}" for k in parts),
        m["teacher_entropy"], m["teacher_batch_entropy"], m["kl_teacher_student"], m["prototypes_in_use"],
        m["embedding_rank"], m["grad_norm"], knn, m["lr"], m["wd"], m["teacher_momentum"], m["teacher_temp"],
        per_step, m["images_per_sec"], memory,
    )
