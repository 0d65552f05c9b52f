"""``predict`` finds how to cut an input from the head's lineage, never from the user: what it refuses
before any work (a backbone, a head fitted on uncut images), cohorts, and the portal's predict form."""
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from data.inputs import IngestError
from data.phantoms import blank, calcium, ct_series
from data.sources import cohort
from data.tiling import Tiling
from portal.jobs import FormErrors, PredictRequest, ProbeRequest, job_request, request_from_form
from projects.predict import PredictError, load_model
from projects.predict import main as predict_main
from projects.tracking import metric_key
from tests.test_registry import client, register  # noqa: F401  (the registry fixture)


def test_only_a_head_cut_from_slides_or_series_can_predict(client):  # noqa: F811
    register(client, "x-backbone", "backbone")
    with pytest.raises(PredictError, match=r"model: models:/x-backbone/1 is a backbone; predict takes a head"):
        load_model("models:/x-backbone/1")
    register(client, "x-head", "head", parent="models:/x-backbone/1")
    with pytest.raises(PredictError, match=r"models:/x-head/1 has no tiling in its lineage: it was fitted on data/x, "
                                           "which was not cut from slides or series"):
        load_model("models:/x-head/1")
    tiling = Tiling("ct", window=(40.0, 400.0), channels="single").to_json()
    register(client, "y-head", "head", tiling=tiling)
    with pytest.raises(PredictError, match=r"models:/y-head/1 names no registered backbone \(scratch\)"):
        load_model("models:/y-head/1")


def test_a_cohort_is_a_list_of_inputs_or_a_folder_of_slides(tmp_path):
    listed = tmp_path / "cohort.txt"
    listed.write_text("# slides of study 7\ns3://pacs/a.svs\n\n/data/b.ndpi\n")
    assert cohort(str(listed)) == ["s3://pacs/a.svs", "/data/b.ndpi"]
    (tmp_path / "slides").mkdir()
    for name in ("b.svs", "a.svs", "notes.txt"):
        (tmp_path / "slides" / name).write_text("x")
    assert cohort(str(tmp_path / "slides")) == [str(tmp_path / "slides" / "a.svs"), str(tmp_path / "slides" / "b.svs")]
    (tmp_path / "series").mkdir()
    assert cohort(str(tmp_path / "series")) == [str(tmp_path / "series")]  # a folder without slides: one CT series
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(IngestError, match="lists no input"):
        cohort(str(tmp_path / "empty.txt"))


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


def test_a_score_is_evaluated_against_reference_categories_over_a_cohort(client, tmp_path):  # noqa: F811
    """Three series scored in threshold-only mode under one parent run, their Agatston category against
    a reference category per patient, as the paper's Table 3 reports it (quadratic-weighted kappa)."""
    heart = tmp_path / "heart.npy"
    calcium(tmp_path / "a")  # 122: 101-400
    ct_series(tmp_path / "b" / "series", [blank(), blank()])  # 0: 0-10
    dense = blank()
    dense[10:31, 10:31] = 450  # 21 x 21 px of 0.25 mm² = 110.25 mm² x 4 = 441: >400
    ct_series(tmp_path / "c" / "series", [dense])
    inputs = [str(tmp_path / name / "series") for name in "abc"]
    (tmp_path / "cohort.txt").write_text("\n".join(inputs))
    reference = tmp_path / "reference.csv"
    reference.write_text("input,category\n" + "\n".join(f"{i},{c}" for i, c in zip(inputs, ["101-400", "0-10", "101-400"])))
    # The phantom's vertebra sits below row 50: every series' region stays above it.
    mask = np.zeros((64, 64), bool)
    mask[:44] = True
    np.save(heart, mask)
    argv = ["--input", str(tmp_path / "cohort.txt"), "--score", "agatston", "--region", str(heart),
            "--reference", str(reference), "--out", str(tmp_path / "out")]
    assert predict_main(argv) == 0
    [parent] = client.search_runs([client.get_experiment_by_name("scores").experiment_id],
                                  "tags.`mlflow.parentRunId` IS NULL")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.metrics["agatston.total"] for c in children) == [0.0, 122.0, 441.0]
    expected = cohen_kappa_score([2, 0, 2], [2, 0, 3], labels=[0, 1, 2, 3], weights="quadratic")
    assert parent.data.metrics["reference.category.kappa"] == pytest.approx(expected)
    assert parent.data.metrics["reference.category.101-400.sensitivity"] == 0.5
    assert parent.data.metrics["reference.category.gt400.ppv"] == 0.0
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"cohort.csv", "table3.md"}
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"input,category\n{inputs[0]},high\n")
    assert predict_main([*argv[:-4], "--reference", str(wrong), "--out", str(tmp_path / "out")]) == 2
