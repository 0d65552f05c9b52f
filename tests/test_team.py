"""A team's deployment, on the real parts: PostgreSQL, SeaweedFS, ``mlflow server`` with its auth
app and the portal under four gunicorn workers, all started by ``deploy.stack`` (one stack for the
session). Concurrency is real: threads and processes against the servers."""
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from portal import migrate
from portal.db import db
from registry.ledger import DB_ENV, Ledger, audit_key
from registry.promote import Gates, MetricGate, PromotionRefused, promote
from scripts.demo import free_port, wait_ready
from tests.conftest import REPO, tiny_overrides
from tests.test_registry import register

pytestmark = [pytest.mark.slow, pytest.mark.team]

GATES = Gates({"backbone": [MetricGate("knn.accuracy", 0.01)]})


def _portal_user(stack, username: str, password: str) -> None:
    made = subprocess.run([sys.executable, "-m", "portal", "create-user", username], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **stack.portal_env(), "VF_PASSWORD": password})
    assert made.returncode == 0, made.stderr


def test_forty_concurrent_guesses_across_four_workers_evaluate_at_most_five(team_stack):
    _portal_user(team_stack, "bob", "right password")
    login = f"{team_stack.portal_url}/api/login"

    def guess(body: dict) -> int:
        return httpx.post(login, json=body, timeout=60).status_code

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(guess, [{"username": "bob", "password": f"guess {i}"} for i in range(40)]))
    assert answers.count(401) <= 5 and answers.count(401) + answers.count(429) == 40, answers
    assert guess({"username": "bob", "password": "right password"}) == 429  # locked means locked
    # The address (all from 127.0.0.1) allows 20 wrong passwords, however many accounts they name.
    with ThreadPoolExecutor(40) as pool:
        spread = list(pool.map(guess, [{"username": f"user{i}", "password": "x"} for i in range(40)]))
    assert answers.count(401) + spread.count(401) <= 20 and spread.count(401) + spread.count(429) == 40, spread


def _claim_all(url: str, slots: int, start: multiprocessing.Barrier) -> list[int]:
    from portal.app import Settings, create_app
    from portal.jobs import claim_next

    app = create_app(Settings(database_url=url, secret_key="t", run_jobs=False, auto_migrate=False))
    claimed = []
    with app.app_context():
        start.wait()
        while (job := claim_next(slots)) is not None:
            claimed.append(job.id)
    return claimed


def _in_processes(target, args_per_process: list[tuple]) -> list:
    context = multiprocessing.get_context("fork")
    with context.Pool(len(args_per_process)) as pool:
        results = pool.starmap(target, args_per_process)
        pool.close()
        pool.join()
    return results


def test_portal_jobs_are_claimed_once_across_processes_within_the_slots(team_stack):
    url = team_stack.create_database("jobs_claim")
    engine = sa.create_engine(url)
    migrate.upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO dataset (id, name, prefix, created_by, created_at) "
                                   "VALUES (1, 'd', 'datasets/d/', 'ana', now())"))
        for _ in range(24):
            connection.execute(sa.text("INSERT INTO job (owner, dataset_id, entry_point, parameters, command, status, "
                                       "created_at) VALUES ('ana', 1, 'pretrain', '{}', '[]', 'queued', now())"))
    manager = multiprocessing.get_context("fork").Manager()
    try:
        start = manager.Barrier(4)
        claimed = _in_processes(_claim_all, [(url, 1000, start)] * 4)
        everything = [job for ids in claimed for job in ids]
        assert sorted(everything) == list(range(1, 25)) and sum(1 for ids in claimed if ids) >= 2, claimed
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE job SET status = 'queued'"))
        start = manager.Barrier(4)
        limited = _in_processes(_claim_all, [(url, 3, start)] * 4)
        assert sum(len(ids) for ids in limited) == 3, limited
    finally:
        manager.shutdown()
        engine.dispose()


def test_migrations_upgrade_an_empty_database_and_one_at_the_previous_schema_losing_nothing(team_stack):
    empty = sa.create_engine(team_stack.create_database("portal_empty"))
    assert migrate.upgrade(empty) == migrate.head()
    with empty.connect() as connection:  # the migrations build exactly what the models declare
        assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
    empty.dispose()

    url = team_stack.create_database("portal_previous")
    previous = sa.create_engine(url)
    migrate.upgrade(previous, migrate.FIRST)  # the previous release made these tables with create_all
    with previous.begin() as connection:
        connection.execute(sa.text("DROP TABLE alembic_version"))
        connection.execute(sa.text("INSERT INTO \"user\" (username, password_hash, is_admin, can_promote) "
                                   "VALUES ('old', 'scrypt:1:1:1$x$y', true, false)"))
        connection.execute(sa.text("INSERT INTO audit_event (time, \"user\", action, target, outcome, detail) "
                                   "VALUES (now(), 'old', 'login', 'old', 'ok', '{}')"))
    previous.dispose()
    upgraded = subprocess.run([sys.executable, "-m", "portal", "db", "upgrade"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PORTAL_DATABASE_URL": url})
    assert upgraded.returncode == 0 and f"portal database: empty -> {migrate.head()}" in upgraded.stdout, upgraded.stderr
    after = sa.create_engine(url)
    with after.connect() as connection:
        assert connection.execute(sa.text("SELECT username FROM \"user\"")).scalars().all() == ["old"]
        assert connection.execute(sa.text("SELECT count(*) FROM audit_event")).scalar() == 1
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("audit_event")}
        assert {"ix_audit_event_user", "ix_audit_event_action"} <= indexes
    after.dispose()


class _AfterTheGates(Ledger):
    """Waits until every contender has passed its gates before asking for the ledger's lock."""

    def __init__(self, url: str, barrier):
        super().__init__(url, audit_key())
        self.barrier = barrier

    def exclusive(self):
        if self.barrier is not None:
            self.barrier.wait(timeout=120)  # a contender that never gets here breaks it, not the suite
            self.barrier = None
        return super().exclusive()


def _contend(uri: str, version: str, alias: str, barrier) -> str:
    try:
        promote(MlflowClient(uri), f"models:/race-backbone/{version}", alias, "race", gates=GATES,
                ledger=_AfterTheGates(os.environ[DB_ENV], barrier))
        return "won"
    except PromotionRefused as exc:
        return f"refused:{exc.gate}"
    except Exception as exc:  # anything else is the defect this test exists for
        return f"raw:{type(exc).__name__}: {exc}"


@pytest.fixture()
def as_gate(team_stack, monkeypatch):
    for key, value in {**team_stack.gate_env(), **team_stack.s3_env()}.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team_stack.tracking_uri)
    yield MlflowClient(team_stack.tracking_uri)
    mlflow.set_tracking_uri(None)


def test_promotion_lock_contention_on_the_team_ledger_has_one_winner_and_clean_refusals(team_stack, as_gate):
    uri = team_stack.tracking_uri
    versions = [register(as_gate, "race-backbone", evaluated={"knn.accuracy": 0.8 + i / 100}) for i in range(6)]
    # Anyone's object named as the old lock was blocks nothing (and only the gate may create one now).
    as_gate.create_registered_model("vf-lock.race-backbone.staging")
    barrier = threading.Barrier(6)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda v: _contend(uri, v, "staging", barrier), versions))
    assert outcomes.count("won") == 1 and sorted(set(outcomes)) == ["refused:exclusive", "won"], outcomes

    manager = multiprocessing.get_context("fork").Manager()
    try:
        barrier = manager.Barrier(4)
        outcomes = _in_processes(_contend, [(uri, v, "production", barrier) for v in versions[:4]])
    finally:
        manager.shutdown()
    assert outcomes.count("won") == 1 and sorted(set(outcomes)) == ["refused:exclusive", "won"], outcomes
    moves = [e for e in Ledger(os.environ[DB_ENV], audit_key()).entries() if e.model == "race-backbone" and e.alias]
    assert [e.alias for e in moves] == ["staging", "production"]


@contextmanager
def identity(monkeypatch, env: dict):
    """MLflow clients read their credentials from the environment at each request."""
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_pretrain_evaluate_promote_and_serve_through_the_tracking_server_with_auth(team_stack, validated_checkout, tmp_path,
                                                                                  monkeypatch):
    """A researcher trains into their family over HTTP; the promotion service evaluates both
    versions itself and moves the aliases; the service reads the registry and the ledger with
    read-only identities and follows nothing the ledger does not vouch for."""
    rita_env = team_stack.add_researcher("rita", "rita's long password", "team")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VF_AUDIT"))}
    rita = {**base_env, **team_stack.s3_env(), **rita_env}
    mlflow_run = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "team"]

    def run(*cmd: str, env: dict = rita) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=validated_checkout, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
        return done

    run(*mlflow_run, "-e", "pretrain", "-P", "name=team", "-P", f"overrides={tiny_overrides()}")
    run(*mlflow_run, "-e", "heads", "-P", "name=team")
    # Rita says her backbone learned and logs an evaluate run of her own: neither is evidence.
    with identity(monkeypatch, rita_env) as as_rita:
        backbone = as_rita.get_model_version("team-backbone", "1")
        as_rita.set_tag(backbone.run_id, "vf.learned", "true")
        experiment = as_rita.get_experiment_by_name("team").experiment_id
        faked = as_rita.create_run(experiment, tags={"vf.entry_point": "evaluate", "vf.evaluated_model": "models:/team-backbone/1"})
        as_rita.log_metric(faked.info.run_id, "knn.accuracy", 0.95)
        as_rita.set_model_version_tag("team-backbone", "1", "vf.eval.run_id", faked.info.run_id)
    with identity(monkeypatch, team_stack.gate_env()) as gate:
        sources = {mv.source for mv in gate.search_model_versions("name = 'team-backbone'")}
    assert all(source.startswith("models:/") or "mlflow-artifacts" in source for source in sources), sources

    # A few steps do not beat random init, so this gates file judges no learning: it is about the
    # plumbing. The split is the promotion service's own (here: the validated checkout's).
    gates = tmp_path / "gates.yaml"
    gates.write_text(f"evaluation: {{data: {validated_checkout}/data/demo/images, "
                     f"validation_report: {validated_checkout}/data/demo/validation/report.json, knn_k: 5}}\n"
                     "backbone:\n  knn.accuracy: {max_drop: 0.01}\nhead:\n  head.accuracy: {max_drop: 0.0}\n")
    promote_cmd = [sys.executable, "-m", "registry.promote", "models:/team-backbone/1", "--with", "models:/team-head/1",
                   "--alias", "production", "--reason", "team e2e", "--gates", str(gates)]
    # The read-only identity may not move anything.
    serving = {**base_env, **team_stack.serving_env()}
    refused = subprocess.run(promote_cmd, cwd=REPO, env=serving, capture_output=True, text=True)
    assert refused.returncode == 2 and "denied" in refused.stderr.lower(), refused.stderr
    run(*promote_cmd, env={**base_env, **team_stack.s3_env(), **team_stack.gate_env()})
    gate_ledger = Ledger(team_stack.ledger_url(writer=True), team_stack.secrets.audit_key.encode())
    evaluations = {e.model: e.body for e in gate_ledger.entries() if e.kind == "evaluation"}
    assert set(evaluations) >= {"models:/team-backbone/1", "models:/team-head/1"}
    assert evaluations["models:/team-backbone/1"]["metrics"]["knn.accuracy"] != 0.95  # measured, not Rita's number
    assert "head.accuracy" in evaluations["models:/team-head/1"]["metrics"]
    with identity(monkeypatch, team_stack.gate_env()) as gate:
        ran = gate.get_run(evaluations["models:/team-backbone/1"]["run_id"])
        assert gate.get_experiment(ran.info.experiment_id).name == "vf-gate"
    with identity(monkeypatch, rita_env) as as_rita, pytest.raises(MlflowException, match="403"):
        as_rita.delete_registered_model_alias("team-backbone", "production")

    port = free_port()
    env = {**serving, "VF_MODEL_NAME": "team", "VF_MODEL_ALIAS": "production", "VF_RELOAD_TOKEN": "op",
           "VF_RELOAD_INTERVAL_S": "0", "VF_WATCH_WINDOW": "2", "VF_WATCH_LOG_INTERVAL_S": "0"}
    server = subprocess.Popen(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(f"{base}/readyz", server, timeout=180)
        except RuntimeError as error:
            raise AssertionError(server.stdout.read()[-3000:]) from error  # it has exited: all it said
        sample = sorted(Path(validated_checkout, "data/demo/images/val/glands").glob("*.png"))[0]
        with sample.open("rb") as f:
            answer = httpx.post(f"{base}/classify", files={"images": (sample.name, f, "image/png")}, timeout=60)
        assert answer.status_code == 200 and answer.json()["backbone"] == "models:/team-backbone/1", answer.text
        assert answer.json()["model"] == "models:/team-head/1" and answer.json()["predictions"][0]["label"]
        assert answer.json()["ood"]["reference"] == evaluations["models:/team-backbone/1"]["run_id"]
        # A second image fills a window: the watch logs it as vf-monitor, which may log nowhere else.
        with sample.open("rb") as f:
            assert httpx.post(f"{base}/embed", files={"images": (sample.name, f, "image/png")}, timeout=60).status_code == 200
        with identity(monkeypatch, team_stack.gate_env()) as gate:
            monitoring = gate.get_experiment_by_name("vf-monitoring").experiment_id
            deadline = time.monotonic() + 60
            while not (runs := gate.search_runs([monitoring], "tags.`vf.monitored_model` = 'models:/team-backbone/1'")):
                assert time.monotonic() < deadline, "no monitoring run within 60 s"
                time.sleep(0.5)
            assert runs[0].info.user_id == "vf-monitor" and "drift.p_value" in runs[0].data.metrics
        monitor = httpx.Client(base_url=team_stack.tracking_uri, timeout=30,
                               auth=("vf-monitor", team_stack.secrets.mlflow_monitor))
        for path, body in (("runs/create", {"experiment_id": experiment}), ("experiments/create", {"name": "team-watch"})):
            assert monitor.post(f"/api/2.0/mlflow/{path}", json=body).status_code == 403, path
        # Rita may no longer move @production by hand (the UI's alias pencil): the server refuses.
        with identity(monkeypatch, rita_env) as as_rita:
            head = as_rita.get_model_version("team-head", "1")
            with pytest.raises(MlflowException, match="never an audit record"):  # the gates' copy comes along
                as_rita.create_model_version("team-head", head.source, run_id=head.run_id, tags=head.tags)
            lineage = {k: v for k, v in head.tags.items() if not k.startswith("vf.audit.")}
            copy = as_rita.create_model_version("team-head", head.source, run_id=head.run_id, tags=lineage,
                                                model_id=head.source.removeprefix("models:/"))  # a LoggedModel
            with pytest.raises(MlflowException, match="aliases move through the promotion gates only"):
                as_rita.set_registered_model_alias("team-head", "production", copy.version)
        # The server's administrator can; the service does not follow.
        with identity(monkeypatch, team_stack.mlflow_env("vf-admin", team_stack.secrets.mlflow_admin)) as admin:
            admin.set_registered_model_alias("team-head", "production", copy.version)
        reload = httpx.post(f"{base}/reload", headers={"Authorization": "Bearer op"}, json={}, timeout=60)
        assert reload.status_code == 400 and "refused to follow team-head@production" in reload.text, reload.text
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200 and "the gates last moved it to version 1" in ready.json()["refused"]
        assert ready.json()["serving"] == ["models:/team-backbone/1", "models:/team-head/1"]
        with identity(monkeypatch, team_stack.mlflow_env("vf-admin", team_stack.secrets.mlflow_admin)) as admin:
            admin.set_registered_model_alias("team-head", "production", "1")
        assert httpx.post(f"{base}/reload", headers={"Authorization": "Bearer op"}, json={}, timeout=60).status_code == 200
        # Whoever rewrites the ledger itself (only PostgreSQL's superuser can) makes the service stop trusting it.
        team_stack.psql("vf_audit", "UPDATE vf_ledger SET body = replace(body, 'team e2e', 'rewritten') "
                                    "WHERE kind = 'promote'")
        reload = httpx.post(f"{base}/reload", headers={"Authorization": "Bearer op"}, json={}, timeout=60)
        assert reload.status_code == 400 and "was altered after it was written" in reload.text, reload.text
        assert httpx.get(f"{base}/readyz", timeout=10).json()["serving"] == ["models:/team-backbone/1", "models:/team-head/1"]
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    assert "refused to follow team-head@production" in log


def _variants(path: str) -> list[str]:
    """One REST route as MLflow serves it, and the spellings that reach the same handler."""
    return [f"/api/2.0/mlflow/{path}", f"/ajax-api/2.0/mlflow/{path}", f"/api/2.0/mlflow/{path.replace('-', '%2D')}",
            f"/api/2.0/mlflow/{path}/"]


def test_the_tracking_server_refuses_what_mlflows_permissions_would_allow_route_by_route(team_stack):
    rosa = httpx.Client(base_url=team_stack.tracking_uri, auth=("rosa", "rosa's password"), timeout=30)
    team_stack.add_researcher("rosa", "rosa's password", "rosa")
    team_stack.add_researcher("otto", "otto's password", "otto")
    serving = httpx.Client(base_url=team_stack.tracking_uri, auth=("vf-serving", team_stack.secrets.mlflow_serving), timeout=30)
    gate = httpx.Client(base_url=team_stack.tracking_uri, auth=("vf-gate", team_stack.secrets.mlflow_gate), timeout=30)

    def refused(client: httpx.Client, method: str, path: str, body: dict, because: str) -> None:
        for url in _variants(path):
            answer = client.request(method, url, json=body) if method != "GET" else client.get(url, params=body)
            assert answer.status_code in (403, 404, 405), (url, answer.status_code, answer.text[:300])
            if answer.status_code == 403 and not url.endswith("/"):  # MLflow refuses unknown routes itself
                assert because in answer.text, (url, answer.text[:300])

    def exists(name: str) -> bool:
        return gate.get("/api/2.0/mlflow/registered-models/get", params={"name": name}).status_code == 200

    # Squatting another family's name, a lock's old name, or anything else: the promotion service's only.
    for name in ("otto-head2", "vf-lock.rosa-backbone.production", "rosa-new"):
        refused(rosa, "POST", "registered-models/create", {"name": name}, "created by the promotion service")
        assert not exists(name)
    refused(serving, "POST", "registered-models/create", {"name": "serving-model"}, "vf-serving is read-only")
    # Asking to create a model that exists gets MLflow's own answer, which registering a version expects.
    again = rosa.post("/api/2.0/mlflow/registered-models/create", json={"name": "rosa-backbone"})
    assert again.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in again.text
    # Experiments: only under one's own family's name, never deleted, renamed or restored by researchers.
    refused(rosa, "POST", "experiments/create", {"name": "otto"}, "a family you are a member of")
    refused(serving, "POST", "experiments/create", {"name": "rosa"}, "vf-serving is read-only")
    team_stack.add_researcher("rosie", "rosie's password", "rosa")  # a member when the experiment is made
    made = rosa.post("/api/2.0/mlflow/experiments/create", json={"name": "rosa"})
    assert made.status_code == 200, made.text
    experiment = made.json()["experiment_id"]
    assert rosa.post("/api/2.0/mlflow/experiments/create", json={"name": "rosa/ablation"}).status_code == 200
    # The other members of her family log into it (one who joins later too); another family only reads it.
    team_stack.add_researcher("rafa", "rafa's password", "rosa")
    otto = httpx.Client(base_url=team_stack.tracking_uri, auth=("otto", "otto's password"), timeout=30)
    for member in ("rosie", "rafa"):
        logged = httpx.post(f"{team_stack.tracking_uri}/api/2.0/mlflow/runs/create", json={"experiment_id": experiment},
                            auth=(member, f"{member}'s password"), timeout=30)
        assert logged.status_code == 200, (member, logged.text)
    team_stack.add_researcher("rosa", "rosa's password", "rosa")  # again: she keeps what she holds
    assert rosa.post("/api/2.0/mlflow/experiments/update", json={"experiment_id": experiment, "new_name": "rosa"}
                     ).status_code == 403  # still MANAGE (basic-auth lets her), and still refused by the platform
    assert otto.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment}).status_code == 403
    assert otto.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment}).status_code == 200
    refused(rosa, "POST", "experiments/delete", {"experiment_id": experiment}, "experiments are kept")
    refused(rosa, "POST", "experiments/update", {"experiment_id": experiment, "new_name": "otto"}, "keep their family")
    # A run and a version of her own family: her work, allowed.
    run = rosa.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment}).json()["run"]["info"]["run_id"]
    version = rosa.post("/api/2.0/mlflow/model-versions/create", json={
        "name": "rosa-backbone", "source": f"runs:/{run}/model", "run_id": run,
        "tags": [{"key": "vf.kind", "value": "backbone"}]}).json()["model_version"]["version"]
    refused(serving, "POST", "runs/log-metric", {"run_id": run, "key": "knn.accuracy", "value": 1, "timestamp": 0}, "")
    refused(serving, "POST", "runs/set-tag", {"run_id": run, "key": "vf.learned", "value": "true"}, "")
    # Records and lineage on the registry are the promotion service's; her own evaluation is information.
    target = {"name": "rosa-backbone", "version": version}
    refused(rosa, "POST", "model-versions/set-tag", target | {"key": "vf.audit.production.x", "value": "{}"},
            "written by the promotion service")
    refused(rosa, "POST", "model-versions/set-tag", target | {"key": "vf.kind", "value": "head"},
            "lineage is written once")
    assert rosa.post("/api/2.0/mlflow/model-versions/set-tag",  # registering sets it where absent
                     json=target | {"key": "vf.data_md5", "value": "m.dir"}).status_code == 200
    refused(rosa, "POST", "model-versions/set-tag", target | {"key": "vf.data_md5", "value": "other.dir"},
            "lineage is written once")
    refused(rosa, "DELETE", "model-versions/delete-tag", target | {"key": "vf.kind"}, "")
    assert rosa.post("/api/2.0/mlflow/model-versions/set-tag",
                     json=target | {"key": "vf.eval.knn.accuracy", "value": "0.9"}).status_code == 200
    refused(rosa, "POST", "model-versions/create", {"name": "rosa-backbone", "source": f"runs:/{run}/model", "run_id": run,
                                                    "tags": [{"key": "vf.audit.production.1", "value": "{}"}]},
            "never an audit record")
    # Aliases move through the gates only; models are renamed or deleted by the promotion service only.
    refused(rosa, "POST", "registered-models/alias", {"name": "rosa-backbone", "alias": "production", "version": version},
            "promotion gates only")
    # (Where MLflow's own permissions already refuse, its plain "Permission denied" answers.)
    refused(rosa, "DELETE", "registered-models/alias", {"name": "rosa-backbone", "alias": "production"}, "")
    refused(rosa, "POST", "registered-models/rename", {"name": "rosa-backbone", "new_name": "otto-backbone"}, "")
    refused(rosa, "DELETE", "registered-models/delete", {"name": "rosa-backbone"}, "")
    refused(serving, "POST", "registered-models/alias", {"name": "rosa-backbone", "alias": "production", "version": version},
            "")
    assert exists("rosa-backbone")
    # The read-only identity still reads, over GET and the searches MLflow serves over POST.
    assert serving.get("/api/2.0/mlflow/registered-models/get", params={"name": "rosa-backbone"}).status_code == 200
    assert serving.post("/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment]}).status_code == 200
    assert serving.get("/api/2.0/mlflow/model-versions/search", params={"filter": "name='rosa-backbone'"}).status_code == 200


def test_stack_status_says_where_each_service_answers_and_where_each_identitys_credentials_are(team_stack):
    stack = [sys.executable, "-m", "deploy.stack", "--root", str(team_stack.root)]
    status = subprocess.run([*stack, "status"], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert all(f"{part:9} up" in status.stdout for part in ("postgres", "s3", "mlflow", "portal")), status.stdout
    for where in (team_stack.tracking_uri, team_stack.s3_endpoint, team_stack.portal_url, str(team_stack.root / "secrets.json"),
                  "--identity gate", "--identity serving"):
        assert where in status.stdout, where
    serving = subprocess.run([*stack, "env", "--identity", "serving"], cwd=REPO, capture_output=True, text=True).stdout
    assert "MLFLOW_TRACKING_USERNAME='vf-serving'" in serving and "vf_ledger_reader" in serving
    assert "AWS_ACCESS_KEY_ID='vf-reader'" in serving and team_stack.secrets.mlflow_gate not in serving
    gate = subprocess.run([*stack, "env", "--identity", "gate"], cwd=REPO, capture_output=True, text=True).stdout
    assert "MLFLOW_TRACKING_USERNAME='vf-gate'" in gate and "VF_AUDIT_KEY=" in gate and "vf_ledger:" in gate
