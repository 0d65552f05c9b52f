"""Jobs from the portal: a validated form becomes a run of one of the project's MLflow entry points
(pretrain or distill; heads or evaluate on a registered backbone) through an MLflow project
backend, ``local`` (an ``mlflow run`` process on this machine) or ``slurm`` (an sbatch job,
``projects.slurm``), as the portal is configured. The MLflow run is created first, so the job
links to it and its live metrics from the start. A job's state is read back from the scheduler and
MLflow, never kept only in this process: a restarted portal finds its jobs where they are.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from dinomx.config import ConfigError, DinoMXConfig
from dinomx.errors import MissingInput
from dinomx.hub import HUB_PART, hub_snapshot
from portal.db import Dataset, Job, db, now
from projects.slurm import SlurmBackend, SlurmConfig, SlurmSubmittedRun
from registry.mlflow_service import MlflowService, Outcome, Tag, run_name

log = logging.getLogger(__name__)
STRATEGIES = ("standard", "lora", "freeze", "distill")
BACKENDS = ("local", "slurm")
ACTIVE = ("starting", "running")
CANCELLING = "CANCELLING"  # the scheduler state of a job the portal was asked to cancel
# An ended MLflow run's status as the job's.
JOB_STATUS = {Outcome.FINISHED.status: "finished", Outcome.FAILED.status: "failed", Outcome.KILLED.status: "cancelled"}
LOG_TAIL = 6000
# A registered model, or a Hugging Face hub id (``org/name``): never a path, since ``hf:`` of a
# directory would load whatever the portal's machine holds there.
# Model names as the families make them: no dots, so never ``..``; the registered model must exist
# (``Request.validate`` asks the registry), so a job fails at submission, not when it runs.
TEACHER = re.compile(rf"models:/[a-z0-9][a-z0-9_-]{{0,99}}(?:/[0-9]{{1,9}}|@[a-z][a-z0-9_-]{{0,39}})|hf:{HUB_PART}(?:/{HUB_PART})?",
                     re.ASCII)
# What a job does: train a backbone, or fit probes on a registered one (the entry point's name).
TASKS = {"train": "pretrain or distill a backbone (registers <name>-backbone)",
         "heads": "fit classification heads on a frozen backbone (registers <family>-head)",
         "evaluate": "score a backbone against its random init (information: the promotion service evaluates again)",
         "predict": "run a registered head over whole slides or CT series of the dataset (tables, heatmaps, QuPath "
                    "GeoJSON, a score)"}
FAMILY = r"[a-z0-9][a-z0-9-]{0,39}"
BACKBONE = re.compile(rf"models:/({FAMILY})-backbone(?:/[0-9]+|@\w+)", re.ASCII)
HEAD = re.compile(rf"models:/({FAMILY})-head(?:/[0-9]+|@\w+)", re.ASCII)
SCORE = re.compile(r"[a-z][a-z0-9_]{0,39}")
TIME_LIMIT = re.compile(r"([0-9]{1,3}-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}")  # ASCII digits: Slurm reads no others


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
    batch_size: int | None = None  # None: the config's
    lr: float | None = None
    epochs: int = 0  # 0: the config's own
    steps_per_epoch: int = 0  # 0: the config's (or one pass over the data); a few for a short trial
    nodes: int = 1
    gpus_per_node: int = 0
    processes_per_node: int = 1  # on nodes without GPUs; with GPUs it is one process per GPU
    time_limit: str = ""  # Slurm's D-HH:MM:SS; "" is the partition's limit

    @classmethod
    def from_form(cls, form: Mapping[str, str], project: Path, backend: str = "local") -> "TrainingRequest":
        """Every field checked, every problem reported at once under its field name."""
        errors, values = {}, {}
        number = _Numbers(form, errors)
        values["dataset_id"] = number.dataset_id()
        name = str(form.get("name", "")).strip()
        if not re.fullmatch(FAMILY, name):
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
        if strategy == "distill" and not (teachers and all(TEACHER.fullmatch(t) for t in teachers.split(","))):
            errors["teachers"] = ("distill needs teachers: models:/<name>/<version>, models:/<name>@<alias> or "
                                  "hf:<org>/<repo> (a hub id, never a local path), comma-separated")
        elif strategy == "distill":
            for teacher in (t for t in teachers.split(",") if t.startswith("hf:")):
                try:  # only what the local Hugging Face cache holds; never a folder of the portal's machine
                    hub_snapshot(teacher[3:])
                except MissingInput as exc:
                    errors["teachers"] = str(exc)
        values["teachers"] = teachers if strategy == "distill" else ""
        distribution = str(form.get("distribution", "ddp"))
        if distribution not in ("ddp", "fsdp"):
            errors["distribution"] = "expected ddp or fsdp"
        values["distribution"] = distribution
        values["batch_size"] = number("batch_size", int, 1, 4096, None)
        values["lr"] = number("lr", float, 1e-7, 1.0, None)
        values["epochs"] = number("epochs", int, 0, 10000, 0)
        values["steps_per_epoch"] = number("steps_per_epoch", int, 0, 10_000_000, 0)
        values["nodes"] = number("nodes", int, 1, 64, 1)
        values["gpus_per_node"] = number("gpus_per_node", int, 0, 16, 0)
        values["processes_per_node"] = number("processes_per_node", int, 1, 64, 1)
        values["time_limit"] = _time_limit(form, errors)
        if backend == "local" and values["nodes"] > 1:
            errors["nodes"] = "this portal runs jobs on its own machine (local backend): one node"
        if not errors:
            processes = values["nodes"] * (values["gpus_per_node"] or values["processes_per_node"])
            if distribution == "fsdp" and processes < 2:
                errors["distribution"] = "fsdp shards over several processes: ask for 2 or more GPUs or processes"
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
        # A field left empty is the config's: only what the person chose overrides it.
        items = [f"distribution.type={self.distribution}"]
        if self.batch_size is not None:
            items.append(f"train.batch_size={self.batch_size}")
        if self.lr is not None:
            items.append(f"optim.lr={self.lr}")
        if self.epochs:
            items.append(f"train.epochs={self.epochs}")
        if self.steps_per_epoch:
            items.append(f"train.steps_per_epoch={self.steps_per_epoch}")
        if self.strategy == "lora":
            items += ["lora_config.enabled=true", f"lora_config.r={self.lora_rank}",
                      f"lora_config.alpha={self.lora_alpha}", f"lora_config.dropout={self.lora_dropout}"]
        if self.strategy == "freeze":
            items.append(f"student.freeze_blocks={self.freeze_blocks}")
        return items

    @property
    def processes(self) -> int:
        """Processes per node: one per GPU, else as asked."""
        return self.gpus_per_node or self.processes_per_node

    def parameters(self, dataset: Dataset) -> dict[str, str]:
        """The entry point's MLflow parameters."""
        params = {"name": self.name, "config": self.config, "data": dataset.train_path,
                  "validation_report": dataset.validation_report, "overrides": " ".join(self.overrides())}
        if self.entry_point == "distill":
            params["teachers"] = self.teachers
        return params

    def slurm_resources(self) -> dict:
        resources = {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "tasks_per_node": self.processes}
        return resources | ({"time": self.time_limit} if self.time_limit else {})

    def to_dict(self) -> dict:
        """As the job keeps and shows it: another strategy's fields left out (a standard job has no
        LoRA rank); the dataclass's defaults stand for them when the job is read back."""
        unused = {field for strategy, fields in STRATEGY_FIELDS.items() if strategy != self.strategy for field in fields}
        return {key: value for key, value in asdict(self).items() if key not in unused}


# The form's fields that only one strategy reads.
STRATEGY_FIELDS = {"lora": ("lora_rank", "lora_alpha", "lora_dropout"), "freeze": ("freeze_blocks",),
                   "distill": ("teachers",)}


class _Numbers:
    """Numeric form fields, each problem recorded under its field name."""

    def __init__(self, form: Mapping[str, str], errors: dict[str, str]):
        self.form, self.errors = form, errors

    def __call__(self, field: str, kind: type, low, high, default):
        raw = str(self.form.get(field, "") or "").strip()
        if raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            self.errors[field] = f"expected {'a whole number' if kind is int else 'a number'}, got {raw!r}"
            return default
        if not low <= value <= high:
            self.errors[field] = f"expected {low}..{high}, got {raw}"
        return value

    def dataset_id(self) -> int:
        if "dataset_id" not in self.form:
            self.errors["dataset_id"] = "choose a dataset"
        return self("dataset_id", int, 1, 2**31, 0)


def _time_limit(form: Mapping[str, str], errors: dict[str, str]) -> str:
    time_limit = str(form.get("time_limit", "") or "").strip()
    if time_limit and not TIME_LIMIT.fullmatch(time_limit):
        errors["time_limit"] = f"expected HH:MM:SS or D-HH:MM:SS, got {time_limit!r}"
    return time_limit


@dataclass(frozen=True)
class ProbeRequest:
    """A ``heads`` or ``evaluate`` job: probes fitted on a registered backbone, frozen, in one
    process, on the dataset's train split and scored on the val split beside it. Classification
    only: masks and targets for the dense heads are not part of a portal dataset."""

    dataset_id: int
    task: str
    backbone: str
    knn_k: int = 20
    time_limit: str = ""
    folds: int = 0  # evaluate: grouped k-fold cross-validation (0: the train/val split only)
    processes = 1  # not a field: probes fit in one process

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> "ProbeRequest":
        errors = {}
        number = _Numbers(form, errors)
        dataset_id = number.dataset_id()
        backbone = str(form.get("backbone", "")).strip()
        if not BACKBONE.fullmatch(backbone):
            errors["backbone"] = (f"expected a registered backbone, models:/<family>-backbone/<version> or "
                                  f"models:/<family>-backbone@<alias>, got {backbone!r}")
        knn_k = number("knn_k", int, 1, 1000, 20)
        folds = number("folds", int, 0, 20, 0) if form.get("task") == "evaluate" else 0
        if folds == 1:
            errors["folds"] = "expected 0 (the train/val split only) or 2..20 folds"
        time_limit = _time_limit(form, errors)
        if errors:
            raise FormErrors(errors)
        return cls(dataset_id, str(form["task"]), backbone, knn_k, time_limit, folds)

    @property
    def name(self) -> str:
        """The backbone's family: its experiment, and the ``-head`` a heads job registers."""
        return BACKBONE.fullmatch(self.backbone).group(1)

    @property
    def entry_point(self) -> str:
        return self.task

    @staticmethod
    def splits(dataset: Dataset) -> str:
        """The folder holding the dataset's ``train`` split and the ``val`` beside it."""
        train = PurePosixPath(dataset.train_path or "")
        if train.name != "train":
            raise FormErrors({"dataset_id": f"dataset {dataset.name}: heads and evaluate fit on a train split and "
                                            f"score on the val split beside it; its train_path {str(train)!r} is not "
                                            "a folder named train"})
        return str(train.parent)

    def parameters(self, dataset: Dataset) -> dict[str, str]:
        params = {"data": self.splits(dataset), "validation_report": dataset.validation_report,
                  "knn_k": str(self.knn_k), "masks": "", "targets": "", "target_column": ""}
        if self.task == "heads":
            return params | {"name": self.name, "backbone": self.backbone}
        return params | {"model": self.backbone, "folds": str(self.folds)}

    def slurm_resources(self) -> dict:
        return {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1} | ({"time": self.time_limit} if self.time_limit else {})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PredictRequest:
    """A ``predict`` job: a registered head over one slide or CT series of a dataset the user may
    read (``path`` inside its S3 prefix), or over every slide under a folder of it (a cohort), in
    one process; ``input`` is the object's URI, set from the dataset once it is authorized."""

    dataset_id: int
    task: str
    head: str
    path: str
    score: str = ""
    time_limit: str = ""
    input: str = ""
    processes = 1  # not a field

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> "PredictRequest":
        from portal.access import BadPath, clean_relative

        errors = {}
        dataset_id = _Numbers(form, errors).dataset_id()
        head = str(form.get("head", "")).strip()
        if not HEAD.fullmatch(head):
            errors["head"] = (f"expected a registered head, models:/<family>-head/<version> or "
                              f"models:/<family>-head@<alias>, got {head!r}")
        path = str(form.get("path", "")).strip()
        try:
            path = clean_relative(path)
        except BadPath as exc:
            errors["path"] = f"{exc} (a slide, or a folder of slides or of one CT series, inside the dataset)"
        score = str(form.get("score", "") or "").strip()
        if score and not SCORE.fullmatch(score):
            errors["score"] = f"expected a score module's name such as agatston, got {score!r}"
        time_limit = _time_limit(form, errors)
        if errors:
            raise FormErrors(errors)
        return cls(dataset_id, "predict", head, path, score, time_limit)

    @property
    def name(self) -> str:
        return HEAD.fullmatch(self.head).group(1)

    @property
    def entry_point(self) -> str:
        return "predict"

    def parameters(self, dataset: Dataset) -> dict[str, str]:
        return {"model": self.head, "input": self.input, "score": self.score}

    def slurm_resources(self) -> dict:
        return {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1} | ({"time": self.time_limit} if self.time_limit else {})

    def to_dict(self) -> dict:
        return asdict(self)


Request = TrainingRequest | ProbeRequest | PredictRequest


def request_from_form(form: Mapping[str, str], project: Path, backend: str) -> Request:
    task = str(form.get("task", "train") or "train")
    if task not in TASKS:
        raise FormErrors({"task": f"expected one of {list(TASKS)}, got {task!r}"})
    if task == "train":
        return TrainingRequest.from_form(form, project, backend)
    if task == "predict":
        return PredictRequest.from_form(form)
    return ProbeRequest.from_form(form)


def job_request(job: Job) -> Request:
    """The request a queued job was made from."""
    kind = {"pretrain": TrainingRequest, "distill": TrainingRequest, "predict": PredictRequest}.get(job.entry_point,
                                                                                                     ProbeRequest)
    return kind(**job.parameters)


def submit(request: Request, dataset: Dataset, owner: str) -> Job:
    job = Job(owner=owner, dataset_id=dataset.id, entry_point=request.entry_point, parameters=request.to_dict(),
              command=[], status="queued")
    db.session.add(job)
    db.session.commit()
    return job


def read_tail(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
        return f.read().decode("utf-8", "replace")


def own_environment_path() -> str:
    """PATH with the portal's own environment first: ``mlflow`` and the ``python`` its entry points
    run must be the portal's, whatever PATH a server (gunicorn under a service manager) started
    its workers with."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


class LocalLauncher:
    """The ``local`` backend: ``mlflow run`` as a process of its own session on this machine, its
    output in a file. After a restart the process is found again by its id (and its run id on its
    command line, so a reused process id is not mistaken for it)."""

    name = "local"

    def __init__(self, project: Path, tracking_uri: str, log_dir: Path):
        self.project, self.tracking_uri, self.log_dir = project, tracking_uri, log_dir
        self._children: dict[str, subprocess.Popen] = {}

    def submit(self, request: Request, dataset: Dataset, run_id: str) -> tuple[list[str], str, str]:
        """(command, scheduler id, log path)."""
        command = ["mlflow", "run", str(self.project), "--env-manager", "local", "-e", request.entry_point,
                   "--run-id", run_id]
        # Only the training entry points take ``processes``; MLflow would pass it to the others as an option.
        local = {"processes": str(request.processes)} if request.processes > 1 else {}
        for key, value in (request.parameters(dataset) | local).items():
            command += ["-P", f"{key}={value}"]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{run_id}.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(command, cwd=self.project, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri,
                                            "PATH": own_environment_path()},
                                       start_new_session=True)
        self._children[str(process.pid)] = process
        return command, str(process.pid), str(log_path)

    def poll(self, job: Job) -> tuple[str, str | None, int | None]:
        """(scheduler state, the job's final status or None while it runs, exit code)."""
        child = self._children.get(job.scheduler_id)
        exit_code = child.poll() if child is not None else None
        # Until every process of the session is gone: a cancel ends `mlflow run` at once, while the
        # training under it still writes its checkpoint and ends its run KILLED.
        if (child is not None and exit_code is None) or self._alive(job):
            return "RUNNING", None, None  # the scheduler's word, not a run status
        self._children.pop(job.scheduler_id, None)
        service = MlflowService(self.tracking_uri)
        # A process that ended without ending its run: the run says so. One that was cancelled (a
        # SIGTERM before the trainer could take it, e.g. during its step-0 kNN) ends as cancelled.
        if job.scheduler_state == CANCELLING:
            service.finish(job.mlflow_run_id, Outcome.KILLED, f"cancelled before it could checkpoint (exit code {exit_code})")
        else:
            service.finish(job.mlflow_run_id, Outcome.FAILED,
                           f"the job's process ended without reporting (exit code {exit_code})")
        return "EXITED", JOB_STATUS[service.status(job.mlflow_run_id)], exit_code

    def cancel(self, job: Job) -> None:
        if self._alive(job):
            # The whole session: `mlflow run` and the training processes under it, which checkpoint
            # on SIGTERM and end their run KILLED.
            os.killpg(int(job.scheduler_id), signal.SIGTERM)

    @staticmethod
    def _alive(job: Job) -> bool:
        """Whether a process of the job's session is left: ``mlflow run`` itself, or the training
        under it, which may still be writing its checkpoint after a cancel ended ``mlflow run``.
        A process counts only if it names the job's run (a reused process id is not the job), or
        if it is in the middle of an exec: its environment and command line then read empty for a
        moment (1 to 35 % of reads made right after a fork, here, the more the busier the machine),
        and it is still the job's. A zombie is gone."""
        marker = job.mlflow_run_id.encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != int(job.scheduler_id):
                    continue
                environ = (proc / "environ").read_bytes()
                if marker in environ or marker in (proc / "cmdline").read_bytes():
                    return True
                if not environ and (proc / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                    return True
            except (OSError, ValueError, IndexError):
                continue
        return False


class SlurmLauncher:
    """The ``slurm`` backend (``projects.slurm``): the site's backend config (partition, account,
    set-up lines) with the job's resources on top."""

    name = "slurm"

    def __init__(self, project: Path, tracking_uri: str, site_config: dict):
        SlurmConfig.from_dict(site_config)  # a bad site config fails at start, not at the first job
        self.project, self.tracking_uri, self.site_config = project, tracking_uri, site_config
        self._submitted: dict[str, SlurmSubmittedRun] = {}

    def submit(self, request: Request, dataset: Dataset, run_id: str) -> tuple[list[str], str, str]:
        config = self.site_config | request.slurm_resources() | {"run_id": run_id}
        client = MlflowService(self.tracking_uri).client
        submitted = SlurmBackend().run(str(self.project), request.entry_point, request.parameters(dataset), None,
                                       config, self.tracking_uri, client.get_run(run_id).info.experiment_id)
        self._submitted[submitted.job_id] = submitted
        return ["sbatch", submitted.script_path], submitted.job_id, submitted.log_path

    def poll(self, job: Job) -> tuple[str, str | None, int | None]:
        submitted = self._job(job)
        final = JOB_STATUS.get(submitted.get_status())
        if final:
            self._submitted.pop(job.scheduler_id, None)
        return submitted.state or "UNKNOWN", final, None

    def cancel(self, job: Job) -> None:
        self._job(job).cancel(wait=False)

    def _job(self, job: Job) -> SlurmSubmittedRun:
        if job.scheduler_id not in self._submitted:
            self._submitted[job.scheduler_id] = SlurmSubmittedRun(job.mlflow_run_id, job.scheduler_id, log_path=job.log_path,
                                                                  tracking_uri=self.tracking_uri)
        return self._submitted[job.scheduler_id]


def make_launcher(backend: str, project: Path, tracking_uri: str, slurm_config: str | None, log_dir: Path):
    if backend not in BACKENDS:
        raise ValueError(f"PORTAL_JOB_BACKEND: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "local":
        return LocalLauncher(project, tracking_uri, log_dir)
    site = json.loads(Path(slurm_config).read_text()) if slurm_config else {}
    return SlurmLauncher(project, tracking_uri, site)


# pg_advisory_xact_lock key of the job claim: one portal process at a time counts the active jobs.
CLAIM_LOCK = 0x7666_6A6F  # "vfjo"


def claim_next(slots: int) -> Job | None:
    """The oldest queued job, moved to ``starting`` if fewer than ``slots`` jobs are active: exactly
    once across every portal process sharing the database. The count and the claim are one
    UPDATE, which SQLite runs under its write lock; PostgreSQL runs it after an advisory lock, so
    that two workers cannot both count a free slot under READ COMMITTED."""
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(db.text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})
    oldest = db.select(Job.id).where(Job.status == "queued").order_by(Job.id).limit(1).scalar_subquery()
    active = db.select(db.func.count()).select_from(Job).where(Job.status.in_(ACTIVE)).scalar_subquery()
    claimed = db.session.execute(db.update(Job).where(Job.id == oldest, Job.status == "queued", active < slots)
                                 .values(status="starting").returning(Job.id)).scalar_one_or_none()
    db.session.commit()
    return db.session.get(Job, claimed) if claimed is not None else None


class JobRunner:
    """Submits queued jobs (``slots`` active at once) through the launcher, and follows every active
    job's scheduler state until its MLflow run ends."""

    def __init__(self, app, launcher, tracking_uri: str, slots: int = 1, poll_s: float = 1.0):
        self.app, self.launcher, self.tracking_uri = app, launcher, tracking_uri
        self.slots, self.poll_s = slots, poll_s
        self._stop = threading.Event()

    def start(self) -> "JobRunner":
        with self.app.app_context():
            # Claimed by a portal that stopped before handing it to the scheduler: nothing runs it.
            for job in db.session.scalars(db.select(Job).where(Job.status == "starting", Job.scheduler_id.is_(None))):
                self._fail(job, "the portal stopped before submitting this job")
            db.session.commit()
        threading.Thread(target=self._loop, daemon=True, name="portal-jobs").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def resume(self, job: Job) -> None:
        """Queue a stopped job again: it goes on from its last checkpoint in the same MLflow run."""
        job.status, job.scheduler_id, job.scheduler_state, job.exit_code, job.finished_at = "queued", None, None, None, None
        db.session.commit()

    def cancel(self, job: Job) -> None:
        if job.status == "queued":
            job.status, job.finished_at = "cancelled", now()
        elif job.status in ACTIVE and job.scheduler_id:
            self.launcher.cancel(job)
            job.scheduler_state = CANCELLING
        db.session.commit()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.app_context():
                    self._refresh()
                    self._start_queued()
            except Exception:
                log.exception("job runner")
            self._stop.wait(self.poll_s)

    def _refresh(self) -> None:
        for job in db.session.scalars(db.select(Job).where(Job.status == "running")).all():
            state, final, exit_code = self.launcher.poll(job)
            # A cancel stays one until the job has ended, whichever worker's runner polls it.
            job.scheduler_state = CANCELLING if job.scheduler_state == CANCELLING and not final else state
            job.log_tail = read_tail(job.log_path) or job.log_tail
            if final:
                job.status, job.exit_code, job.finished_at = final, exit_code, now()
                log.info("job %d %s (%s)", job.id, final, state)
            db.session.commit()

    def _start_queued(self) -> None:
        while (job := claim_next(self.slots)) is not None:
            request = job_request(job)
            service = MlflowService(self.tracking_uri)
            client = service.client
            if job.mlflow_run_id is None:
                experiment_id = service.experiment_id(request.name)  # the family's, as from the command line
                run = client.create_run(experiment_id, run_name=run_name(request.name, f"{request.entry_point}-job{job.id}"),
                                        tags={Tag.PORTAL_JOB: str(job.id), Tag.PORTAL_OWNER: job.owner,
                                              Tag.PORTAL_BACKEND: self.launcher.name})
                job.mlflow_run_id, job.experiment_id = run.info.run_id, experiment_id
            job.backend = self.launcher.name  # a resumed job goes on in its own run
            try:
                job.command, job.scheduler_id, job.log_path = self.launcher.submit(request, job.dataset, job.mlflow_run_id)
            except Exception as exc:
                log.warning("job %d could not start: %s", job.id, exc)
                self._fail(job, f"could not start: {exc}")
            else:
                job.status, job.started_at, job.scheduler_state = "running", now(), "SUBMITTED"
            db.session.commit()

    def _fail(self, job: Job, reason: str) -> None:
        job.status, job.log_tail, job.finished_at = "failed", reason, now()
        if job.mlflow_run_id:
            MlflowService(self.tracking_uri).finish(job.mlflow_run_id, Outcome.FAILED, reason)
