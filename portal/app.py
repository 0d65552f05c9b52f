"""The Vision Foundry portal: server-rendered pages and a JSON API over the same actions.

    python -m portal create-user ana --admin       # first user
    python -m portal serve --port 8080             # or: flask --app portal.app run

Settings come from the environment (see ``Settings``): the database (any SQLAlchemy URL, SQLite by
default), the S3 bucket and endpoint of the datasets, the MLflow tracking URI and UI address,
and, optionally, an OpenID Connect provider for institutional sign-in.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from functools import wraps
from urllib.parse import urlsplit
from pathlib import Path

from flask import Flask, abort, flash, g, jsonify, redirect, render_template, request, session, url_for
from flask_login import LoginManager, current_user, login_required, login_user, logout_user
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from portal.access import (
    AccessDenied,
    BadPath,
    claim_family,
    clean_prefix,
    family_of,
    level_of,
    may_use_family,
    object_key,
    require,
    visible_datasets,
)
from portal.db import LEVELS, AuditEvent, Dataset, Grant, Group, Job, ModelFamily, User, add_missing_columns, db
from portal.jobs import ACTIVE, FormErrors, JobRunner, TrainingRequest, make_launcher, submit, training_configs
from portal.storage import Storage
from portal.throttle import Throttle
from dinomx.errors import UserError
from registry.lineage import equals, format_chain, lineage_chain
from registry.promote import LOCK_PREFIX, PromotionRefused, audit_trail, promote, rollback

PROJECT = Path(__file__).resolve().parents[1]
# Row ids in URLs: larger numbers are no row (and overflow the database's integer).
ID = "int(max=2147483647)"
LIVE_METRICS = ("total_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "distill_loss", "lr")


@dataclass
class Settings:
    database_url: str = field(default_factory=lambda: os.environ.get("PORTAL_DATABASE_URL", f"sqlite:///{PROJECT / 'portal.db'}"))
    secret_key: str = field(default_factory=lambda: os.environ.get("PORTAL_SECRET_KEY", ""))
    bucket: str = field(default_factory=lambda: os.environ.get("PORTAL_S3_BUCKET", "vision-foundry"))
    s3_endpoint_url: str | None = field(default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL"))
    presign_expires_s: int = field(default_factory=lambda: int(os.environ.get("PORTAL_PRESIGN_EXPIRES_S", "900")))
    tracking_uri: str = field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}"))
    mlflow_ui_url: str = field(default_factory=lambda: os.environ.get("PORTAL_MLFLOW_UI_URL", "http://localhost:5000"))
    project_dir: Path = field(default_factory=lambda: Path(os.environ.get("PORTAL_PROJECT_DIR", PROJECT)))
    run_jobs: bool = field(default_factory=lambda: os.environ.get("PORTAL_RUN_JOBS", "1") == "1")
    job_slots: int = field(default_factory=lambda: int(os.environ.get("PORTAL_JOB_SLOTS", "1")))
    # Where jobs run: "local" (this machine) or "slurm" (sbatch, with the site's backend config JSON:
    # partition, account, set-up lines; the job form adds nodes, GPUs and the time limit).
    job_backend: str = field(default_factory=lambda: os.environ.get("PORTAL_JOB_BACKEND", "local"))
    slurm_config: str | None = field(default_factory=lambda: os.environ.get("PORTAL_SLURM_CONFIG"))
    job_log_dir: Path = field(default_factory=lambda: Path(os.environ.get("PORTAL_JOB_LOG_DIR", PROJECT / "portal-jobs")))
    # Institutional sign-in (OpenID Connect); local users only when no issuer is set.
    oidc_metadata_url: str | None = field(default_factory=lambda: os.environ.get("PORTAL_OIDC_METADATA_URL"))
    oidc_client_id: str | None = field(default_factory=lambda: os.environ.get("PORTAL_OIDC_CLIENT_ID"))
    oidc_client_secret: str | None = field(default_factory=lambda: os.environ.get("PORTAL_OIDC_CLIENT_SECRET"))
    # Session cookies only over HTTPS (off only for plain-HTTP development; always off in debug).
    secure_cookies: bool = field(default_factory=lambda: os.environ.get("PORTAL_SECURE_COOKIES", "1") != "0")
    # Reverse proxies in front of the portal whose X-Forwarded-For/-Proto to trust (0: none), so that
    # the client address (sign-in throttling, audit) and the https scheme are the real ones.
    proxy_hops: int = field(default_factory=lambda: int(os.environ.get("PORTAL_PROXY_HOPS", "0")))
    throttle: Throttle = field(default_factory=Throttle)


def audit(action: str, target: str = "", outcome: str = "ok", user: str | None = None, **detail) -> None:
    who = user or (current_user.username if current_user and current_user.is_authenticated else "anonymous")
    db.session.rollback()  # a refusal may come from inside a failed transaction
    db.session.add(AuditEvent(user=who, action=action, target=target[:512], outcome=outcome, detail=detail))
    db.session.commit()
    if outcome != "ok":
        g.refusal_audited = True


def text(data: dict, name: str, default: str = "") -> str:
    """A text field of a form or JSON body; a number, list or object there is the client's error."""
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadPath(f"{name}: expected a string, got {type(value).__name__}")
    return value


def same_origin_path(target: str) -> str | None:
    """``target`` when it is a plain path on this site, else None. Browsers drop tabs and newlines
    and read a backslash as a slash, so "/<tab>/evil.example" and "/<backslash>evil.example" lead
    off-site."""
    if not target.startswith("/") or any(c.isspace() or c == "\\" or ord(c) < 32 for c in target):
        return None
    parts = urlsplit(target)
    return target if not (parts.scheme or parts.netloc or target.startswith("//")) else None


def wants_json() -> bool:
    return request.path.startswith("/api/")


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings()
    app = Flask(__name__)
    if settings.proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    if not settings.secret_key:
        app.logger.warning("PORTAL_SECRET_KEY is not set: a random key is used, so sign-ins end with this "
                           "process and do not carry across workers")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SECRET_KEY=settings.secret_key or secrets.token_hex(32),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies and not app.debug,
        REMEMBER_COOKIE_SECURE=settings.secure_cookies and not app.debug,
    )
    if not settings.secure_cookies:
        app.logger.warning("PORTAL_SECURE_COOKIES=0: session cookies also travel over plain HTTP")
    app.extensions["vf.settings"] = settings
    storage = Storage(settings.bucket, settings.s3_endpoint_url, expires_s=settings.presign_expires_s)
    db.init_app(app)
    with app.app_context():
        db.create_all()
        add_missing_columns()
    login = LoginManager(app)
    login.login_view = "login"
    login.user_loader(lambda user_id: db.session.get(User, int(user_id)))
    oauth = _oidc(app, settings)

    @login.unauthorized_handler
    def unauthorized():
        if wants_json():
            return jsonify(error="sign in first"), 401
        return redirect(url_for("login", next=request.path))

    @app.before_request
    def csrf():
        """Forms carry the session's token; the API takes JSON only, which a cross-site form cannot send."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        if wants_json():
            # Browsers send cross-site DELETE only after a CORS preflight this app never answers.
            if request.method != "DELETE" and not request.is_json:
                return jsonify(error="send application/json"), 415
        else:
            # No session token (a cross-site post, the login form included) is a refusal too.
            token = session.get("csrf_token")
            if not token or not secrets.compare_digest(request.form.get("csrf_token", ""), token):
                abort(400, "form expired; reload the page")

    @app.context_processor
    def template_globals():
        session.setdefault("csrf_token", secrets.token_hex(16))
        return {"csrf_token": session["csrf_token"], "sso": oauth is not None, "levels": LEVELS}

    @app.errorhandler(AccessDenied)
    def denied(exc):
        audit("access", request.path, outcome="denied", reason=str(exc))
        return (jsonify(error=str(exc)), 403) if wants_json() else (render_template("error.html", message=str(exc)), 403)

    @app.errorhandler(BadPath)
    @app.errorhandler(PromotionRefused)
    @app.errorhandler(FormErrors)
    def bad_request(exc):
        body = {"error": str(exc)} | ({"errors": exc.errors} if isinstance(exc, FormErrors) else {})
        if isinstance(exc, PromotionRefused):
            body["gate"] = exc.gate
        audit_refusal(400, str(exc))
        return (jsonify(body), 400) if wants_json() else (render_template("error.html", message=str(exc)), 400)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """The API answers JSON for every error (404s included); refused actions are audited."""
        if exc.code and exc.code >= 400:
            audit_refusal(exc.code, exc.description or exc.name)
        if not wants_json():
            return exc
        return jsonify(error=exc.description or exc.name), exc.code

    def audit_refusal(status: int, reason: str) -> None:
        """An action (anything but a read) refused and not yet audited by its view."""
        if request.method not in ("GET", "HEAD", "OPTIONS") and not g.get("refusal_audited"):
            audit(request.endpoint or "request", request.path, outcome="refused", status=status, reason=reason[:500])

    def dataset_for(dataset_id: int, level: str) -> Dataset:
        dataset = db.session.get(Dataset, dataset_id)
        # Datasets a user holds nothing on do not exist for them.
        if dataset is None or level_of(current_user, dataset) is None:
            abort(404)
        require(current_user, dataset, level)
        return dataset

    def admin_only(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            if not current_user.is_admin:
                raise AccessDenied(f"{current_user.username} is not an administrator")
            return view(*args, **kwargs)
        return login_required(wrapped)

    def payload() -> dict:
        if not wants_json():
            return request.form.to_dict()
        data = request.get_json(silent=True)
        if data is None and request.content_length:
            raise BadPath("body: not valid JSON")
        if not isinstance(data, (dict, type(None))):
            raise BadPath(f"body: expected a JSON object, got {type(data).__name__}")
        return data or {}

    # -- sign-in ---------------------------------------------------------------------------
    def sign_in(user: User, method: str):
        login_user(user)
        session["csrf_token"] = secrets.token_hex(16)
        audit("login", user.username, user=user.username, method=method)

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "GET":
            return render_template("login.html")
        data = payload()
        username, password = text(data, "username")[:64], text(data, "password")
        address = request.remote_addr or "unknown"
        wait = settings.throttle.retry_after(username, address)
        if wait:
            audit("login", username, outcome="throttled", user=username or "anonymous", address=address, retry_after=wait)
            message = f"too many failed sign-ins; try again in {wait} s"
            if wants_json():
                return jsonify(error=message), 429, {"Retry-After": str(wait)}
            flash(message[0].upper() + message[1:] + ".")
            return render_template("login.html"), 429, {"Retry-After": str(wait)}
        user = db.session.scalar(db.select(User).where(User.username == username))
        if user is None or not user.check_password(password):
            settings.throttle.failed(username, address)
            audit("login", username, outcome="denied", user=username or "anonymous", address=address)
            if wants_json():
                return jsonify(error="unknown user or wrong password"), 401
            flash("Unknown user or wrong password.")
            return render_template("login.html"), 401
        settings.throttle.succeeded(username)
        sign_in(user, "password")
        if wants_json():
            return jsonify(user=user.username, admin=user.is_admin)
        return redirect(same_origin_path(request.args.get("next", "")) or url_for("datasets"))

    app.add_url_rule("/api/login", "api_login", login, methods=["POST"])

    @app.route("/login/sso")
    def login_sso():
        if oauth is None:
            abort(404)
        return oauth.sso.authorize_redirect(url_for("sso_callback", _external=True))

    @app.route("/auth/callback")
    def sso_callback():
        if oauth is None:
            abort(404)
        info = oauth.sso.authorize_access_token().get("userinfo") or {}
        username = info.get("preferred_username") or info.get("email")
        if not username:
            abort(400, "the identity provider sent no preferred_username or email")
        user = db.session.scalar(db.select(User).where(User.username == username))
        if user is None:  # first SSO sign-in: an account with no grants (least privilege)
            user = User(username=username)
            db.session.add(user)
            db.session.commit()
        sign_in(user, "oidc")
        return redirect(url_for("datasets"))

    @app.post("/logout")
    @login_required
    def logout():
        audit("logout", current_user.username)
        logout_user()
        return redirect(url_for("login"))

    @app.get("/")
    def index():
        return redirect(url_for("datasets"))

    # -- datasets ---------------------------------------------------------------------------
    @app.route("/datasets", methods=["GET", "POST"])
    @app.route("/api/datasets", methods=["GET", "POST"], endpoint="api_datasets")
    @login_required
    def datasets():
        if request.method == "POST":
            if not current_user.is_admin:
                raise AccessDenied(f"{current_user.username} may not create datasets")
            data = payload()
            name = text(data, "name").strip()
            if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
                raise BadPath(f"name: expected 1 to 64 printable characters, got {name[:80]!r}")
            if db.session.scalar(db.select(Dataset).where(Dataset.name == name)):
                raise BadPath(f"name: {name!r} is taken")
            dataset = Dataset(name=name, prefix=clean_prefix(text(data, "prefix")), created_by=current_user.username,
                              train_path=text(data, "train_path")[:512] or None,
                              validation_report=text(data, "validation_report")[:512] or None)
            db.session.add(dataset)
            db.session.commit()
            audit("dataset.create", dataset.name, prefix=dataset.prefix)
            if wants_json():
                return jsonify(id=dataset.id, name=dataset.name, prefix=dataset.prefix), 201
            return redirect(url_for("dataset_page", dataset_id=dataset.id))
        rows = visible_datasets(current_user)
        if wants_json():
            return jsonify([{"id": d.id, "name": d.name, "prefix": d.prefix, "level": level} for d, level in rows])
        return render_template("datasets.html", rows=rows)

    @app.get(f"/datasets/<{ID}:dataset_id>")
    @login_required
    def dataset_page(dataset_id: int):
        dataset = dataset_for(dataset_id, "read")
        grants = db.session.scalars(db.select(Grant).where(Grant.dataset_id == dataset.id)).all()
        return render_template("dataset.html", dataset=dataset, level=level_of(current_user, dataset),
                               objects=storage.list(dataset.prefix), grants=grants)

    @app.get(f"/api/datasets/<{ID}:dataset_id>/objects")
    @login_required
    def api_objects(dataset_id: int):
        dataset = dataset_for(dataset_id, "read")
        return jsonify(storage.list(dataset.prefix))

    def presign(dataset_id: int, path: str, direction: str) -> dict:
        dataset = dataset_for(dataset_id, "write" if direction == "upload" else "read")
        key = object_key(dataset, path)
        url = storage.upload_url(key) if direction == "upload" else storage.download_url(key)
        audit(f"object.{direction}", f"s3://{storage.bucket}/{key}", dataset=dataset.name)
        return {"url": url, "method": "PUT" if direction == "upload" else "GET", "key": key,
                "expires_in": storage.expires_s}

    @app.post(f"/api/datasets/<{ID}:dataset_id>/upload-url")
    @login_required
    def api_upload_url(dataset_id: int):
        return jsonify(presign(dataset_id, text(payload(), "path"), "upload"))

    @app.post(f"/api/datasets/<{ID}:dataset_id>/download-url")
    @login_required
    def api_download_url(dataset_id: int):
        return jsonify(presign(dataset_id, text(payload(), "path"), "download"))

    @app.get(f"/datasets/<{ID}:dataset_id>/download")
    @login_required
    def download(dataset_id: int):
        # A redirect to S3: the browser fetches the bytes, the portal never streams them.
        return redirect(presign(dataset_id, request.args.get("path", ""), "download")["url"])

    @app.route(f"/datasets/<{ID}:dataset_id>/grants", methods=["POST"])
    @app.route(f"/api/datasets/<{ID}:dataset_id>/grants", methods=["GET", "POST"], endpoint="api_grants")
    @login_required
    def grants(dataset_id: int):
        dataset = dataset_for(dataset_id, "manage")
        if request.method == "GET":
            rows = db.session.scalars(db.select(Grant).where(Grant.dataset_id == dataset.id)).all()
            return jsonify([{"id": g.id, "user": g.user.username if g.user else None,
                             "group": g.group.name if g.group else None, "level": g.level} for g in rows])
        data = payload()
        level, user_name, group_name = text(data, "level"), text(data, "user"), text(data, "group")
        if level not in LEVELS:
            raise BadPath(f"level: expected one of {list(LEVELS)}, got {level[:20]!r}")
        user = db.session.scalar(db.select(User).where(User.username == user_name)) if user_name else None
        group = db.session.scalar(db.select(Group).where(Group.name == group_name)) if group_name else None
        if (user is None) == (group is None):
            raise BadPath("grant: name exactly one existing user or group")
        grant = db.session.scalar(db.select(Grant).where(
            Grant.dataset_id == dataset.id, Grant.user_id == (user.id if user else None),
            Grant.group_id == (group.id if group else None))) or Grant(dataset_id=dataset.id, user=user, group=group)
        grant.level = level
        db.session.add(grant)
        db.session.commit()
        audit("grant", dataset.name, principal=user.username if user else group.name, level=level)
        return (jsonify(id=grant.id, level=level), 201) if wants_json() else redirect(url_for("dataset_page", dataset_id=dataset.id))

    @app.route(f"/datasets/<{ID}:dataset_id>/grants/<{ID}:grant_id>/revoke", methods=["POST"])
    @app.route(f"/api/datasets/<{ID}:dataset_id>/grants/<{ID}:grant_id>", methods=["DELETE"], endpoint="api_revoke")
    @login_required
    def revoke(dataset_id: int, grant_id: int):
        dataset = dataset_for(dataset_id, "manage")
        grant = db.session.get(Grant, grant_id)
        if grant is None or grant.dataset_id != dataset.id:
            abort(404)
        principal = grant.user.username if grant.user else grant.group.name
        db.session.delete(grant)
        db.session.commit()
        audit("revoke", dataset.name, principal=principal, level=grant.level)
        return ("", 204) if wants_json() else redirect(url_for("dataset_page", dataset_id=dataset.id))

    # -- training jobs ------------------------------------------------------------------------
    def job_view(job: Job) -> dict:
        return {"id": job.id, "owner": job.owner, "dataset": job.dataset.name, "entry_point": job.entry_point,
                "status": job.status, "parameters": job.parameters, "command": job.command,
                "mlflow_run_id": job.mlflow_run_id, "exit_code": job.exit_code, "backend": job.backend,
                "scheduler_id": job.scheduler_id, "scheduler_state": job.scheduler_state,
                "mlflow_url": (f"{settings.mlflow_ui_url}/#/experiments/{job.experiment_id}/runs/{job.mlflow_run_id}"
                               if job.mlflow_run_id else None),
                "created_at": job.created_at.isoformat(), "log_tail": job.log_tail}

    def own_job(job_id: int) -> Job:
        job = db.session.get(Job, job_id)
        if job is None or (job.owner != current_user.username and not current_user.is_admin):
            abort(404)
        return job

    @app.route("/jobs/new", methods=["GET", "POST"])
    @app.post("/api/jobs", endpoint="api_submit")
    @login_required
    def new_job():
        choices = [(d, lvl) for d, lvl in visible_datasets(current_user) if d.train_path]
        configs = training_configs(settings.project_dir)
        if request.method == "GET":
            return render_template("new_job.html", datasets=choices, configs=configs, errors={}, form={},
                                   backend=settings.job_backend)
        data = payload()
        try:
            training = TrainingRequest.from_form(data, settings.project_dir, settings.job_backend)
        except FormErrors as exc:
            audit("job.submit", "", outcome="refused", errors=exc.errors)
            if wants_json():
                raise
            return render_template("new_job.html", datasets=choices, configs=configs, errors=exc.errors, form=data,
                                   backend=settings.job_backend), 400
        dataset = dataset_for(training.dataset_id, "read")
        if not dataset.train_path:
            raise BadPath(f"dataset {dataset.name} has no built training data (train_path) yet")
        claim_family(current_user, training.name, registered=in_registry(training.name))
        job = submit(training, dataset, current_user.username)
        audit("job.submit", f"job {job.id}", dataset=dataset.name, parameters=training.to_dict())
        return (jsonify(job_view(job)), 201) if wants_json() else redirect(url_for("job_page", job_id=job.id))

    @app.get("/jobs")
    @app.get("/api/jobs", endpoint="api_jobs")
    @login_required
    def jobs():
        query = db.select(Job).order_by(Job.id.desc())
        if not current_user.is_admin:
            query = query.where(Job.owner == current_user.username)
        rows = db.session.scalars(query).all()
        return jsonify([job_view(j) for j in rows]) if wants_json() else render_template("jobs.html", jobs=rows)

    @app.get(f"/jobs/<{ID}:job_id>")
    @login_required
    def job_page(job_id: int):
        job = own_job(job_id)
        return render_template("job.html", job=job, view=job_view(job))

    @app.post(f"/jobs/<{ID}:job_id>/cancel")
    @app.post(f"/api/jobs/<{ID}:job_id>/cancel", endpoint="api_cancel")
    @login_required
    def cancel_job(job_id: int):
        job = own_job(job_id)
        runner = app.extensions.get("vf.jobs")
        if job.status not in ("queued", *ACTIVE) or runner is None:
            audit("job.cancel", f"job {job.id}", outcome="refused", status=job.status)
            reason = f"job {job.id} is {job.status}" if runner else "this portal process runs no jobs (PORTAL_RUN_JOBS=0)"
            return (jsonify({"error": reason}), 409) if wants_json() else (render_template("error.html", message=reason), 409)
        runner.cancel(job)
        audit("job.cancel", f"job {job.id}", backend=job.backend, scheduler_id=job.scheduler_id)
        return jsonify(job_view(job)) if wants_json() else redirect(url_for("job_page", job_id=job.id))

    @app.get(f"/api/jobs/<{ID}:job_id>")
    @login_required
    def api_job(job_id: int):
        """The job and the live metrics of its MLflow run (full history per metric)."""
        job = own_job(job_id)
        metrics = {}
        if job.mlflow_run_id:
            client = MlflowClient(settings.tracking_uri)
            for key in LIVE_METRICS:
                history = client.get_metric_history(job.mlflow_run_id, key)
                if history:
                    metrics[key] = [[m.step, m.value] for m in sorted(history, key=lambda m: m.step)]
        return jsonify(job_view(job) | {"metrics": metrics})

    # -- registry -------------------------------------------------------------------------------
    def client() -> MlflowClient:
        return MlflowClient(settings.tracking_uri)

    def model_rows(name: str) -> list[dict]:
        # Search results leave version aliases empty; the registered model has them all.
        aliases = client().get_registered_model(name).aliases
        versions = client().search_model_versions(equals("name", name))
        return [{"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)), "parent": v.tags.get("vf.parent", ""),
                 "data": v.tags.get("vf.data_path", ""), "validation": v.tags.get("vf.validation_success", ""),
                 "created": v.creation_timestamp} for v in sorted(versions, key=lambda v: int(v.version), reverse=True)]

    @app.get("/registry")
    @app.get("/api/models", endpoint="api_models")
    @login_required
    def registry():
        models = [m for m in client().search_registered_models() if not m.name.startswith(LOCK_PREFIX)]
        rows = [{"name": m.name, "kind": m.tags.get("vf.kind", ""), "aliases": dict(m.aliases)} for m in models]
        return jsonify(rows) if wants_json() else render_template("registry.html", models=rows)

    @app.get("/registry/<name>")
    @app.get("/api/models/<name>", endpoint="api_model")
    @login_required
    def model_page(name: str):
        try:
            versions = model_rows(name)
        except MlflowException:
            abort(404)
        if not versions:
            abort(404)
        chains = {}
        for row in versions[:5]:
            try:
                chains[row["version"]] = format_chain(lineage_chain(client(), f"models:/{name}/{row['version']}"))
            except LookupError as exc:
                chains[row["version"]] = f"lineage incomplete: {exc}"
        trail = audit_trail(client(), name)
        if wants_json():
            return jsonify(name=name, versions=versions, lineage=chains, audit=trail)
        return render_template("model.html", name=name, versions=versions, chains=chains, trail=trail,
                               may_promote=current_user.is_admin or current_user.can_promote)

    def in_registry(family: str) -> bool:
        return any(client().search_registered_models(equals("name", f"{family}-{kind}")) for kind in ("backbone", "head"))

    def promoter(name: str) -> str:
        """Promotion needs the right to promote and a share in the model's family (an administrator
        has both)."""
        if not (current_user.is_admin or current_user.can_promote):
            raise AccessDenied(f"{current_user.username} may not promote models")
        family = db.session.scalar(db.select(ModelFamily).where(ModelFamily.name == family_of(name)))
        if not current_user.is_admin and (family is None or not may_use_family(current_user, family)):
            owner = f"belongs to {family.owner}" if family else "has no owner in the portal"
            raise AccessDenied(f"model family {family_of(name)!r} {owner}; {current_user.username} may not promote it")
        return current_user.username

    def together(data: dict) -> list[str]:
        """The other members of a consistent set (``with``: a list, or comma-separated text)."""
        value = data.get("with") or []
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise PromotionRefused("input", "with: expected model URIs (a list, or comma-separated)")
        return [i.strip() for i in items if i.strip()]

    @app.post("/registry/<name>/promote")
    @app.post("/api/models/<name>/promote", endpoint="api_promote")
    @login_required
    def promote_model(name: str):
        user, data = promoter(name), payload()
        uri = f"models:/{name}/{text(data, 'version')}"
        try:
            records = promote(client(), uri, text(data, "alias"), text(data, "reason") or "(none)",
                              user=user, together=together(data))
        except UserError as exc:
            audit("model.promote", uri, outcome="refused", reason=str(exc))
            raise exc if isinstance(exc, PromotionRefused) else PromotionRefused("input", str(exc)) from None
        for record in records:
            audit("model.promote", f"models:/{record['model']}/{record['version']}", alias=record["alias"],
                  previous=record["previous"])
        return jsonify(records[0] | {"set": records}) if wants_json() else redirect(url_for("model_page", name=name))

    @app.post("/registry/<name>/rollback")
    @app.post("/api/models/<name>/rollback", endpoint="api_rollback")
    @login_required
    def rollback_model(name: str):
        user, data = promoter(name), payload()
        try:
            records = rollback(client(), name, text(data, "alias"), text(data, "reason") or "(none)",
                               user=user, together=together(data))
        except UserError as exc:
            audit("model.rollback", name, outcome="refused", reason=str(exc))
            raise exc if isinstance(exc, PromotionRefused) else PromotionRefused("input", str(exc)) from None
        for record in records:
            audit("model.rollback", f"models:/{record['model']}/{record['version']}", alias=record["alias"],
                  previous=record["previous"])
        return jsonify(records[0] | {"set": records}) if wants_json() else redirect(url_for("model_page", name=name))

    # -- audit ----------------------------------------------------------------------------------
    @app.get("/audit")
    @app.get("/api/audit", endpoint="api_audit")
    @admin_only
    def audit_log():
        events = db.session.scalars(db.select(AuditEvent).order_by(AuditEvent.id.desc()).limit(500)).all()
        if wants_json():
            return jsonify([{"time": e.time.isoformat(), "user": e.user, "action": e.action, "target": e.target,
                             "outcome": e.outcome, "detail": e.detail} for e in events])
        return render_template("audit.html", events=events)

    if settings.run_jobs:
        launcher = make_launcher(settings.job_backend, settings.project_dir, settings.tracking_uri, settings.slurm_config,
                                 settings.job_log_dir)
        app.extensions["vf.jobs"] = JobRunner(app, launcher, settings.tracking_uri, settings.job_slots).start()
    return app


def _oidc(app: Flask, settings: Settings):
    if not settings.oidc_metadata_url:
        return None
    from authlib.integrations.flask_client import OAuth

    oauth = OAuth(app)
    oauth.register("sso", server_metadata_url=settings.oidc_metadata_url, client_id=settings.oidc_client_id,
                   client_secret=settings.oidc_client_secret, client_kwargs={"scope": "openid profile email"})
    return oauth
