"""``predict`` finds how to cut an input from the head's lineage, never from the user: what it refuses
before any work (a backbone, a head fitted on uncut images), cohorts, and the portal's predict form."""
import mlflow
import pytest
from mlflow import MlflowClient

from data.tiling import Tiling
from portal.jobs import FormErrors, PredictRequest, ProbeRequest, job_request, request_from_form
from projects.predict import PredictError, inputs_of, load_model
from projects.tracking import metric_key
from registry.lineage import Lineage


@pytest.fixture()
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _version(client, name: str, kind: str, tiling: str = "", parent: str = "scratch") -> str:
    with mlflow.start_run() as run:
        pass
    lineage = Lineage(kind=kind, source_run_id=run.info.run_id, parent=parent, data_path="data/x/images",
                      data_md5="m.dir", data_source="dvc.lock:generate", data_remote="", validation_suite="s",
                      validation_success=True, validation_report="r", git_commit="c" * 40, git_dirty=False,
                      config_sha256="s", tiling=tiling)
    client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run.info.run_id}/m", run.info.run_id, tags=lineage.tags()).version


def test_only_a_head_cut_from_slides_or_series_can_predict(client):
    _version(client, "x-backbone", "backbone")
    with pytest.raises(PredictError, match=r"model: models:/x-backbone/1 is a backbone; predict takes a head"):
        load_model("models:/x-backbone/1")
    _version(client, "x-head", "head", parent="models:/x-backbone/1")
    with pytest.raises(PredictError, match=r"models:/x-head/1 has no tiling in its lineage: it was fitted on data/x/images, "
                                           "which was not cut from slides or series"):
        load_model("models:/x-head/1")
    tiling = Tiling("ct", window=(40.0, 400.0), channels="single").to_json()
    _version(client, "y-head", "head", tiling=tiling)
    with pytest.raises(PredictError, match=r"models:/y-head/1 names no registered backbone \(scratch\)"):
        load_model("models:/y-head/1")


def test_a_cohort_is_a_list_of_inputs_or_a_folder_of_slides(tmp_path):
    listed = tmp_path / "cohort.txt"
    listed.write_text("# slides of study 7\ns3://pacs/a.svs\n\n/data/b.ndpi\n")
    assert inputs_of(str(listed)) == ["s3://pacs/a.svs", "/data/b.ndpi"]
    (tmp_path / "slides").mkdir()
    for name in ("b.svs", "a.svs", "notes.txt"):
        (tmp_path / "slides" / name).write_text("x")
    assert inputs_of(str(tmp_path / "slides")) == [str(tmp_path / "slides" / "a.svs"), str(tmp_path / "slides" / "b.svs")]
    (tmp_path / "series").mkdir()
    assert inputs_of(str(tmp_path / "series")) == [str(tmp_path / "series")]  # a folder without slides: one CT series
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(PredictError, match="lists no input"):
        inputs_of(str(tmp_path / "empty.txt"))


def test_category_names_become_metric_keys_mlflow_takes():
    assert metric_key("category.>400.sensitivity") == "category.gt400.sensitivity"
    assert metric_key("test.b&w.kappa") == "test.b_w.kappa"


def test_the_portal_predict_form_names_each_bad_field():
    with pytest.raises(FormErrors) as caught:
        request_from_form({"task": "predict", "dataset_id": "1", "head": "models:/x-backbone/1", "path": "../a.svs",
                           "score": "Agatston!"}, None, "local")
    assert set(caught.value.errors) == {"head", "path", "score"}
    request = request_from_form({"task": "predict", "dataset_id": "1", "head": "models:/colon-head@production",
                                 "path": "slides/a.svs", "score": "agatston"}, None, "local")
    assert isinstance(request, PredictRequest) and request.name == "colon" and request.entry_point == "predict"

    class Job:
        entry_point, parameters = "predict", request.to_dict()

    assert job_request(Job) == request
    evaluate = request_from_form({"task": "evaluate", "dataset_id": "1", "backbone": "models:/colon-backbone/2",
                                  "folds": "4"}, None, "local")
    assert isinstance(evaluate, ProbeRequest) and evaluate.folds == 4

    class Dataset:
        train_path, validation_report = "data/colon/tiles/shards/train", "data/colon/validation/report.json"

    assert evaluate.parameters(Dataset)["folds"] == "4"
    with pytest.raises(FormErrors, match="folds: expected 0"):
        request_from_form({"task": "evaluate", "dataset_id": "1", "backbone": "models:/colon-backbone/2", "folds": "1"},
                          None, "local")
