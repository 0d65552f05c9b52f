"""Training jobs from the portal's form, run for real: `mlflow run` of the project in a validated
checkout, followed live, cancelled and resumed."""
import re
import time

import pytest
from mlflow import MlflowClient

from portal.app import Settings
from registry.lineage import Lineage
from registry.mlflow_service import EVAL_RUN_ID
from tests.conftest import portal_with_demo_dataset

pytestmark = pytest.mark.slow


@pytest.fixture()
def portal(validated_copy, mlflow_store, tmp_path):
    """A portal on a validated checkout and a registry of its own that runs its jobs (local backend):
    (app, signed-in test client, demo dataset id, MLflow client)."""
    app, web, dataset = portal_with_demo_dataset(Settings(
        database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="t", tracking_uri=mlflow_store,
        project_dir=validated_copy, run_jobs=True, mlflow_ui_url="http://mlflow.test", job_log_dir=tmp_path / "jobs"))
    yield app, web, dataset, MlflowClient(mlflow_store)
    app.extensions["vf.jobs"].stop()


def _job_when(web, job_id: int, until, seconds: float = 400) -> dict:
    """The job's API answer once ``until`` holds for it."""
    deadline = time.monotonic() + seconds
    while not until(state := web.get(f"/api/jobs/{job_id}").json):
        assert time.monotonic() < deadline, state
        time.sleep(1)
    return state


def test_portal_training_job_runs_mlflow_and_reports_live_metrics(portal):
    """A researcher's form becomes a real `mlflow run` of the project, linked to its MLflow run."""
    _, web, dataset, client = portal
    job = web.post("/api/jobs", json={"dataset_id": dataset, "name": "portal", "config": "configs/demo.yaml",
                                      "strategy": "freeze", "freeze_blocks": "2", "batch_size": "16", "epochs": "1"}).json
    state = _job_when(web, job["id"], lambda s: s["status"] not in ("queued", "starting", "running"))
    assert state["status"] == "finished", state["log_tail"]
    experiment = client.get_run(state["mlflow_run_id"]).info.experiment_id
    assert state["mlflow_url"] == (f"http://mlflow.test/#/experiments/{experiment}/runs/{state['mlflow_run_id']}"
                                   "?workflowType=machine_learning")
    assert [step for step, _ in state["metrics"]["total_loss"]] == [10, 20, 30]  # 30 steps, logged every 10
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["student.freeze_blocks"] == "2" and run.data.params["train.batch_size"] == "16"
    assert run.data.tags["vf.portal.owner"] == "ana"
    assert Lineage.from_tags(client.get_model_version("portal-backbone", "1").tags).source_run_id == state["mlflow_run_id"]

    # The backbone evaluated and given heads from the same form, in the family's experiment.
    backbone, runs = {"dataset_id": dataset, "backbone": "models:/portal-backbone/1", "knn_k": "5"}, {}
    for task in ("evaluate", "heads"):
        job = web.post("/api/jobs", json=backbone | {"task": task}).json
        done = _job_when(web, job["id"], lambda s: s["status"] not in ("queued", "starting", "running"))
        assert done["status"] == "finished", done["log_tail"]
        runs[task] = client.get_run(done["mlflow_run_id"])
        assert runs[task].info.experiment_id == experiment and runs[task].data.tags["vf.entry_point"] == task
        assert re.fullmatch(rf"portal-(v1-)?{task}-\S+", runs[task].info.run_name), runs[task].info.run_name
    assert client.get_model_version("portal-backbone", "1").tags[EVAL_RUN_ID] == runs["evaluate"].info.run_id
    head = client.get_model_version("portal-head", "1")
    assert Lineage.from_tags(head.tags).parent == "models:/portal-backbone/1" and head.run_id == runs["heads"].info.run_id


def test_a_cancelled_portal_job_ends_killed_and_resumes_in_the_same_run(portal):
    """Cancel: the training checkpoints and its run ends KILLED, the job says cancelled. Resume: the
    same MLflow run goes on from that checkpoint to the end, its history continuing, not repeating."""
    _, web, dataset, client = portal
    job = web.post("/api/jobs", json={"dataset_id": dataset, "name": "stopped", "config": "configs/demo.yaml",
                                      "batch_size": "16", "epochs": "3"}).json

    def wait(until):
        return _job_when(web, job["id"], until)

    running = wait(lambda s: s["status"] == "running" and s["progress"])
    assert re.fullmatch(r"\d+/90( \(\S+ left\))?", running["progress"]), running["progress"]
    assert web.post(f"/api/jobs/{job['id']}/resume", json={}).status_code == 409  # still running
    assert web.post(f"/api/jobs/{job['id']}/cancel", json={}).status_code == 200
    stopped = wait(lambda s: s["status"] not in ("queued", "starting", "running"))
    run = client.get_run(stopped["mlflow_run_id"])
    assert stopped["status"] == "cancelled" and run.info.status == "KILLED", (stopped["log_tail"], run.info.status)
    stopped_at = int(run.data.tags["vf.interrupted"].split(" at iteration ")[1].split(";")[0])
    assert web.post(f"/api/jobs/{job['id']}/resume", json={}).status_code == 200
    done = wait(lambda s: s["status"] not in ("queued", "starting", "running"))
    assert done["status"] == "finished" and done["mlflow_run_id"] == stopped["mlflow_run_id"], done["log_tail"]
    steps = [m.step for m in client.get_metric_history(done["mlflow_run_id"], "total_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 90 and stopped_at < 90, (steps, stopped_at)
    assert client.get_run(done["mlflow_run_id"]).info.status == "FINISHED"
