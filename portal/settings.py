"""Portal settings, from the environment: the database (any SQLAlchemy URL, SQLite by default), the
S3 bucket and endpoint of the datasets, the MLflow tracking URI and UI address, where jobs run,
cookies and proxies, and, optionally, an OpenID Connect provider for institutional sign-in."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from portal.throttle import Throttle

PROJECT = Path(__file__).resolve().parents[1]


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
    # Migrate the schema at start-up: by default only the embedded SQLite database, which one
    # process owns; several workers on a shared database must not race to migrate it.
    auto_migrate: bool | None = None

    def __post_init__(self):
        if self.auto_migrate is None:
            self.auto_migrate = os.environ.get("PORTAL_AUTO_MIGRATE", "1" if self.database_url.startswith("sqlite") else "0") == "1"
