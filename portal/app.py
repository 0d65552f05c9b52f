"""The Vision Foundry portal: server-rendered pages and a JSON API over the same actions.

    python -m portal create-user ana --admin       # first user
    python -m portal serve --port 8080             # or: flask --app portal.app run

``create_app`` wires the parts: settings (``portal.settings``, from the environment), the
database, sign-in, CSRF, the error answers every area shares (JSON under ``/api/``, pages
elsewhere: ``portal.web``), one blueprint per area (``portal.views``: auth, datasets, jobs,
registry, audit) and the job runner.
"""
from __future__ import annotations

import secrets

from flask import Flask, abort, jsonify, redirect, request, session, url_for
from flask_login import LoginManager
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from portal.access import AccessDenied, BadPath
from portal.db import LEVELS, User, db
from portal.jobs import FormErrors, JobRunner, make_launcher
from portal.migrate import require_current, upgrade
from portal.settings import Settings
from portal.storage import Storage, StorageUnavailable
from portal.views import audit, auth, datasets, jobs, monitoring, registry
from portal.web import audit as audit_event
from portal.web import audit_refusal, plain, refuse, wants_json
from registry.ledger import LedgerBroken, LedgerUnavailable
from registry.lineage import RegistryUnavailable
from registry.mlflow_service import MlflowService
from registry.promote import PromotionRefused

__all__ = ["Settings", "create_app"]


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
    app.extensions["vf.storage"] = Storage(settings.bucket, settings.s3_endpoint_url, expires_s=settings.presign_expires_s)
    app.extensions["vf.mlflow"] = MlflowService(settings.tracking_uri)
    app.extensions["vf.oauth"] = _oidc(app, settings)
    db.init_app(app)
    with app.app_context():
        # The embedded database is this process's own; a shared one is migrated by its administrator.
        if settings.auto_migrate:
            upgrade(db.engine)
        else:
            require_current(db.engine)
    login = LoginManager(app)
    login.login_view = "auth.login"
    login.user_loader(lambda user_id: db.session.get(User, int(user_id)))

    @login.unauthorized_handler
    def unauthorized():
        if wants_json():
            return jsonify(error="sign in first"), 401
        return redirect(url_for("auth.login", next=request.path))

    @app.before_request
    def csrf():
        """Forms carry the session's token; the API takes JSON only, which a cross-site form cannot send."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return None
        if wants_json():
            # Browsers send cross-site DELETE only after a CORS preflight this app never answers.
            if request.method != "DELETE" and not request.is_json:
                return jsonify(error="send application/json"), 415
            return None
        # No session token (a cross-site post, the login form included) is a refusal too.
        token = session.get("csrf_token")
        if not token or not secrets.compare_digest(request.form.get("csrf_token", ""), token):
            abort(400, "form expired; reload the page")
        return None

    app.add_template_filter(plain, "plain")

    @app.context_processor
    def template_globals():
        session.setdefault("csrf_token", secrets.token_hex(16))
        return {"csrf_token": session["csrf_token"], "sso": app.extensions["vf.oauth"] is not None, "levels": LEVELS}

    @app.errorhandler(AccessDenied)
    def denied(exc):
        audit_event("access", request.path, outcome="denied", reason=str(exc))
        return refuse(str(exc), 403)

    @app.errorhandler(BadPath)
    @app.errorhandler(PromotionRefused)
    @app.errorhandler(FormErrors)
    def bad_request(exc):
        extra = {"errors": exc.errors} if isinstance(exc, FormErrors) else {}
        if isinstance(exc, PromotionRefused):
            extra["gate"] = exc.gate
        audit_refusal(400, str(exc))
        return refuse(str(exc), 400, **extra)

    @app.errorhandler(StorageUnavailable)
    def storage_down(exc):
        audit_refusal(503, str(exc))
        return refuse(str(exc), 503)

    @app.errorhandler(RegistryUnavailable)
    @app.errorhandler(LedgerUnavailable)
    @app.errorhandler(LedgerBroken)
    def registry_down(exc):
        # The registry's and the ledger's errors carry their database's own words, which tell a
        # caller about the site, not about their request: those go to the log and the audit,
        # under a reference the answer gives.
        reference = secrets.token_hex(4)
        app.logger.error("%s [reference %s]", exc, reference)
        audit_refusal(503, f"{exc} [reference {reference}]")
        part = "model registry" if isinstance(exc, RegistryUnavailable) else "promotion ledger"
        return refuse(f"the {part} did not answer as it should; try again, or give the administrator the reference "
                      f"{reference}", 503)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        """The API answers JSON for every error (404s included); refused actions are audited."""
        if exc.code and exc.code >= 400:
            audit_refusal(exc.code, exc.description or exc.name)
        if not wants_json():
            return exc
        return jsonify(error=exc.description or exc.name), exc.code

    for area in (auth, datasets, jobs, registry, monitoring, audit):
        app.register_blueprint(area.bp)
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
