"""A team's deployment, on the real parts: PostgreSQL, SeaweedFS, ``mlflow server`` with its auth
app and the portal under four gunicorn workers, all started by ``deploy.stack`` (one stack for the
session). Concurrency is real: threads and processes against the servers."""
import multiprocessing
import os
import subprocess
import sys
import threading
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
from registry.promote import LOCK_PREFIX, MetricGate, PromotionRefused, promote
from scripts.demo import free_port, wait_ready
from tests.conftest import REPO, tiny_overrides
from tests.test_registry import register

pytestmark = [pytest.mark.slow, pytest.mark.team]

GATES = {"backbone": [MetricGate("knn.accuracy", 0.01)]}


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


class _AfterTheGates(MlflowClient):
    """Waits until every contender has passed its gates before asking for the lock."""

    def __init__(self, uri: str, barrier):
        super().__init__(uri)
        self.barrier = barrier

    def create_registered_model(self, name, *args, **kwargs):
        if name.startswith(LOCK_PREFIX) and self.barrier is not None:
            self.barrier.wait(timeout=120)  # a contender that never gets here breaks it, not the suite
            self.barrier = None
        return super().create_registered_model(name, *args, **kwargs)


def _contend(uri: str, version: str, alias: str, barrier) -> str:
    try:
        promote(_AfterTheGates(uri, barrier), f"models:/race-backbone/{version}", alias, "race", gates=GATES)
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


def test_promotion_lock_contention_on_the_tracking_server_has_one_winner_and_clean_refusals(team_stack, as_gate):
    uri = team_stack.tracking_uri
    versions = [register(as_gate, "race-backbone", eval_tags={"knn.accuracy": 0.8 + i / 100}) for i in range(6)]
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
    assert not [m for m in as_gate.search_registered_models() if m.name.startswith(LOCK_PREFIX)]


@contextmanager
def identity(monkeypatch, env: dict):
    """MLflow clients read their credentials from the environment at each request."""
    with monkeypatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_pretrain_evaluate_promote_and_serve_through_the_tracking_server_with_auth(team_stack, validated_checkout, tmp_path,
                                                                                  monkeypatch):
    """A researcher trains into their family over HTTP; the promotion service moves the aliases; the
    service reads the registry with a read-only identity and refuses an alias moved by hand."""
    rita_env = team_stack.mlflow_env("rita", "rita's long password")
    team_stack.create_mlflow_user("rita", rita_env["MLFLOW_TRACKING_PASSWORD"])
    with identity(monkeypatch, team_stack.gate_env()) as gate:
        for model in ("team-backbone", "team-head"):
            gate.create_registered_model(model)
            team_stack.grant("rita", "registered_model", model, "EDIT")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    rita = {**base_env, **team_stack.s3_env(), **rita_env}
    mlflow_run = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "team"]

    def run(*cmd: str, env: dict = rita) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=validated_checkout, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
        return done

    run(*mlflow_run, "-e", "pretrain", "-P", "name=team", "-P", f"overrides={tiny_overrides()}")
    run(*mlflow_run, "-e", "evaluate", "-P", "model=models:/team-backbone/1")
    run(*mlflow_run, "-e", "heads", "-P", "name=team")
    with identity(monkeypatch, team_stack.gate_env()) as gate:
        sources = {mv.source for mv in gate.search_model_versions("name = 'team-backbone'")}
    assert all(source.startswith("models:/") or "mlflow-artifacts" in source for source in sources), sources

    gates = tmp_path / "gates.yaml"  # a few steps do not beat random init: this test is about the plumbing
    gates.write_text("backbone:\n  knn.accuracy: {max_drop: 0.01}\nhead:\n  linear.accuracy: {max_drop: 0.0}\n")
    # The read-only identity may not move anything; a researcher may not delete an alias.
    serving = {**base_env, **team_stack.serving_env()}
    refused = subprocess.run([sys.executable, "-m", "registry.promote", "models:/team-backbone/1", "--with",
                              "models:/team-head/1", "--alias", "production", "--reason", "try", "--gates", str(gates)],
                             cwd=REPO, env=serving, capture_output=True, text=True)
    assert refused.returncode == 2 and "403" in refused.stderr, refused.stderr
    run(sys.executable, "-m", "registry.promote", "models:/team-backbone/1", "--with", "models:/team-head/1",
        "--alias", "production", "--reason", "team e2e", "--gates", str(gates), env={**base_env, **team_stack.gate_env()})
    with identity(monkeypatch, rita_env) as as_rita, pytest.raises(MlflowException, match="403"):
        as_rita.delete_registered_model_alias("team-backbone", "production")

    port = free_port()
    env = {**serving, "VF_MODEL_NAME": "team", "VF_MODEL_ALIAS": "production", "VF_RELOAD_TOKEN": "op",
           "VF_RELOAD_INTERVAL_S": "0"}
    server = subprocess.Popen(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", server, timeout=180)
        sample = sorted(Path(validated_checkout, "data/demo/images/val/glands").glob("*.png"))[0]
        with sample.open("rb") as f:
            answer = httpx.post(f"{base}/classify", files={"images": (sample.name, f, "image/png")}, timeout=60)
        assert answer.status_code == 200 and answer.json()["backbone"] == "models:/team-backbone/1", answer.text
        assert answer.json()["model"] == "models:/team-head/1" and answer.json()["predictions"][0]["label"]
        # Rita moves @production by hand, as the MLflow UI's alias pencil would (her EDIT allows it):
        # a copy of the head, consistent with the backbone, but never through the gates.
        with identity(monkeypatch, rita_env) as as_rita:
            head = as_rita.get_model_version("team-head", "1")
            copy = as_rita.create_model_version("team-head", head.source, run_id=head.run_id, tags=head.tags,
                                                model_id=head.source.removeprefix("models:/"))  # a LoggedModel
            as_rita.set_registered_model_alias("team-head", "production", copy.version)
        reload = httpx.post(f"{base}/reload", headers={"Authorization": "Bearer op"}, json={}, timeout=60)
        assert reload.status_code == 400 and "refused to follow team-head@production" in reload.text, reload.text
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200 and "the gates last moved it to version 1" in ready.json()["refused"]
        assert ready.json()["serving"] == ["models:/team-backbone/1", "models:/team-head/1"]
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    assert "refused to follow team-head@production" in log
