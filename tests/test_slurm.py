"""The slurm MLflow project backend against a real one-node Slurm cluster (tests/slurm_cluster.py):
training as srun tasks, scheduler states as run statuses, requeue into the same MLflow run, and
portal jobs through it."""
import json
import os
import subprocess
import time

import mlflow
import pytest
from mlflow import MlflowClient

from projects.slurm import MLFLOW_STATUS, SlurmBackend, SlurmConfig, SlurmError, batch_script
from tests.slurm_cluster import SlurmCluster

# A few iterations of the demo config, in processes of one core each (the node has two).
SHORT = "train.epochs=1 train.steps_per_epoch=6 train.batch_size=8 train.log_every=2 train.eval_every=0"
ONE_CORE = {"cpus_per_task": 1, "poll_s": 0.5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def project(validated_checkout, cluster, tmp_path_factory):
    """(checkout, tracking URI, client) with a store of this module's own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield validated_checkout, uri, MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _params(name: str, overrides: str) -> dict:
    return {"name": name, "overrides": overrides}


def _submit(project, name, overrides, **config):
    checkout, uri, client = project
    experiment = mlflow.set_experiment("slurm").experiment_id
    return SlurmBackend().run(str(checkout), "pretrain", _params(name, overrides), None, ONE_CORE | config, uri, experiment)


def _wait_for_line(path, text, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n" + (open(path).read()[-3000:] if os.path.exists(path) else ""))


def test_config_errors_name_their_keys():
    with pytest.raises(SlurmError) as refused:
        SlurmConfig.from_dict({"gpu": 4, "nodes": "two"})
    assert "gpu: unknown key" in str(refused.value) and "nodes: expected int, got 'two'" in str(refused.value)
    with pytest.raises(SlurmError) as refused:
        SlurmConfig.from_dict({"time": "soon", "nodes": 0, "sbatch_lines": ["--x\n#SBATCH --y"], "mem": "lots"})
    for problem in ("time: expected a Slurm time", "nodes: expected at least 1", "sbatch_lines: expected a list of "
                    "one-line strings", "mem: expected a size"):
        assert problem in str(refused.value)


def test_batch_script_launches_one_task_per_gpu_for_training_only(tmp_path):
    config = SlurmConfig.from_dict({"nodes": 2, "gpus_per_node": 4, "partition": "gpu", "time": "2-00:00:00",
                                    "sbatch_lines": ["--constraint=a100"], "setup": ["module load cuda"]})
    env = {"MLFLOW_RUN_ID": "abc"}
    training = batch_script(config, "python -m projects.pretrain --name x", env, tmp_path, "vf-pretrain", True)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --signal=USR1@300",
                 "#SBATCH --requeue", "#SBATCH --constraint=a100", "module load cuda", "export MLFLOW_RUN_ID=abc"):
        assert line in training.splitlines(), line
    assert "scontrol requeue" in training and "RANK=$SLURM_PROCID" in training
    single = batch_script(config, "python -m projects.heads", env, tmp_path, "vf-heads", False)
    assert "#SBATCH --nodes=1" in single and "#SBATCH --ntasks-per-node=1" in single
    assert "--gpus-per-node" not in single and "--signal" not in single


def test_every_slurm_state_the_issue_names_maps_to_an_mlflow_status():
    expected = {"PENDING": "SCHEDULED", "RUNNING": "RUNNING", "COMPLETED": "FINISHED", "FAILED": "FAILED",
                "CANCELLED": "KILLED", "TIMEOUT": "FAILED", "PREEMPTED": "KILLED", "NODE_FAIL": "FAILED",
                "OUT_OF_MEMORY": "FAILED"}
    assert {state: MLFLOW_STATUS[state] for state in expected} == expected


def test_mlflow_run_backend_slurm_trains_two_ddp_processes_and_registers(project, cluster, tmp_path):
    checkout, uri, client = project
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps(ONE_CORE | {"tasks_per_node": 2, "wait": True}))
    run = subprocess.run(["mlflow", "run", ".", "--env-manager", "local", "--backend", "slurm", "--backend-config",
                          str(config), "--experiment-name", "slurm", "-e", "pretrain", "-P", "name=slurm-ddp",
                          "-P", f"overrides={SHORT}"], cwd=checkout, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + cluster.logs()
    version = client.get_model_version("slurm-ddp-backbone", "1")
    trained = client.get_run(version.run_id)
    assert trained.info.status == "FINISHED"
    assert trained.data.tags["mlflow.project.backend"] == "slurm"
    assert trained.data.tags["vf.slurm.state"] == "COMPLETED"
    job = trained.data.tags["vf.slurm.job_id"]
    log = (checkout / "slurm-logs" / f"{job}.out").read_text()
    assert "it 6/6" in log and "batch 16" in log  # two processes of 8: one global batch
    logged = {f.path for f in client.list_artifacts(version.run_id, "slurm")}
    assert logged == {f"slurm/{version.run_id}.sbatch", f"slurm/{job}.out"}


def test_fsdp_job_warned_of_its_time_limit_requeues_and_finishes_in_the_same_run(project, cluster):
    checkout, uri, client = project
    submitted = _submit(project, "slurm-fsdp", "train.epochs=1 train.steps_per_epoch=12 train.batch_size=8 "
                        "train.log_every=1 train.eval_every=0 distribution.type=fsdp", tasks_per_node=2)
    _wait_for_line(submitted.log_path, "it 3/12")
    # What Slurm sends signal_before_limit_s before the time limit.
    cluster.run("scancel", "--signal=USR1", submitted.job_id)
    _wait_for_line(submitted.log_path, "requeueing job")
    deadline = time.monotonic() + 60
    while (status := submitted.get_status()) != "SCHEDULED":
        assert time.monotonic() < deadline, (status, open(submitted.log_path).read()[-3000:])
        time.sleep(0.5)
    assert client.get_run(submitted.run_id).info.status == "SCHEDULED"
    assert submitted.wait(), open(submitted.log_path).read()[-3000:]

    run = client.get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    assert "SIGUSR1 at iteration" in run.data.tags["vf.interrupted"]
    assert run.data.tags["vf.resumed_from"].endswith(submitted.run_id)
    steps = [m.step for m in client.get_metric_history(submitted.run_id, "total_loss")]
    assert sorted(steps) == list(range(1, 13))  # one unbroken history: every iteration once
    assert "(restart 1)" in open(submitted.log_path).read()
    versions = client.search_model_versions("name = 'slurm-fsdp-backbone'")
    assert [v.run_id for v in versions] == [submitted.run_id]


def test_scancel_ends_the_mlflow_run_killed(project, cluster):
    checkout, uri, client = project
    submitted = _submit(project, "slurm-cancel", "train.epochs=1 train.steps_per_epoch=2000 train.batch_size=8 "
                        "train.log_every=1 train.eval_every=0")
    _wait_for_line(submitted.log_path, "it 2/2000")
    cluster.run("scancel", submitted.job_id)
    assert not submitted.wait()
    run = client.get_run(submitted.run_id)
    assert run.info.status == "KILLED" and run.data.tags["vf.slurm.state"] == "CANCELLED"
    assert "SIGTERM at iteration" in run.data.tags["vf.interrupted"]  # it checkpointed on its way out


def test_a_job_slurm_refuses_fails_its_run_with_slurms_reason(project, cluster):
    checkout, uri, client = project
    experiment = mlflow.set_experiment("slurm").experiment_id
    run_id = client.create_run(experiment).info.run_id
    with pytest.raises(SlurmError, match="sbatch --parsable: .*[Ii]nvalid partition"):
        SlurmBackend().run(str(checkout), "pretrain", _params("nope", SHORT), None,
                           ONE_CORE | {"partition": "nope", "run_id": run_id}, uri, experiment)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "nope" in run.data.tags["vf.error"]


def test_portal_job_through_slurm_survives_a_portal_restart_and_cancels(project, cluster, tmp_path):
    from portal.app import Settings, create_app
    from portal.db import User, db

    checkout, uri, client = project
    site = tmp_path / "site.json"
    site.write_text(json.dumps(ONE_CORE))
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="t", tracking_uri=uri,
                        project_dir=checkout, run_jobs=True, job_backend="slurm", slurm_config=str(site))
    app = create_app(settings)
    with app.app_context():
        user = User(username="ana", is_admin=True)
        user.set_password("pw")
        db.session.add(user)
        db.session.commit()
    web = app.test_client()
    web.post("/api/login", json={"username": "ana", "password": "pw"})
    dataset = web.post("/api/datasets", json={"name": "demo", "prefix": "datasets/demo", "train_path": "data/demo/images/train",
                                              "validation_report": "data/demo/validation/report.json"}).json["id"]
    form = {"dataset_id": dataset, "name": "portal-slurm", "config": "configs/demo.yaml", "batch_size": "8",
            "epochs": "100", "distribution": "fsdp"}
    refused = web.post("/api/jobs", json=form)  # FSDP in one process cannot work: refused, not failed later
    assert refused.status_code == 400 and "fsdp shards over several processes" in refused.json["errors"]["distribution"]
    job = web.post("/api/jobs", json=form | {"processes_per_node": "2"}).json
    deadline = time.monotonic() + 240
    while "it 10/3000" not in ((state := web.get(f"/api/jobs/{job['id']}").json)["log_tail"] or ""):
        assert state["status"] in ("queued", "starting", "running") and time.monotonic() < deadline, state
        time.sleep(1)
    assert state["backend"] == "slurm" and state["scheduler_state"] == "RUNNING"
    assert client.get_run(state["mlflow_run_id"]).data.tags["vf.slurm.job_id"] == state["scheduler_id"]
    page = web.get(f"/jobs/{job['id']}").text
    assert state["scheduler_id"] in page and 'id="cancel"' in page
    app.extensions["vf.jobs"].stop()

    restarted = create_app(settings)  # a new portal process on the same database
    web = restarted.test_client()
    web.post("/api/login", json={"username": "ana", "password": "pw"})
    time.sleep(2)
    again = web.get(f"/api/jobs/{job['id']}").json
    assert again["status"] == "running" and again["scheduler_id"] == state["scheduler_id"]
    assert web.post(f"/api/jobs/{job['id']}/cancel", json={}).status_code == 200
    deadline = time.monotonic() + 120
    while (final := web.get(f"/api/jobs/{job['id']}").json)["status"] == "running":
        assert time.monotonic() < deadline, final
        time.sleep(1)
    assert final["status"] == "cancelled" and final["scheduler_state"] == "CANCELLED"
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"
    assert cluster.state(state["scheduler_id"]) == "CANCELLED"
    restarted.extensions["vf.jobs"].stop()
