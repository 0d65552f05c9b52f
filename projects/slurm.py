"""MLflow project backend for Slurm (the ``mlflow.project_backend`` entry point ``slurm``):

    mlflow run . -e pretrain --env-manager local --backend slurm --backend-config deploy/slurm/backend-config.json

Each run becomes one ``sbatch`` job, written out where an admin can read and resubmit it
(``<log_dir>/<run id>.sbatch``, also logged to the run). Training entry points run as one task
per GPU (``srun``); each task is a ``torch.distributed`` process whose rank, world size and
rendezvous come from the Slurm allocation, as DINOv2 launches through submitit. Tasks are Slurm's
own processes, so its signals reach the training loop directly: the time-limit warning
(``--signal=USR1@…``) makes every rank checkpoint, the script requeues the job, and the requeued
job continues the same MLflow run from that checkpoint (``projects.pretrain``).

The plain Slurm CLI rather than submitit: the job is a shell script a cluster admin can read and
rerun, nothing is pickled across Python versions, and only the Slurm client is needed on the
submitting host (the portal's).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import ExecutionException
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
    fetch_and_validate_project,
    get_or_create_run,
    load_project,
)

from dinomx.interrupt import REQUEUE_EXIT_CODE
from registry.mlflow_service import ENDED, MlflowService, Outcome, Tag

log = logging.getLogger(__name__)

# Slurm job states (squeue/sacct names) as MLflow run statuses. A requeued job is PENDING again.
MLFLOW_STATUS = {
    "PENDING": "SCHEDULED", "CONFIGURING": "SCHEDULED", "REQUEUED": "SCHEDULED", "REQUEUE_HOLD": "SCHEDULED",
    "REQUEUE_FED": "SCHEDULED", "RESV_DEL_HOLD": "SCHEDULED",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "SUSPENDED": "RUNNING", "RESIZING": "RUNNING",
    "STAGE_OUT": "RUNNING", "SIGNALING": "RUNNING", "STOPPED": "RUNNING",
    "COMPLETED": "FINISHED",
    "CANCELLED": "KILLED", "PREEMPTED": "KILLED", "REVOKED": "KILLED",
    "FAILED": "FAILED", "TIMEOUT": "FAILED", "NODE_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED",
    "BOOT_FAIL": "FAILED", "DEADLINE": "FAILED", "SPECIAL_EXIT": "FAILED",
}
TERMINAL = {state for state, status in MLFLOW_STATUS.items() if status in ENDED}
# Keys MLflow itself puts into every backend config.
_MLFLOW_KEYS = {PROJECT_ENV_MANAGER, PROJECT_SYNCHRONOUS, PROJECT_DOCKER_ARGS, PROJECT_STORAGE_DIR,
                PROJECT_BUILD_IMAGE, PROJECT_DOCKER_AUTH}
# ASCII digits only: Python's \d also matches other scripts' digits, which Slurm reads as garbage.
_TIME = re.compile(r"([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){0,2}|[0-9]+")
_MEM = re.compile(r"[0-9]+[KMGT]?")


class SlurmError(ExecutionException):
    """A job that cannot be submitted or queried, with Slurm's own words."""


@dataclass(frozen=True)
class SlurmConfig:
    """The ``--backend-config`` JSON. Resources apply to the training entry points
    (``distributed_entry_points``); the others run as one task on one node."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    # Processes per node: 0 means one per GPU, or one on CPU-only nodes (where they use gloo).
    tasks_per_node: int = 0
    cpus_per_task: int = 4
    mem: str = ""  # per node, e.g. "64G"; "" is the partition's default
    time: str = ""  # Slurm's formats, e.g. "04:00:00" or "2-00:00:00"; "" is the partition's limit
    # The time-limit warning: this many seconds before the limit the job checkpoints and requeues.
    signal_before_limit_s: int = 300
    sbatch_lines: list[str] = field(default_factory=list)  # extra options, e.g. "--constraint=a100"
    # Shell lines before the launch; default: activate the Python environment that submits.
    setup: list[str] | None = None
    log_dir: str = "slurm-logs"  # relative to the project; must be on storage every node sees
    distributed_entry_points: list[str] = field(default_factory=lambda: ["pretrain", "distill"])
    poll_s: float = 10.0
    # `mlflow run` returns once the job is queued; true waits for it to end (and fails if it fails).
    wait: bool = False
    run_id: str = ""  # continue this MLflow run instead of creating one (the portal's jobs)

    @classmethod
    def from_dict(cls, raw: dict) -> "SlurmConfig":
        """Validated; every problem names its key."""
        raw = {k: v for k, v in raw.items() if k not in _MLFLOW_KEYS}
        known = {f.name: f for f in dataclasses.fields(cls)}
        errors, valid = [], {}
        for key, value in raw.items():
            declared = str(known[key].type) if key in known else ""
            kind = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(declared)
            if key not in known:
                errors.append(f"{key}: unknown key (expected one of {sorted(known)})")
            elif kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                errors.append(f"{key}: expected {declared}, got {value!r}")
            elif declared.startswith("list") and not (value is None and "None" in declared) and not (
                    isinstance(value, list) and all(isinstance(v, str) and "\n" not in v for v in value)):
                errors.append(f"{key}: expected a list of one-line strings, got {value!r}")
            else:
                valid[key] = value
        config = cls(**valid)
        for key in ("nodes", "cpus_per_task"):
            if getattr(config, key) < 1:
                errors.append(f"{key}: expected at least 1, got {getattr(config, key)}")
        for key in ("gpus_per_node", "tasks_per_node", "signal_before_limit_s"):
            if getattr(config, key) < 0:
                errors.append(f"{key}: expected 0 or more, got {getattr(config, key)}")
        if config.time and not _TIME.fullmatch(config.time):
            errors.append(f"time: expected a Slurm time such as 04:00:00 or 2-00:00:00, got {config.time!r}")
        if config.mem and not _MEM.fullmatch(config.mem):
            errors.append(f"mem: expected a size such as 64G, got {config.mem!r}")
        for key in ("partition", "account", "qos", "run_id"):
            if not re.fullmatch(r"[A-Za-z0-9_.,-]*", getattr(config, key)):
                errors.append(f"{key}: expected letters, digits, '.', ',', '-' or '_', got {getattr(config, key)!r}")
        if config.poll_s <= 0:
            errors.append(f"poll_s: expected a positive number, got {config.poll_s}")
        if errors:
            raise SlurmError("backend config: " + "; ".join(errors))
        return config

    @property
    def processes_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


def default_setup() -> list[str]:
    """Activate the virtual environment this process runs in, when it runs in one."""
    if sys.prefix != sys.base_prefix:
        return [f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"]
    return []


def absolute_tracking_uri(uri: str, cwd: Path) -> str:
    """A relative SQLite or file store resolves against the submitting directory, not the job's."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((cwd / uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri and not Path(uri).is_absolute():
        return str((cwd / uri).resolve())
    return uri


def batch_script(config: SlurmConfig, command: str, env: dict[str, str], work_dir: Path, job_name: str,
                 distributed: bool, array: int = 0, after: str = "") -> str:
    """The sbatch script of one MLflow run: resources, the environment, one task per process.
    ``array``: so many copies of it (a cohort's inputs), each told its index; ``after``: a job it
    waits for, whatever its end (a cohort's gather job waits for its array)."""
    nodes, tasks = (config.nodes, config.processes_per_node) if distributed else (1, 1)
    log_dir = work_dir / config.log_dir
    options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
               f"--cpus-per-task={config.cpus_per_task}", f"--output={log_dir}/{'%A_%a' if array else '%j'}.out",
               f"--chdir={work_dir}", "--open-mode=append", "--requeue"]
    options += [f"--array=0-{array - 1}"] if array else []
    options += [f"--dependency=afterany:{after}"] if after else []
    if config.gpus_per_node and distributed:
        options.append(f"--gpus-per-node={config.gpus_per_node}")
    options += [f"--{key}={getattr(config, key)}" for key in ("partition", "account", "qos", "mem", "time")
                if getattr(config, key)]
    if distributed and config.signal_before_limit_s:
        # To the tasks, not the batch shell: the training processes checkpoint themselves.
        options.append(f"--signal=USR1@{config.signal_before_limit_s}")
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options + config.sbatch_lines), "",
             *(default_setup() if config.setup is None else config.setup)]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    lines += [
        f"export VF_COMMAND={shlex.quote(command)}",
        "# torch.distributed rendezvous from the allocation: the first node hosts it.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}  # each process its own cores, not all of them",
        'echo "vision-foundry: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $VF_COMMAND"',
        "# The run's status as the job ends, whoever ends it: the job itself, or Slurm (scancel,",
        "# preemption, requeue), whose SIGTERM reaches this shell once srun is done.",
        f"trap 'python -m projects.slurm settle --terminated {log_dir}/$SLURM_JOB_ID.out; exit 143' TERM",
        "# Ranks end together (they wait for rank 0); one that ends alone has crashed, and the others,",
        "# stuck in a collective, are ended 5 minutes later.",
        "srun --kill-on-bad-exit=0 --wait=300 bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS "
        "LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; eval exec \"$VF_COMMAND\"'",
        "status=$?",
        "trap - TERM",
        f"python -m projects.slurm settle --exit-code $status {log_dir}/$SLURM_JOB_ID.out",
        f"if [ $status -eq {REQUEUE_EXIT_CODE} ]; then",
        '  echo "vision-foundry: checkpoint written before the time limit; requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $status",
        "",
    ]
    return "\n".join(lines)


def _slurm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]}: not found; the slurm backend needs the Slurm client commands on PATH") from None
    if check and result.returncode != 0:
        raise SlurmError(f"{' '.join(args[:2])}: {(result.stderr or result.stdout).strip()}")
    return result


def job_state(job_id: str) -> str | None:
    """The job's state from the controller, then from accounting once the controller forgot it;
    None when neither knows the job."""
    live = _slurm("scontrol", "show", "job", "--oneliner", job_id, check=False)
    if live.returncode == 0:
        match = re.search(r"\bJobState=(\S+)", live.stdout)
        if match:
            return match.group(1)
    past = _slurm("sacct", "--jobs", job_id, "--allocations", "--noheader", "--parsable2", "--format=State",
                  check=False)
    if past.returncode == 0 and past.stdout.strip():
        return past.stdout.strip().splitlines()[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return None


def job_script_ended(run_id: str, job_id: str, exit_code: int | None, log_path: Path, service: MlflowService) -> Outcome:
    """The job script's epilogue: end (or requeue) the MLflow run as its job ends; ``exit_code``
    None: Slurm ended the job.

    The training process ends its own run (FINISHED, or KILLED/SCHEDULED when stopped by a signal);
    this fills in what it could not know: that a stopped job was requeued, and the status of entry
    points that never end their run themselves."""
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        # A task of a cohort's array runs in a child run its process ends; the cohort's run is
        # its gather job's to end.
        return Outcome.FINISHED if exit_code == 0 else Outcome.FAILED
    if exit_code is None:
        requeued = MLFLOW_STATUS.get(job_state(job_id) or "") == Outcome.REQUEUED.status
        outcome = Outcome.REQUEUED if requeued else Outcome.KILLED
    elif exit_code == REQUEUE_EXIT_CODE:
        outcome = Outcome.REQUEUED
    else:
        outcome = Outcome.FINISHED if exit_code == 0 else Outcome.FAILED
    # A run its process ended KILLED may yet be requeued by Slurm (a preemption): Slurm knows better.
    service.finish(run_id, outcome, f"the job's script exited with {exit_code}" if outcome is Outcome.FAILED else "",
                   also_ended=(Outcome.KILLED.status,))
    if outcome is Outcome.REQUEUED:
        service.client.set_tag(run_id, Tag.SLURM_STATE, "REQUEUED")
    if log_path.is_file():
        service.client.log_artifact(run_id, str(log_path), "slurm")
    return outcome


class SlurmSubmittedRun(SubmittedRun):
    """One sbatch job of one MLflow run; rebuilt from the two ids after a restart."""

    def __init__(self, run_id: str, job_id: str, poll_s: float = 10.0, log_path: str | None = None,
                 tracking_uri: str | None = None):
        super().__init__()
        self._run_id, self.job_id, self.poll_s, self.log_path = run_id, job_id, poll_s, log_path
        self.service = MlflowService(tracking_uri)
        self.client = self.service.client
        self.state: str | None = None
        self.script_path: str | None = None

    @property
    def run_id(self) -> str:
        return self._run_id

    def get_status(self) -> str:
        state = job_state(self.job_id)
        client = self.client
        run = client.get_run(self.run_id)
        if state is None:  # purged from the controller and no accounting: the run's own word
            status = run.info.status if run.info.status in ENDED else Outcome.FAILED.status
            self._job_ended(status, "unknown to Slurm")
            return status
        if state != self.state:
            client.set_tag(self.run_id, Tag.SLURM_STATE, state)
            self.state = state
        status = MLFLOW_STATUS.get(state, "RUNNING")
        if state in TERMINAL:
            self._job_ended(status, state)
        elif status == Outcome.REQUEUED.status:  # waiting in the queue (again, once requeued)
            self.service.finish(self.run_id, Outcome.REQUEUED, also_ended=(Outcome.KILLED.status,))
        return status

    def wait(self) -> bool:
        while (status := self.get_status()) not in ENDED:
            time.sleep(self.poll_s)
        return status == Outcome.FINISHED.status

    def cancel(self, wait: bool = True) -> None:
        array = self.client.get_run(self.run_id).data.tags.get(Tag.SLURM_ARRAY_JOB_ID)
        _slurm("scancel", *([array] if array else []), self.job_id)
        while wait and self.get_status() not in ENDED:
            time.sleep(min(self.poll_s, 1.0))

    def _job_ended(self, status: str, why: str) -> None:
        """End the MLflow run as the job ended, unless its process already did (it knows better:
        a job that completes after a failed entry point has a FAILED run)."""
        outcome = Outcome[next(o.name for o in Outcome if o.status == status)]
        if self.service.finish(self.run_id, outcome, f"Slurm job {self.job_id} ended {why}"):
            self.client.set_tag(self.run_id, Tag.SLURM_ENDED, why)
            if self.log_path and Path(self.log_path).is_file():
                self.client.log_artifact(self.run_id, self.log_path, "slurm")


def _submit(script: Path) -> str:
    return _slurm("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]


def cohort_size(entry_point: str, params: dict) -> int:
    """How many inputs a ``predict`` run's ``input`` names (a cohort is a job array)."""
    if entry_point != "predict" or not params.get("input"):
        return 1
    from data.sources import cohort

    return len(cohort(str(params["input"])))


class SlurmBackend(AbstractBackend):
    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        env_manager = backend_config.get(PROJECT_ENV_MANAGER)
        if env_manager not in (None, "local"):
            raise SlurmError(f"--env-manager {env_manager}: the slurm backend runs in the environment its backend "
                             "config's `setup` lines activate; use --env-manager local")
        config = SlurmConfig.from_dict(backend_config)
        work_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params)).resolve()
        project = load_project(str(work_dir))
        service = MlflowService(tracking_uri)
        client = service.client
        run = (client.get_run(config.run_id) if config.run_id else
               get_or_create_run(None, project_uri, experiment_id, str(work_dir), version, entry_point, params))
        run_id = run.info.run_id
        try:
            command = project.get_entry_point(entry_point).compute_command(params, backend_config.get(PROJECT_STORAGE_DIR))
            env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": str(run.info.experiment_id),
                   "MLFLOW_TRACKING_URI": absolute_tracking_uri(tracking_uri, Path.cwd())}
            name, distributed = f"vf-{entry_point}-{run_id[:8]}", entry_point in config.distributed_entry_points
            log_dir = work_dir / config.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
            array = cohort_size(entry_point, params)
            if array > 1:
                # One task per input of a cohort, then one job that gathers them into the run.
                tasks_path = log_dir / f"{run_id}.array.sbatch"
                tasks_path.write_text(batch_script(config, command, env, work_dir, name, False, array=array))
                array_id = _submit(tasks_path)
                client.set_tag(run_id, Tag.SLURM_ARRAY_JOB_ID, array_id)
                client.log_artifact(run_id, str(tasks_path), "slurm")
                command, after = f"{command} --gather", array_id
            else:
                after = ""
            script_path = log_dir / f"{run_id}.sbatch"
            script_path.write_text(batch_script(config, command, env, work_dir, name, distributed, after=after))
            job_id = _submit(script_path)
        except Exception as exc:
            # A job that never started must not leave a RUNNING run behind.
            service.finish(run_id, Outcome.FAILED, str(exc))
            raise
        client.set_tag(run_id, Tag.SLURM_JOB_ID, job_id)
        client.set_tag(run_id, Tag.SLURM_STATE, "PENDING")
        service.finish(run_id, Outcome.REQUEUED)  # waiting in Slurm's queue
        client.log_artifact(run_id, str(script_path), "slurm")
        log.info("=== Submitted run %s as Slurm job %s ===", run_id, job_id)
        submitted = SlurmSubmittedRun(run_id, job_id, config.poll_s, str(log_dir / f"{job_id}.out"), tracking_uri)
        submitted.script_path = str(script_path)
        if config.wait and not submitted.wait():
            raise SlurmError(f"Slurm job {job_id} of run {run_id} ended {submitted.state}; its log: {submitted.log_path}")
        return submitted


def main(argv: list[str] | None = None) -> int:
    """The job script's epilogue: ``python -m projects.slurm settle (--exit-code N | --terminated) LOG``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ending = sub.add_parser("settle")
    how = ending.add_mutually_exclusive_group(required=True)
    how.add_argument("--exit-code", type=int)
    how.add_argument("--terminated", action="store_true")
    ending.add_argument("log", type=Path)
    args = parser.parse_args(argv)
    try:
        outcome = job_script_ended(os.environ["MLFLOW_RUN_ID"], os.environ["SLURM_JOB_ID"], args.exit_code, args.log,
                                   MlflowService())
    except Exception as exc:  # the job's own exit status stands; say why the run could not follow
        print(f"vision-foundry: could not settle MLflow run {os.environ.get('MLFLOW_RUN_ID')}: {exc}", file=sys.stderr)
        return 1
    print(f"vision-foundry: MLflow run {os.environ['MLFLOW_RUN_ID']} {outcome.status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
