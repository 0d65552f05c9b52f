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
import traceback
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, send_to_device, set_seed
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dinomx.backbone import pretrained_student
from dinomx.checkpoint import CHECKPOINT_NAME, read_checkpoint, restore, restore_optimizers, save_checkpoint
from dinomx.config import ConfigError, DinoMXConfig
from dinomx.data import ImageFolderDataset
from dinomx.diagnostics import CollapseDetector, CollapseError
from dinomx.distillation import FrozenTeacher
from dinomx.errors import UserError
from dinomx.interrupt import Interrupted, StopRequest, ignore_stop_signals
from dinomx.model import build_models, ema_pairs, ema_update, param_groups, shard, share_frozen
from dinomx.objective import SSLObjective, StepOutput
from dinomx.online_eval import KNNMonitor
from dinomx.sampling import CropDataset, StreamSampler
from dinomx.schedules import Schedules
from dinomx.shards import is_sharded, read_index
from dinomx.stream import ShardOrder, ShardStream

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
    knn_before: float | None = None  # the online kNN of the network before any update (step 0)


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


@dataclass
class Run:
    """Everything the loop works with, built once by ``build_run``."""

    cfg: DinoMXConfig
    accelerator: Accelerator
    students: list  # one per expert; usually one
    optimizers: list
    teacher: torch.nn.Module
    objective: SSLObjective
    frozen: list[FrozenTeacher]
    loader: DataLoader
    schedules: Schedules
    monitor: KNNMonitor | None
    start: int
    checkpoint: Path
    fsdp: bool
    # Per student (expert): the (teacher, student) parameters the EMA moves, as ``ema_pairs`` gives them.
    ema: list[tuple[list[torch.Tensor], list[torch.Tensor]]]

    @property
    def total(self) -> int:
        return self.cfg.total_steps

    @property
    def per_step(self) -> int:
        """Images per iteration over all processes."""
        return self.cfg.train.batch_size * self.accelerator.num_processes

    def save(self, step: int) -> dict:
        return save_checkpoint(self.accelerator, self.checkpoint, step, self.cfg, self.students, self.teacher,
                               self.objective, self.optimizers)


@dataclass
class Step:
    """What one iteration did: its objective's output and the schedule values it ran at."""

    it: int
    out: StepOutput
    grad_norm: float
    lr: float
    wd: float
    momentum: float
    teacher_temp: float

    @property
    def done(self) -> int:
        """Iterations completed after this one."""
        return self.it + 1


def build_run(cfg: DinoMXConfig, data_root: str | Path, accelerator: Accelerator | None,
              resume_from: str | Path | None, eval_root: str | Path | None) -> Run:
    """Models, optimisers, schedules, data and evaluators, restored from ``resume_from`` if given."""
    cfg = pretrained_student(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.train.seed)
    experts = cfg.train.num_experts
    monitor = None
    if cfg.train.eval_every and eval_root is not None:
        monitor = KNNMonitor(data_root, eval_root, cfg.student.num_channels, cfg.crops.global_crops_size,
                             cfg.dataset.mean, cfg.dataset.std, cfg.train.eval_images, seed=cfg.train.seed)

    frozen = [FrozenTeacher.load(t, cfg.dataset.mean, cfg.dataset.std, cfg.crops.global_crops_size)
              for t in cfg.distillation.teachers]
    student, teacher = build_models(cfg)
    fsdp = cfg.distribution.type == "fsdp"
    if not fsdp:
        shared = share_frozen(student, teacher)
        if shared:
            logger.info("teacher shares %.1fM frozen weights with the student", shared / 1e6)
    objective = SSLObjective(cfg)
    # Multi-expert: experts start equal, each learns from its own data shard, and the EMA teacher
    # aggregates them all into the one model that is saved.
    students = [student] + [copy.deepcopy(student) for _ in range(experts - 1)]
    state = read_checkpoint(resume_from, cfg) if resume_from is not None else None
    if state is not None:
        restore(state, students, teacher, objective)
    start = state["step"] if state is not None else 0
    for module in (*students, teacher, objective, *frozen):
        module.to(accelerator.device)
    if fsdp:
        if accelerator.num_processes < 2:
            raise ConfigError("distribution.type: fsdp shards over several processes; launch with torchrun or accelerate launch")
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for model in (*students, teacher):
            shard(model, mesh)
    optimizers = [torch.optim.AdamW(param_groups(s, cfg.optim.layerwise_decay), betas=cfg.optim.betas) for s in students]
    if state is not None:
        restore_optimizers(state, students, optimizers)
        logger.info("resumed from %s at iteration %d/%d", resume_from, start, cfg.total_steps)

    loader = data_loader(cfg, data_root, accelerator, start)
    if not fsdp:  # FSDP modules are already distributed; DDP wraps the rest
        prepared = [accelerator.prepare(model, opt) for model, opt in zip(students, optimizers)]
        students, optimizers = [m for m, _ in prepared], [o for _, o in prepared]
    return Run(cfg=cfg, accelerator=accelerator, students=students, optimizers=optimizers, teacher=teacher,
               objective=objective, frozen=frozen, loader=loader, schedules=Schedules.from_config(cfg), monitor=monitor,
               start=start, checkpoint=Path(cfg.train.output_dir) / CHECKPOINT_NAME, fsdp=fsdp,
               ema=[ema_pairs(teacher, accelerator.unwrap_model(model)) for model in students])


def data_loader(cfg: DinoMXConfig, data_root: str | Path, accelerator: Accelerator, start: int):
    """The batches of iterations ``start`` on: from an image folder through a seeded sampler, or
    streamed from shards (``dinomx.stream``), each process reading its own."""
    batch_size, per_step = cfg.train.batch_size, cfg.train.batch_size * accelerator.num_processes
    loading = {"batch_size": batch_size, "num_workers": cfg.dataset.num_workers,
               "worker_init_fn": ignore_stop_signals}
    if is_sharded(data_root):
        shards = read_index(data_root)
        shards.image = cfg.dataset.shard_image or shards.image
        if shards.components and shards.image not in shards.components:
            raise ConfigError(f"dataset.shard_image: {data_root} holds {', '.join(shards.components)}, "
                              f"not {shards.image!r}")
        for key, used in (("train.num_experts", cfg.train.num_experts > 1), ("crops.label_masks_root", cfg.crops.label_masks_root),
                          ("distillation.paired_root", cfg.distillation.paired_root)):
            if used:
                raise ConfigError(f"{key}: not available when streaming shards ({data_root}); ingest with "
                                  "--layout folder to use it")
        if shards.samples < batch_size:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset at {data_root} ({shards.samples} samples)")
        order = ShardOrder(shards, cfg.train.seed, cfg.dataset.open_shards, cfg.dataset.shuffle_buffer,
                           verify=cfg.dataset.verify_shards)
        crops = CropDataset(None, cfg)
        stream = ShardStream(order, crops.views, cfg.student.num_channels, batch_size, start,
                             cfg.total_steps, accelerator.process_index, accelerator.num_processes)
        # Not through accelerate, whose loaders for iterable data read on one process and dispatch.
        return OnDevice(DataLoader(stream, collate_fn=crops.augment.collate, **loading), accelerator.device)
    images = ImageFolderDataset(data_root, cfg.student.num_channels)
    if len(images) < batch_size:
        raise ConfigError(f"train.batch_size={batch_size} is larger than the dataset at {data_root} ({len(images)} images)")
    sampler = StreamSampler(len(images), start * per_step, cfg.total_steps * per_step, cfg.train.seed,
                            cfg.train.num_experts, per_step)
    crops = CropDataset(images, cfg)
    return accelerator.prepare(DataLoader(crops, sampler=sampler, drop_last=True, collate_fn=crops.augment.collate, **loading))


@dataclass
class OnDevice:
    loader: DataLoader
    device: torch.device

    def __iter__(self):
        batches = iter(self.loader)
        try:
            for batch in batches:
                yield send_to_device(batch, self.device)
        finally:
            # Workers end with the loop (see `batches`), not when the collector reaches the iterator.
            getattr(batches, "_shutdown_workers", lambda: None)()


def batches(loader: Iterable):
    """The loader's batches, its workers ended with the loop however it ends.

    Workers ignore the stop signals, so they must end here, not at interpreter exit, where
    multiprocessing's exit handler sends them SIGTERM and waits forever while anything holds their
    iterator: a notebook or a test holding an exception, or the interpreter itself, which keeps an
    uncaught one as ``sys.last_traceback``. When the model's step raises, closing the loader's
    generator releases it. When fetching a batch raises (an unreadable image), the generator has
    already ended and the frames of the error's traceback hold the iterator: those frames, the
    loader's own, are cleared. A worker's ``UserError`` comes back with the worker's traceback as
    its message, and is raised again with its own."""
    with closing(iter(loader)) as source:
        while True:
            try:
                batch = next(source)
            except StopIteration:
                return
            except BaseException as exc:
                traceback.clear_frames(exc.__traceback__)
                if isinstance(exc, UserError) and str(exc).startswith("Caught "):
                    raise type(exc)(str(exc).rsplit(f"{type(exc).__name__}: ", 1)[-1].strip()) from None
                raise
            yield batch


def train_step(run: Run, it: int, batch) -> Step:
    """One iteration of one expert: schedules, forward, backward, clip, step, centres, EMA."""
    schedules, expert = run.schedules, it % run.cfg.train.num_experts
    student, optimizer = run.students[expert], run.optimizers[expert]
    lr, wd = schedules.lr[it], schedules.weight_decay[it]
    momentum, teacher_temp = schedules.momentum[it], schedules.teacher_temp[it]
    for group in optimizer.param_groups:
        group["lr"] = (schedules.last_layer_lr[it] if group["is_last_layer"] else lr) * group["lr_scale"]
        group["weight_decay"] = wd if group["apply_wd"] else 0.0

    with run.accelerator.autocast():
        out = run.objective(student, run.teacher, batch, teacher_temp, run.frozen)
    _check_finite(out.loss, out.parts, it, lr, teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    run.accelerator.backward(out.loss)
    # Clipping at infinity only measures: the norm is a diagnostic in its own right.
    grad_norm = run.accelerator.clip_grad_norm_(student.parameters(), run.cfg.optim.clip_grad or math.inf)
    optimizer.step()
    run.objective.update_centers(out)
    ema_update(*run.ema[expert], momentum)
    return Step(it, out, float(grad_norm), lr, wd, momentum, teacher_temp)


class PeriodicCheckpoint:
    """A resumable checkpoint every ``train.checkpoint_every`` iterations and every
    ``train.checkpoint_every_minutes`` of training (the last one is written by the end of
    training). Every process saves at the same iteration: the clock of the slowest decides."""

    def __init__(self) -> None:
        self.since = time.monotonic()

    def __call__(self, run: Run, step: Step) -> None:
        every, minutes = run.cfg.train.checkpoint_every, run.cfg.train.checkpoint_every_minutes
        if step.done >= run.total:
            return
        due = bool(every) and step.done % every == 0
        if minutes:
            due = bool(_agreed_max(run.accelerator, due or time.monotonic() - self.since >= 60 * minutes))
        if due:
            run.save(step.done)
            self.since = time.monotonic()


class Reporting:
    """At each log step (and evaluation): the metrics, the online kNN, the collapse watch, the log
    line and ``on_log``; stops on collapse when ``train.stop_on_collapse``. Keeps the last metrics
    and the collapse reason for the result."""

    def __init__(self, run: Run, on_log: MetricsCallback | None, on_collapse: CollapseCallback | None):
        self.on_log, self.on_collapse = on_log, on_collapse
        self.detector = CollapseDetector(run.cfg.dino_head.out_dim, grace_steps=run.schedules.warmup_steps)
        self.metrics: dict[str, float] = {}
        self.collapse: str | None = None
        self.knn_before: float | None = None
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.started, self.start_step = time.perf_counter(), run.start
        # A live bar for people at a terminal; logs and MLflow get the periodic log line instead,
        # and between log steps a short progress line every train.progress_every_seconds.
        self.progress = tqdm(total=run.total, initial=run.start, unit="it", dynamic_ncols=True,
                             disable=not (run.accelerator.is_main_process and sys.stderr.isatty()))
        self.progress_every = 0.0 if not self.progress.disable else run.cfg.train.progress_every_seconds
        self.last_line = time.perf_counter()

    def baseline(self, run: Run) -> None:
        """The online kNN of the network before any update, logged at step 0, so that every
        learning curve starts from what training has to beat."""
        if run.monitor is None or run.start > 0:
            return
        self.metrics = {"knn_top1": self._knn(run)}
        self.knn_before = self.metrics["knn_top1"]
        if run.accelerator.is_main_process:
            logger.info("it 0/%d  knn %.3f (before training)", run.total, self.metrics["knn_top1"])
            if self.on_log is not None:
                self.on_log(0, dict(self.metrics))

    def _seconds_left(self, run: Run, done: int) -> float:
        # At this launch's pace so far: what a person waiting on the run wants to know.
        return (time.perf_counter() - self.started) / (done - self.start_step) * (run.total - done)

    def _progress_line(self, run: Run, done: int) -> None:
        # Only the main process prints, and it decides by its own clock: no collective, so no rank
        # can wait on another for a line of text.
        now = time.perf_counter()
        if not (self.progress_every and run.accelerator.is_main_process and now - self.last_line >= self.progress_every):
            return
        rate = (done - self.start_step) / (now - self.started)
        logger.info("it %d/%d (%s left)  %.2f it/s  %.1f img/s", done, run.total,
                    duration(self._seconds_left(run, done)), rate, rate * run.per_step)
        self.last_line = now

    @staticmethod
    def _knn(run: Run) -> float:
        # Through the root module: under FSDP only its forward gathers the sharded weights.
        return run.monitor.accuracy(lambda pixels: run.teacher(pixels, heads=False)["global_cls"], run.accelerator.device)

    def __call__(self, run: Run, step: Step) -> None:
        cfg, done, accelerator = run.cfg, step.done, run.accelerator
        self.progress.update()
        self.window_steps += 1
        evaluate = run.monitor is not None and (done % cfg.train.eval_every == 0 or done == run.total)
        if not (done % cfg.train.log_every == 0 or done == run.total or evaluate):
            self._progress_line(run, done)
            return
        out = step.out
        self.metrics = {
            "total_loss": out.loss.item(),
            **{k: v.item() for k, v in out.parts.items()},
            **run.objective.diagnostics(out),
            "grad_norm": step.grad_norm,
            "lr": step.lr,
            "wd": step.wd,
            "teacher_momentum": step.momentum,
            "teacher_temp": step.teacher_temp,
            "epoch": step.it / cfg.train.steps_per_epoch,
            "images_per_sec": self.window_steps * run.per_step / (time.perf_counter() - self.window_start),
            "seconds_left": self._seconds_left(run, done),
        }
        if evaluate:
            self.metrics["knn_top1"] = self._knn(run)
        self.collapse = _watch_collapse(self.detector, done, self.metrics, self.collapse, self.on_collapse,
                                        accelerator.is_main_process)
        if accelerator.is_main_process:
            _log_line(done, run.total, self.metrics, out.parts, run.per_step, accelerator)
            self.last_line = time.perf_counter()
            if self.on_log is not None:
                self.on_log(done, self.metrics)
        if _agreed_max(accelerator, self.collapse is not None and cfg.train.stop_on_collapse):
            run.save(done)
            raise CollapseError(f"stopped at iteration {done} (train.stop_on_collapse): {self.collapse}")
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.progress.set_postfix(loss=f"{self.metrics['total_loss']:.4f}", lr=f"{step.lr:.2e}")


class StopOnSignal:
    """A scheduler's notice (``StopRequest``): every process stops at the same iteration with a
    checkpoint; SIGTERM (being killed) outranks SIGUSR1 (a warning)."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def __call__(self, run: Run, step: Step) -> None:
        signum = _agreed_max(run.accelerator, self.stop.signum or 0)
        if signum and step.done < run.total:
            run.save(step.done)
            raise Interrupted(step.done, run.checkpoint, signum)


def _train(cfg: DinoMXConfig, data_root: str | Path, on_log: MetricsCallback | None, accelerator: Accelerator | None,
           resume_from: str | Path | None, eval_root: str | Path | None, on_collapse: CollapseCallback | None,
           stop: StopRequest) -> TrainResult:
    run = build_run(cfg, data_root, accelerator, resume_from, eval_root)
    reporting = Reporting(run, on_log, on_collapse)
    hooks = (PeriodicCheckpoint(), reporting, StopOnSignal(stop))
    reporting.baseline(run)
    for model in run.students:
        model.train()
    with closing(batches(run.loader)) as loaded:
        for it, batch in enumerate(loaded, start=run.start):
            step = train_step(run, it, batch)
            for hook in hooks:
                hook(run, step)
    reporting.progress.close()
    return TrainResult(backbone_dir=export(run), checkpoint=run.checkpoint, steps=run.total, metrics=reporting.metrics,
                       collapse=reporting.collapse, knn_before=reporting.knn_before)


def export(run: Run) -> Path:
    """The final checkpoint, and the EMA teacher's backbone as a ``save_pretrained`` folder (DINO
    evaluates the teacher: it is the better encoder)."""
    cfg, accelerator = run.cfg, run.accelerator
    final = run.save(run.total)
    backbone_dir = Path(cfg.train.output_dir) / "backbone"
    if accelerator.is_main_process:
        teacher = run.teacher
        if run.fsdp:  # rebuild an unsharded teacher from the gathered weights
            teacher = build_models(cfg)[1]
            teacher.load_state_dict(final["teacher"])
        teacher.backbone.save_pretrained(backbone_dir, cfg.dataset, cfg.crops.global_crops_size)
        cfg.to_yaml(Path(cfg.train.output_dir) / "config.yaml")
    accelerator.wait_for_everyone()
    return backbone_dir


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
        "it %d/%d (%s left)  loss %.4f (%s)  H(t) %.2f  H(mean t) %.2f  KL %.3f  protos %d  rank %.1f  |g| %.2f%s  "
        "lr %.3g  wd %.3g  mom %.5f  temp %.4f  batch %d  %.1f img/s%s",
        step, total, duration(m["seconds_left"]), m["total_loss"], ", ".join(f"{k} {m[k]:.4f}" for k in parts),
        m["teacher_entropy"], m["teacher_batch_entropy"], m["kl_teacher_student"], m["prototypes_in_use"],
        m["embedding_rank"], m["grad_norm"], knn, m["lr"], m["wd"], m["teacher_momentum"], m["teacher_temp"],
        per_step, m["images_per_sec"], memory,
    )


def duration(seconds: float) -> str:
    """``1h05m``, ``4m20s``, ``12s``: time left as a person reads it."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
