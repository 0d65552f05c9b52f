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

from data.phantoms import blank, calcium, ct_series
from projects.slurm import MLFLOW_STATUS, SlurmBackend, SlurmConfig, SlurmError, batch_script
from tests.conftest import portal_with_demo_dataset, tiny_overrides
from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

# Processes of one core each (the node has two).
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


def test_config_errors_name_their_keys():
    with pytest.raises(SlurmError) as refused:
        SlurmConfig.from_dict({"gpu": 4, "nodes": "two"})
    assert "gpu: unknown key" in str(refused.value) and "nodes: expected int, got 'two'" in str(refused.value)
    with pytest.raises(SlurmError) as refused:
        SlurmConfig.from_dict({"time": "soon", "nodes": 0, "sbatch_lines": ["--x\n#SBATCH --y"], "mem": "lots"})
    for problem in ("time: expected a Slurm time", "nodes: expected at least 1", "sbatch_lines: expected a list of "
                    "one-line strings", "mem: expected a size"):
        assert problem in str(refused.value)
    # Digits of other scripts are digits to Python's \\d, not to Slurm.
    with pytest.raises(SlurmError) as refused:
        SlurmConfig.from_dict({"time": "١٢:٠٠:٠٠", "mem": "٦٤G", "partition": "gpu١"})
    for problem in ("time: expected a Slurm time", "mem: expected a size", "partition: expected letters"):
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
    cohort = batch_script(config, "python -m projects.predict --input c.txt", env, tmp_path, "vf-predict", False, array=3)
    assert "#SBATCH --array=0-2" in cohort and f"#SBATCH --output={tmp_path}/slurm-logs/%A_%a.out" in cohort
    gather = batch_script(config, "python -m projects.predict --gather", env, tmp_path, "vf-predict", False, after="41")
    assert "#SBATCH --dependency=afterany:41" in gather and "--array" not in gather


def test_every_slurm_state_the_issue_names_maps_to_an_mlflow_status():
    expected = {"PENDING": "SCHEDULED", "RUNNING": "RUNNING", "COMPLETED": "FINISHED", "FAILED": "FAILED",
                "CANCELLED": "KILLED", "TIMEOUT": "FAILED", "PREEMPTED": "KILLED", "NODE_FAIL": "FAILED",
                "OUT_OF_MEMORY": "FAILED"}
    assert {state: MLFLOW_STATUS[state] for state in expected} == expected


def test_fsdp_run_warned_of_its_time_limit_requeues_and_finishes_in_the_same_mlflow_run(project, cluster, tmp_path):
    """`mlflow run --backend slurm`: two FSDP processes under srun; the time-limit warning makes them
    checkpoint, the job requeues itself and continues the same run, which registers the backbone."""
    checkout, uri, client = project
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps(ONE_CORE | {"tasks_per_node": 2, "wait": True}))
    overrides = tiny_overrides(epochs=1, steps_per_epoch=12, log_every=1) + " distribution.type=fsdp"
    launch = subprocess.Popen(["mlflow", "run", ".", "--env-manager", "local", "--backend", "slurm", "--backend-config",
                               str(config), "--experiment-name", "slurm", "-e", "pretrain", "-P", "name=slurm-fsdp",
                               "-P", f"overrides={overrides}"], cwd=checkout, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (logs := list((checkout / "slurm-logs").glob("*.out"))) or "it 3/12" not in logs[-1].read_text():
        assert launch.poll() is None and time.monotonic() < deadline, launch.stdout.read()[-3000:] + cluster.logs()
        time.sleep(0.5)
    job = logs[-1].stem
    cluster.run("scancel", "--signal=USR1", job)  # what Slurm sends signal_before_limit_s before the limit
    output, _ = launch.communicate(timeout=400)
    assert launch.returncode == 0, output[-3000:] + logs[-1].read_text()[-3000:]

    run = client.get_run(client.get_model_version("slurm-fsdp-backbone", "1").run_id)
    log = logs[-1].read_text()
    assert "requeueing job" in log and "(restart 1)" in log and "batch 16" in log  # two processes of 8
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.backend"] == "slurm" and run.data.tags["vf.slurm.job_id"] == job
    assert run.data.tags["vf.slurm.state"] == "COMPLETED"
    assert "SIGUSR1 at iteration" in run.data.tags["vf.interrupted"]
    assert run.data.tags["vf.resumed_from"].endswith(run.info.run_id)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "total_loss")]
    assert sorted(steps) == list(range(1, 13))  # one unbroken history: every iteration once
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "slurm")}
    assert logged == {f"slurm/{run.info.run_id}.sbatch", f"slurm/{job}.out"}


def test_a_cohort_runs_as_one_job_array_gathered_under_one_run(project, cluster, tmp_path):
    """`predict` over a cohort of two CT series: one array task per series, each a child run, then one
    job that gathers them into the parent run's cohort table and ends it."""
    checkout, uri, client = project
    inputs = [calcium(tmp_path / "a") / "series", ct_series(tmp_path / "b" / "series", [blank(), blank()])]
    (tmp_path / "cohort.txt").write_text("\n".join(map(str, inputs)))
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps(ONE_CORE | {"wait": True}))
    done = subprocess.run(["mlflow", "run", ".", "--env-manager", "local", "--backend", "slurm", "--backend-config",
                           str(config), "--experiment-name", "cohorts", "-e", "predict", "-P",
                           f"input={tmp_path / 'cohort.txt'}", "-P", "score=agatston", "-P",
                           f"region={tmp_path / 'a' / 'heart.npy'}"], cwd=checkout,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + cluster.logs()
    experiment = client.get_experiment_by_name("cohorts").experiment_id
    [parent] = client.search_runs([experiment], "tags.`vf.slurm.array_job_id` != ''")
    assert parent.info.status == "FINISHED" and parent.data.tags["vf.slurm.state"] == "COMPLETED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.info.status, c.data.metrics["agatston.total"]) for c in children) == [("FINISHED", 0.0),
                                                                                           ("FINISHED", 122.0)]
    table = client.download_artifacts(parent.info.run_id, "cohort.csv", str(tmp_path))
    assert len(open(table).read().splitlines()) == 3
    array = parent.data.tags["vf.slurm.array_job_id"]
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "slurm")} >= {
        f"slurm/{parent.info.run_id}.array.sbatch", f"slurm/{parent.info.run_id}.sbatch"}
    assert sorted(p.name for p in (checkout / "slurm-logs").glob(f"{array}_*.out")) == [f"{array}_0.out", f"{array}_1.out"]


def test_a_job_slurm_refuses_fails_its_run_with_slurms_reason(project, cluster):
    checkout, uri, client = project
    experiment = mlflow.set_experiment("slurm").experiment_id
    run_id = client.create_run(experiment).info.run_id
    with pytest.raises(SlurmError, match="sbatch --parsable: .*[Ii]nvalid partition"):
        SlurmBackend().run(str(checkout), "pretrain", {"name": "nope"}, None,
                           ONE_CORE | {"partition": "nope", "run_id": run_id}, uri, experiment)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "nope" in run.data.tags["vf.error"]


def test_portal_job_through_slurm_survives_a_portal_restart_and_cancels(project, cluster, tmp_path):
    from portal.app import Settings, create_app

    checkout, uri, client = project
    site = tmp_path / "site.json"
    site.write_text(json.dumps(ONE_CORE))
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="t", tracking_uri=uri,
                        project_dir=checkout, run_jobs=True, job_backend="slurm", slurm_config=str(site))
    app, web, dataset = portal_with_demo_dataset(settings)
    form = {"dataset_id": dataset, "name": "portal-slurm", "config": "configs/demo.yaml", "batch_size": "8",
            "epochs": "100", "distribution": "fsdp"}
    refused = web.post("/api/jobs", json=form)  # FSDP in one process cannot work: refused, not failed later
    assert refused.status_code == 400 and "fsdp shards over several processes" in refused.json["errors"]["distribution"]
    unplaceable = web.post("/api/jobs", json=form | {"gpus_per_node": "1", "distribution": "ddp"}).json  # sbatch refuses: no GPU here
    deadline = time.monotonic() + 60
    while (failed := web.get(f"/api/jobs/{unplaceable['id']}").json)["status"] in ("queued", "starting"):
        assert time.monotonic() < deadline, failed
        time.sleep(0.5)
    assert failed["status"] == "failed" and "Invalid generic resource" in failed["log_tail"], failed
    assert client.get_run(failed["mlflow_run_id"]).info.status == "FAILED"
    job = web.post("/api/jobs", json=form | {"processes_per_node": "2", "distribution": "ddp"}).json
    deadline = time.monotonic() + 240
    while "it 10/3000" not in ((state := web.get(f"/api/jobs/{job['id']}").json)["log_tail"] or ""):
        assert state["status"] in ("queued", "starting", "running") and time.monotonic() < deadline, state
        time.sleep(1)
    assert state["backend"] == "slurm" and state["scheduler_state"] == "RUNNING"
    assert "batch 16" in state["log_tail"]  # DDP: two srun tasks of 8
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
    # The portal's cancel is scancel: SIGTERM, a checkpoint at that iteration, the run KILLED.
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "KILLED" and "SIGTERM at iteration" in run.data.tags["vf.interrupted"]
    assert cluster.state(state["scheduler_id"]) == "CANCELLED"
    restarted.extensions["vf.jobs"].stop()
