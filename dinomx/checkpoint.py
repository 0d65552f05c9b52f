"""Resumable training checkpoints: full (gathered, unwrapped) states, so one written by N
processes loads under any number of processes and either distribution type."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from dinomx.config import DinoMXConfig, DistributionConfig
from dinomx.errors import MissingInput, UserError, one_line

CHECKPOINT_NAME = "checkpoint.pt"
_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ResumeError(UserError, ValueError):
    """The checkpoint cannot continue this run."""


def save_checkpoint(accelerator, path: Path, step: int, cfg: DinoMXConfig, students, teacher, objective,
                    optimizers) -> dict | None:
    """Every process must call it; the main one writes and gets the state back."""
    models = [accelerator.unwrap_model(s) for s in students]
    inner = [getattr(o, "optimizer", o) for o in optimizers]  # accelerate wraps optimizers
    state = {
        "step": step,
        "config_sha256": resume_key(cfg),
        "students": [get_model_state_dict(m, options=_FULL_STATE) for m in models],
        "teacher": get_model_state_dict(teacher, options=_FULL_STATE),
        "losses": objective.state_dict(),
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


def read_checkpoint(source: str | Path, cfg: DinoMXConfig) -> dict:
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise MissingInput(f"resume_from: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as exc:  # empty, cut short, or no torch file
        raise ResumeError(f"resume_from: {path} is not a readable checkpoint ({one_line(exc)[:200]})") from None
    if not isinstance(state, dict) or not {"step", "config_sha256"} <= state.keys():
        raise ResumeError(f"resume_from: {path} is a torch file but not a DINO-MX checkpoint "
                          f"(expected the {CHECKPOINT_NAME} that training writes)")
    if state["config_sha256"] != resume_key(cfg):
        raise ResumeError(f"resume_from: {path} was written with a different config; resume with the same one")
    if state["step"] >= cfg.total_steps:
        raise ResumeError(f"resume_from: {path} is already at iteration {state['step']} of {cfg.total_steps}")
    return state


def restore(state: dict, students, teacher, objective) -> None:
    """Model and loss states; optimisers follow once they exist (``restore_optimizers``)."""
    try:
        for model, model_state in zip(students, state["students"]):
            model.load_state_dict(model_state)
        teacher.load_state_dict(state["teacher"])
        objective.load_state_dict(state["losses"])
    except RuntimeError as exc:  # e.g. distillation's projection heads, gone since neighbourhoods replaced them
        raise ResumeError(f"resume_from: the checkpoint holds other modules than this version of DINO-MX builds "
                          f"({one_line(exc)[:300]}); resume with the version that wrote it, or start again") from None


def restore_optimizers(state: dict, students, optimizers) -> None:
    for model, optimizer, optimizer_state in zip(students, optimizers, state["optimizers"]):
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def resume_key(cfg: DinoMXConfig) -> str:
    """The config hash without what may differ between the interrupted and the resumed run: where
    outputs go, where (registered) teachers were downloaded to, how processes cooperate, and how
    often progress is reported or evaluated."""
    return cfg.replace(
        train=cfg.train.replace(output_dir="", log_every=1, eval_every=0, stop_on_collapse=False),
        distillation=cfg.distillation.replace(teachers=[str(len(cfg.distillation.teachers))]),
        distribution=DistributionConfig(),
    ).sha256()
