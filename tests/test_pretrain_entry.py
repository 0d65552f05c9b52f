import os
import signal
import subprocess

import pytest
from mlflow import MlflowClient

from data.shards import pack_folder
from data.validate import validate_dataset
from projects.pretrain import eval_split
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_online_knn_split_is_the_one_given_or_the_val_beside_train(tiles, tmp_path):
    assert eval_split(str(tiles / "train"), "") == tiles / "val"
    assert eval_split(str(tiles / "train"), str(tiles / "train")) == tiles / "train"
    assert eval_split(str(tiles / "val"), "") is None  # not a train folder: no guess
    with pytest.raises(FileNotFoundError, match="eval_data: .* is not a directory"):
        eval_split(str(tiles / "train"), str(tmp_path / "missing"))


def test_a_val_split_unlike_the_training_classes_is_not_guessed(tiles, tmp_path):
    (tmp_path / "train" / "only").mkdir(parents=True)
    (tmp_path / "val" / "only").mkdir(parents=True)
    for split in ("train", "val"):
        png = next((tiles / split).rglob("*.png"))
        (tmp_path / split / "only" / png.name).write_bytes(png.read_bytes())
    assert eval_split(str(tmp_path / "train"), "") is None  # one class: nothing to classify


def _sharded_demo(checkout, root):
    """The demo tiles packed into shards, validated and versioned in a DVC repository of their own."""
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, check=True)
    dataset = root / "data" / "sharded"
    for split in ("train", "val"):
        pack_folder(checkout / "data/demo/images" / split, dataset / "shards" / split, max_bytes=64 << 10)
    report, _ = validate_dataset(dataset, "image_tiles_rgb", {"tile_size": 32}, root / "gx")
    assert report.success and report.shards["checked"] > 4
    report.write(dataset / "validation" / "report.json")
    subprocess.run(["dvc", "add", "-q", "data/sharded/shards"], cwd=root, check=True)
    return dataset / "shards" / "train", dataset / "validation" / "report.json"


def test_a_stopped_local_run_resumes_in_the_same_mlflow_run(validated_checkout, tmp_path):
    """Two processes (torchrun) stopped by SIGTERM mid-run, streaming shards; `resume_from`
    continues that MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    overrides = tiny_overrides(epochs=1, steps_per_epoch=10, log_every=1)
    (tmp_path / "data").mkdir()
    train, report = _sharded_demo(validated_checkout, tmp_path / "data")
    launch = ["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "resume", "-e", "pretrain",
              "-P", "name=resumed", "-P", f"overrides={overrides}", "-P", f"data={train}",
              "-P", f"validation_report={report}"]
    first = subprocess.Popen([*launch, "-P", "processes=2"], cwd=validated_checkout, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "it 3/10" in line:
            os.killpg(first.pid, signal.SIGTERM)
            break
    first.wait(timeout=120)
    log = "".join(seen) + first.stdout.read()
    assert "batch 16" in log, log[-3000:]  # two processes
    client = MlflowClient(uri)
    (stopped,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert stopped.info.status == "KILLED" and "SIGTERM at iteration" in stopped.data.tags["vf.interrupted"]

    resumed = subprocess.run([*launch, "-P", f"resume_from=outputs/pretrain/{stopped.info.run_id}"],
                             cwd=validated_checkout, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run = client.get_run(stopped.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "total_loss")]
    assert sorted(steps) == list(range(1, 11))  # one history, every iteration once
    launcher = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert [r.data.tags["vf.continued_in"] for r in launcher] == [run.info.run_id]
    assert client.get_model_version("resumed-backbone", "1").run_id == run.info.run_id
    assert run.data.tags["data.shards"].endswith(" shards, 400 tiles")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "attention")} >= {"attention/glands_pca.png"}


def test_a_user_error_after_the_run_started_is_one_line_and_fails_the_run(validated_checkout, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    failed = subprocess.run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "bad", "-e", "pretrain",
                             "-P", "name=bad", "-P", f"overrides={tiny_overrides(batch_size=100000)}"],
                            cwd=validated_checkout, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "pretrain: train.batch_size=100000 is larger than the dataset" in failed.stderr
    assert "Traceback" not in failed.stderr.split("pretrain: train.batch_size")[0]  # ours is a line, not a traceback
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["vf.error"].startswith("train.batch_size=100000 is larger than the dataset")
    assert run.data.tags["mlflow.note.content"].startswith("**Failed:** train.batch_size=100000")
