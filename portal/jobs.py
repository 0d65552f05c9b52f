"""Training jobs from the portal: a validated form becomes an ``mlflow run`` of the project, queued
in the database and run by a worker; the MLflow run is created first so the job links to it (and
its live metrics) from the moment it starts.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient

from dinomx.config import ConfigError, DinoMXConfig
from portal.db import Dataset, Job, db, now

log = logging.getLogger(__name__)
STRATEGIES = ("standard", "lora", "freeze", "distill")
EXPERIMENT = "vision-foundry-portal"


class FormErrors(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def training_configs(project: Path) -> list[str]:
    """The DINO-MX configs of the project a user may start from (``configs/*.yaml`` that load)."""
    names = []
    for path in sorted((project / "configs").glob("*.yaml")):
        try:
            DinoMXConfig.from_yaml(path)
        except (ConfigError, ValueError, TypeError, KeyError):
            continue
        names.append(path.relative_to(project).as_posix())
    return names


@dataclass(frozen=True)
class TrainingRequest:
    dataset_id: int
    name: str
    config: str
    strategy: str = "standard"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    freeze_blocks: int = 0
    teachers: str = ""
    distribution: str = "ddp"
    batch_size: int = 32
    lr: float = 5e-4
    epochs: int = 0  # 0: the config's own

    @classmethod
    def from_form(cls, form: Mapping[str, str], project: Path) -> "TrainingRequest":
        """Every field checked, every problem reported at once under its field name."""
        errors, values = {}, {}

        def number(field, kind, low, high, default):
            raw = str(form.get(field, "") or "").strip()
            if raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                errors[field] = f"expected {'a whole number' if kind is int else 'a number'}, got {raw!r}"
                return default
            if not low <= value <= high:
                errors[field] = f"expected {low}..{high}, got {raw}"
            return value

        values["dataset_id"] = number("dataset_id", int, 1, 2**31, 0)
        if "dataset_id" not in form:
            errors["dataset_id"] = "choose a dataset"
        name = str(form.get("name", "")).strip()
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", name):
            errors["name"] = "lowercase letters, digits and '-', at most 40 (it names the registered models)"
        values["name"] = name
        config = str(form.get("config", ""))
        if config not in training_configs(project):
            errors["config"] = f"expected one of {training_configs(project)}"
        values["config"] = config
        strategy = str(form.get("strategy", "standard"))
        if strategy not in STRATEGIES:
            errors["strategy"] = f"expected one of {list(STRATEGIES)}"
        values["strategy"] = strategy
        values["lora_rank"] = number("lora_rank", int, 1, 256, 8)
        values["lora_alpha"] = number("lora_alpha", int, 1, 1024, 16)
        values["lora_dropout"] = number("lora_dropout", float, 0.0, 0.9, 0.0)
        values["freeze_blocks"] = number("freeze_blocks", int, 0, 128, 0)
        teachers = str(form.get("teachers", "")).strip()
        if strategy == "distill" and not re.fullmatch(r"(models:/[\w.-]+(/\d+|@\w+)|hf:[\w./-]+)(,(models:/[\w.-]+(/\d+|@\w+)|hf:[\w./-]+))*", teachers):
            errors["teachers"] = "distill needs teachers: models:/<name>/<version>, models:/<name>@<alias> or hf:<repo>, comma-separated"
        values["teachers"] = teachers if strategy == "distill" else ""
        distribution = str(form.get("distribution", "ddp"))
        if distribution not in ("ddp", "fsdp"):
            errors["distribution"] = "expected ddp or fsdp"
        values["distribution"] = distribution
        values["batch_size"] = number("batch_size", int, 1, 4096, 32)
        values["lr"] = number("lr", float, 1e-7, 1.0, 5e-4)
        values["epochs"] = number("epochs", int, 0, 10000, 0)
        if not errors:
            request = cls(**values)
            try:  # the engine's own validation, with the overrides the job will pass
                DinoMXConfig.from_yaml(project / request.config, request.overrides())
            except ConfigError as exc:
                errors["config"] = str(exc)
        if errors:
            raise FormErrors(errors)
        return request

    @property
    def entry_point(self) -> str:
        return "distill" if self.strategy == "distill" else "pretrain"

    def overrides(self) -> list[str]:
        items = [f"train.batch_size={self.batch_size}", f"optim.lr={self.lr}", f"distribution.type={self.distribution}"]
        if self.epochs:
            items.append(f"train.epochs={self.epochs}")
        if self.strategy == "lora":
            items += ["lora_config.enabled=true", f"lora_config.r={self.lora_rank}",
                      f"lora_config.alpha={self.lora_alpha}", f"lora_config.dropout={self.lora_dropout}"]
        if self.strategy == "freeze":
            items.append(f"student.freeze_blocks={self.freeze_blocks}")
        return items

    def command(self, dataset: Dataset, run_id: str) -> list[str]:
        params = {"name": self.name, "config": self.config, "data": dataset.train_path,
                  "validation_report": dataset.validation_report, "overrides": " ".join(self.overrides())}
        if self.entry_point == "distill":
            params["teachers"] = self.teachers
        cmd = ["mlflow", "run", ".", "--env-manager", "local", "-e", self.entry_point, "--run-id", run_id]
        for key, value in params.items():
            cmd += ["-P", f"{key}={value}"]
        return cmd

    def to_dict(self) -> dict:
        return asdict(self)


def submit(request: TrainingRequest, dataset: Dataset, owner: str) -> Job:
    job = Job(owner=owner, dataset_id=dataset.id, entry_point=request.entry_point, parameters=request.to_dict(),
              command=[], status="queued")
    db.session.add(job)
    db.session.commit()
    return job


class JobRunner:
    """Runs queued jobs one at a time (``slots`` at once) as ``mlflow run`` subprocesses."""

    def __init__(self, app, project: Path, tracking_uri: str, slots: int = 1, poll_s: float = 1.0):
        self.app, self.project, self.tracking_uri = app, project, tracking_uri
        self.slots, self.poll_s = slots, poll_s
        self._running: dict[int, threading.Thread] = {}
        self._stop = threading.Event()

    def start(self) -> "JobRunner":
        with self.app.app_context():
            # Jobs left running by a previous portal process have no process any more.
            for job in db.session.scalars(db.select(Job).where(Job.status.in_(["starting", "running"]))):
                job.status, job.log_tail, job.finished_at = "failed", "the portal restarted while this job ran", now()
            db.session.commit()
        threading.Thread(target=self._loop, daemon=True, name="portal-jobs").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._start_queued()
            except Exception:
                log.exception("job runner")
            self._stop.wait(self.poll_s)

    def _start_queued(self) -> None:
        self._running = {k: t for k, t in self._running.items() if t.is_alive()}
        free = self.slots - len(self._running)
        if free <= 0:
            return
        with self.app.app_context():
            queued = db.session.scalars(db.select(Job).where(Job.status == "queued").order_by(Job.id).limit(free)).all()
            for job in queued:
                # Claimed with one conditional UPDATE, so portal processes sharing the database never
                # start the same job twice.
                claimed = db.session.execute(db.update(Job).where(Job.id == job.id, Job.status == "queued")
                                             .values(status="starting")).rowcount
                db.session.commit()
                if not claimed:
                    continue
                request = TrainingRequest(**job.parameters)
                client = MlflowClient(self.tracking_uri)
                experiment = client.get_experiment_by_name(EXPERIMENT)
                experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
                run = client.create_run(experiment_id, run_name=f"{request.name}-job{job.id}",
                                        tags={"vf.portal.job": str(job.id), "vf.portal.owner": job.owner})
                job.command = request.command(job.dataset, run.info.run_id)
                job.mlflow_run_id, job.experiment_id = run.info.run_id, experiment_id
                job.status, job.started_at = "running", now()
                db.session.commit()
                thread = threading.Thread(target=self._run, args=(job.id, list(job.command)), daemon=True)
                self._running[job.id] = thread
                thread.start()

    def _run(self, job_id: int, command: list[str]) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri}
        log.info("job %d: %s", job_id, shlex.join(command))
        start = time.monotonic()
        result = subprocess.run(command, cwd=self.project, env=env, capture_output=True, text=True)
        with self.app.app_context():
            job = db.session.get(Job, job_id)
            job.exit_code = result.returncode
            job.status = "finished" if result.returncode == 0 else "failed"
            job.log_tail = (result.stdout + result.stderr)[-6000:]
            job.finished_at = now()
            db.session.commit()
        log.info("job %d %s after %.0fs", job_id, "finished" if result.returncode == 0 else "failed", time.monotonic() - start)
