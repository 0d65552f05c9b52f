"""Training jobs: a validated form queued for the job runner, followed through MLflow and the scheduler."""
from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, abort, current_app, request, url_for
from flask_login import current_user, login_required

from portal.access import BadPath, claim_family, object_key, visible_datasets
from portal.db import Job, db
from portal.jobs import (
    ACTIVE,
    TASKS,
    FormErrors,
    PredictRequest,
    ProbeRequest,
    TrainingRequest,
    request_from_form,
    submit,
    training_configs,
)
from portal.web import ID, answer, audit, dataset_for, mlflow, payload, refuse, settings
from registry.lineage import BadModelReference, RegistryError, equals, resolve_version
from registry.mlflow_service import Tag, ui_link

bp = Blueprint("jobs", __name__)
LIVE_METRICS = ("total_loss", "knn_top1", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "distill_loss",
                "lr")


def _view(job: Job) -> dict:
    return {"id": job.id, "owner": job.owner, "dataset": job.dataset.name, "entry_point": job.entry_point,
            "status": job.status, "parameters": job.parameters, "command": job.command,
            "mlflow_run_id": job.mlflow_run_id, "exit_code": job.exit_code, "backend": job.backend,
            "scheduler_id": job.scheduler_id, "scheduler_state": job.scheduler_state,
            "mlflow_url": (ui_link(settings().mlflow_ui_url, f"experiments/{job.experiment_id}/runs/{job.mlflow_run_id}")
                           if job.mlflow_run_id else None),
            "created_at": job.created_at.isoformat(), "log_tail": job.log_tail}


def _own(job_id: int) -> Job:
    job = db.session.get(Job, job_id)
    if job is None or (job.owner != current_user.username and not current_user.is_admin):
        abort(404)
    return job


def _in_registry(family: str) -> bool:
    client = mlflow().client
    return any(client.search_registered_models(equals("name", f"{family}-{kind}")) for kind in ("backbone", "head"))


@bp.route("/jobs/new", methods=["GET", "POST"])
@bp.post("/api/jobs", endpoint="api_submit")
@login_required
def new_job():
    config = settings()
    # Training, heads and evaluate need a built dataset; predict reads the raw objects under its prefix.
    form = {"datasets": list(visible_datasets(current_user)),
            "configs": training_configs(config.project_dir), "backend": config.job_backend, "tasks": TASKS}
    if request.method == "GET":
        return answer({}, "new_job.html", errors={}, form={}, **form)
    data = payload()
    try:
        job_request = request_from_form(data, config.project_dir, config.job_backend)
        dataset = dataset_for(job_request.dataset_id, "read")
        if isinstance(job_request, PredictRequest):
            job_request = replace(job_request, input=f"s3://{config.bucket}/{object_key(dataset, job_request.path)}")
            try:
                resolve_version(mlflow().client, job_request.head)
            except RegistryError as exc:
                raise FormErrors({"head": str(exc)}) from None
        elif not dataset.train_path:
            raise BadPath(f"dataset {dataset.name} has no built training data (train_path) yet")
        for teacher in job_request.teachers.split(",") if isinstance(job_request, TrainingRequest) else ():
            if teacher.startswith("models:/"):  # a job that would fail when it runs fails now
                try:
                    resolve_version(mlflow().client, teacher)
                except (RegistryError, BadModelReference) as exc:
                    raise FormErrors({"teachers": str(exc)}) from None
        if isinstance(job_request, ProbeRequest):
            job_request.splits(dataset)
            try:
                resolve_version(mlflow().client, job_request.backbone)
            except RegistryError as exc:
                raise FormErrors({"backbone": str(exc)}) from None
    except FormErrors as exc:
        audit("job.submit", "", outcome="refused", errors=exc.errors)
        return answer({"error": str(exc), "errors": exc.errors}, "new_job.html", 400, errors=exc.errors, form=data, **form)
    # Heads, evaluate and predict write into the model's family (a head, evaluation tags, prediction
    # runs in its experiment): its members only.
    claim_family(current_user, job_request.name,
                 registered=isinstance(job_request, (ProbeRequest, PredictRequest)) or _in_registry(job_request.name))
    job = submit(job_request, dataset, current_user.username)
    audit("job.submit", f"job {job.id}", dataset=dataset.name, parameters=job_request.to_dict())
    return answer(_view(job), status=201, to=url_for("jobs.job_page", job_id=job.id))


@bp.get("/jobs")
@bp.get("/api/jobs", endpoint="api_jobs")
@login_required
def jobs():
    query = db.select(Job).order_by(Job.id.desc())
    if not current_user.is_admin:
        query = query.where(Job.owner == current_user.username)
    rows = db.session.scalars(query).all()
    return answer([_view(j) for j in rows], "jobs.html", jobs=rows)


@bp.get(f"/jobs/<{ID}:job_id>")
@login_required
def job_page(job_id: int):
    job = _own(job_id)
    return answer({}, "job.html", job=job, view=_view(job), outcome=_outcome(job))


def _outcome(job: Job) -> dict:
    """What a person wants to know of the job's run: ``state`` (a finished training that did not
    learn says so), the learning verdict, and the progress while it runs (a stopped job has no ETA)."""
    tags = mlflow().client.get_run(job.mlflow_run_id).data.tags if job.mlflow_run_id else {}
    learned = tags.get(Tag.LEARNED)
    return {"state": "finished, did not learn" if job.status == "finished" and learned == "false" else job.status,
            "learned": learned, "learning": tags.get(Tag.LEARNING),
            "progress": tags.get(Tag.PROGRESS) if job.status in ACTIVE else None}


NO_RUNNER = "this portal process runs no jobs (PORTAL_RUN_JOBS=0)"


def _refused(job: Job, action: str, problem: str):
    """A job action refused: a 409 that says why, and its audit row."""
    audit(f"job.{action}", f"job {job.id}", outcome="refused", status=job.status, reason=problem)
    return refuse(problem, 409)


@bp.post(f"/jobs/<{ID}:job_id>/cancel")
@bp.post(f"/api/jobs/<{ID}:job_id>/cancel", endpoint="api_cancel")
@login_required
def cancel_job(job_id: int):
    job, runner = _own(job_id), current_app.extensions.get("vf.jobs")
    if runner is None:
        return _refused(job, "cancel", NO_RUNNER)
    if job.status not in ("queued", *ACTIVE):
        return _refused(job, "cancel", f"job {job.id} is {job.status}")
    runner.cancel(job)
    audit("job.cancel", f"job {job.id}", backend=job.backend, scheduler_id=job.scheduler_id)
    return answer(_view(job), to=url_for("jobs.job_page", job_id=job.id))


@bp.post(f"/jobs/<{ID}:job_id>/resume")
@bp.post(f"/api/jobs/<{ID}:job_id>/resume", endpoint="api_resume")
@login_required
def resume_job(job_id: int):
    """A cancelled or failed training goes on from its last checkpoint, in the same MLflow run."""
    job, runner = _own(job_id), current_app.extensions.get("vf.jobs")
    if runner is None:
        return _refused(job, "resume", NO_RUNNER)
    if job.status not in ("cancelled", "failed"):
        return _refused(job, "resume", f"job {job.id} is {job.status}; only a cancelled or failed job resumes")
    checkpoint = mlflow().client.get_run(job.mlflow_run_id).data.tags.get(Tag.CHECKPOINT) if job.mlflow_run_id else None
    if not checkpoint:
        return _refused(job, "resume", f"job {job.id} left no checkpoint to resume from")
    runner.resume(job)
    audit("job.resume", f"job {job.id}", run=job.mlflow_run_id, checkpoint=checkpoint)
    return answer(_view(job), to=url_for("jobs.job_page", job_id=job.id))


@bp.get(f"/api/jobs/<{ID}:job_id>")
@login_required
def api_job(job_id: int):
    """The job and the live metrics of its MLflow run (full history per metric)."""
    job = _own(job_id)
    metrics = {}
    if job.mlflow_run_id:
        client = mlflow().client
        for key in LIVE_METRICS:
            history = client.get_metric_history(job.mlflow_run_id, key)
            if history:
                metrics[key] = [[m.step, m.value] for m in sorted(history, key=lambda m: m.step)]
    return answer(_view(job) | {"metrics": metrics} | _outcome(job))
