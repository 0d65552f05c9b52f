"""The portal's JSON API with Flask's test client, against a real S3 server (SeaweedFS, which checks
signatures) and a real SQLite registry; the pages in headless Chromium (Playwright) with checked screenshots."""
import functools
import re
import threading
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from werkzeug.serving import make_server

from data.report import Failure, ValidationReport
from data.shards import pack_folder
from portal.app import Settings, create_app
from portal.db import AuditEvent, Dataset, Group, Job, ModelFamily, SignInFailures, User, db
from portal.jobs import FormErrors, ProbeRequest, job_request
from registry.mlflow_service import Tag
from tests.conftest import BUCKET, REPO
from tests.test_registry import register

PASSWORD = "correct horse"
# An evaluation as `evaluate` records it, random-init baseline included.
# The promotion service's evaluation of a version, as its ledger records it (``registry.evidence``).
EVALUATED = {"knn.accuracy": 0.9, "linear.accuracy": 0.9, "random_init.knn.accuracy": 0.5}
HEAD_EVALUATED = {"head.accuracy": 0.9}


@pytest.fixture(scope="module")
def project(tiles, tmp_path_factory) -> Path:
    """The project jobs run in: the repository's configs, and the demo dataset where the README
    puts it, built and validated."""
    root = tmp_path_factory.mktemp("project")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "data" / "demo").mkdir(parents=True)
    (root / "data" / "demo" / "images").symlink_to(tiles)
    ValidationReport("image_tiles_rgb", "data/demo/images", True, 64, 12).write(root / "data/demo/validation/report.json")
    return root


@pytest.fixture()
def app(tmp_path, s3, s3_endpoint, monkeypatch, project, mlflow_store):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    tracking = mlflow_store
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="test", bucket=BUCKET,
                        s3_endpoint_url=s3_endpoint, presign_expires_s=120, tracking_uri=tracking,
                        mlflow_ui_url="http://mlflow.test", project_dir=project, run_jobs=False)
    app = create_app(settings)
    with app.app_context():
        users = {name: User(username=name, is_admin=name == "ana", can_promote=name == "dan")
                 for name in ("ana", "bob", "cara", "dan")}
        for user in users.values():
            user.password_hash = _password_hash()
        users["cara"].groups.append(Group(name="pathology"))
        db.session.add_all(users.values())
        db.session.commit()
    mlflow.set_tracking_uri(tracking)
    yield app
    mlflow.set_tracking_uri(None)


@functools.cache
def _password_hash() -> str:
    """PASSWORD's hash, made once as ``User.set_password`` makes it: a hash is a tenth of a second,
    four users a test."""
    user = User(username="any")
    user.set_password(PASSWORD)
    return user.password_hash


def signed_in(app, username):
    client = app.test_client()
    response = client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.json
    return client


def test_the_login_form_needs_its_token_and_sends_people_only_within_the_site(app):
    # A cross-site form posts without the session's token: login CSRF.
    assert app.test_client().post("/login", data={"username": "ana", "password": PASSWORD}).status_code == 400
    for target, lands in [("/%09/evil.example", "/datasets"), ("/%5Cevil.example", "/datasets"),
                          ("//evil.example", "/datasets"), ("https://evil.example", "/datasets"), ("/jobs", "/jobs")]:
        browser = app.test_client()
        browser.get("/login")
        with browser.session_transaction() as session:
            token = session["csrf_token"]
        answer = browser.post(f"/login?next={target}", data={"username": "ana", "password": PASSWORD, "csrf_token": token})
        assert answer.status_code == 302 and answer.headers["Location"] == lands, (target, answer.headers["Location"])


def make_dataset(admin, name="colon", prefix="datasets/colon", **extra):
    response = admin.post("/api/datasets", json={"name": name, "prefix": prefix, **extra})
    assert response.status_code == 201, response.json
    return response.json["id"]


def test_sign_in_is_required_and_failures_are_audited(app):
    anonymous = app.test_client()
    assert anonymous.get("/api/datasets").status_code == 401
    assert anonymous.get("/datasets").status_code == 302
    assert anonymous.post("/api/login", json={"username": "bob", "password": "guess"}).status_code == 401
    assert anonymous.post("/api/datasets", data={"name": "x"}).status_code == 415  # no cross-site form posts
    events = signed_in(app, "ana").get("/api/audit").json
    assert {(e["action"], e["user"], e["outcome"]) for e in events} >= {("login", "bob", "denied"), ("login", "ana", "ok")}


def test_least_privilege_three_tiers_and_groups(app):
    admin, bob, cara = signed_in(app, "ana"), signed_in(app, "bob"), signed_in(app, "cara")
    colon = make_dataset(admin)
    assert bob.get("/api/datasets").json == []
    assert bob.get(f"/api/datasets/{colon}/objects").status_code == 404  # no grant: it does not exist for bob
    assert bob.post(f"/api/datasets/{colon}/download-url", json={"path": "a.svs"}).status_code == 404

    admin.post(f"/api/datasets/{colon}/grants", json={"user": "bob", "level": "read"})
    assert [d["level"] for d in bob.get("/api/datasets").json] == ["read"]
    assert bob.post(f"/api/datasets/{colon}/download-url", json={"path": "a.svs"}).status_code == 200
    refused = bob.post(f"/api/datasets/{colon}/upload-url", json={"path": "a.svs"})
    assert refused.status_code == 403 and "bob needs write on dataset colon (holds read)" in refused.json["error"]
    assert bob.get(f"/api/datasets/{colon}/grants").status_code == 403

    admin.post(f"/api/datasets/{colon}/grants", json={"user": "bob", "level": "manage"})
    assert bob.post(f"/api/datasets/{colon}/upload-url", json={"path": "a.svs"}).status_code == 200
    granted = bob.post(f"/api/datasets/{colon}/grants", json={"group": "pathology", "level": "read"})
    assert granted.status_code == 201
    assert [d["level"] for d in cara.get("/api/datasets").json] == ["read"]  # through her group
    bob.delete(f"/api/datasets/{colon}/grants/{granted.json['id']}")
    assert cara.get("/api/datasets").json == []
    bad = admin.post(f"/api/datasets/{colon}/grants", json={"user": "bob", "level": "owner"})
    assert bad.status_code == 400 and "level: expected one of ['read', 'write', 'manage']" in bad.json["error"]
    assert bob.post("/api/datasets", json={"name": "mine", "prefix": "datasets/mine"}).status_code == 403


def test_presigned_urls_move_bytes_directly_scoped_to_one_object(app, s3):
    admin = signed_in(app, "ana")
    colon = make_dataset(admin)
    make_dataset(admin, "colon-secret", "datasets/colon-secret")
    admin.post(f"/api/datasets/{colon}/grants", json={"user": "bob", "level": "write"})
    bob = signed_in(app, "bob")

    signed = bob.post(f"/api/datasets/{colon}/upload-url", json={"path": "slides/case 1.svs"}).json
    assert signed["key"] == "datasets/colon/slides/case 1.svs" and signed["method"] == "PUT"
    assert signed["expires_in"] == 120 and "X-Amz-Expires=120" in signed["url"]
    assert httpx.put(signed["url"], content=b"slide bytes").status_code == 200
    assert s3.get_object(Bucket=BUCKET, Key="datasets/colon/slides/case 1.svs")["Body"].read() == b"slide bytes"
    download = bob.post(f"/api/datasets/{colon}/download-url", json={"path": "slides/case 1.svs"}).json["url"]
    assert httpx.get(download).content == b"slide bytes"
    # One object, one method: the S3 server refuses the URL for any other key, method or expiry.
    url = httpx.URL(download)
    assert url.path == f"/{BUCKET}/datasets/colon/slides/case 1.svs" and url.params["X-Amz-SignedHeaders"] == "host"
    assert httpx.get(download.replace("case%201.svs", "case%202.svs")).status_code == 403
    assert httpx.get(str(url.copy_set_param("X-Amz-Expires", "604800"))).status_code == 403
    assert httpx.put(download, content=b"overwrite").status_code == 403
    assert httpx.get(download.replace("datasets/colon/", "datasets/colon-secret/")).status_code == 403
    assert s3.get_object(Bucket=BUCKET, Key="datasets/colon/slides/case 1.svs")["Body"].read() == b"slide bytes"
    assert [o["path"] for o in bob.get(f"/api/datasets/{colon}/objects").json] == ["slides/case 1.svs"]
    page = bob.get(f"/datasets/{colon}/download?path=slides/case%201.svs")
    assert page.status_code == 302 and page.location.startswith(app.extensions["vf.settings"].s3_endpoint_url)
    # The raw store is where patients are named: each download (API and page) is in the audit log.
    downloads = [(e["user"], e["target"]) for e in admin.get("/api/audit").json if e["action"] == "object.download"]
    assert downloads == [("bob", f"s3://{BUCKET}/datasets/colon/slides/case 1.svs")] * 2


@pytest.mark.parametrize("path", ["../colon-secret/report.pdf", "/etc/passwd", "slides/../../colon-secret/x",
                                  "%2e%2e/colon-secret/x", "slides\\..\\x", "", "slides//x", "./x", "a/\x00",
                                  "slides/a.svs\n", "slides/a.svs%0A", "x" * 256, "a/" * 600])
def test_path_tricks_never_leave_the_prefix(app, path):
    admin = signed_in(app, "ana")
    colon = make_dataset(admin)
    response = admin.post(f"/api/datasets/{colon}/upload-url", json={"path": path})
    assert response.status_code == 400 and response.json["error"].startswith("path:")


def test_dataset_names_and_prefixes_fit_their_columns(app):
    admin = signed_in(app, "ana")
    for body, field in [({"name": "n" * 65, "prefix": "datasets/long-name"}, "name"),
                        ({"name": "x\ny", "prefix": "datasets/newline"}, "name"),
                        ({"name": "deep", "prefix": "/".join(["segment"] * 70)}, "prefix")]:
        response = admin.post("/api/datasets", json=body)
        assert response.status_code == 400 and response.json["error"].startswith(f"{field}:"), response.json


def test_a_dataset_is_registered_only_with_data_that_exists_and_passed_validation(app, project):
    admin = signed_in(app, "ana")
    report = "data/demo/validation/report.json"
    failed = ValidationReport("image_tiles_rgb", "data/demo/images", False, 64, 12, failures=[
        Failure("expect_column_values_to_be_between", "pixel_std", 2, ["a.png", "b.png"])])
    failed.write(project / "data/demo/validation/failed.json")
    for fields, field, error in (
        ({"train_path": "data/nowhere/train", "validation_report": report}, "train_path",
         f"{project}/data/nowhere/train: dataset directory not found"),
        ({"train_path": "data/demo/images/train"}, "train_path", "data/demo/images/train needs its validation_report"),
        ({"train_path": "data/demo/images/train", "validation_report": "data/demo/validation/none.json"},
         "validation_report", "data/demo/validation/none.json is not a readable report"),
        ({"train_path": "data/demo/images/train", "validation_report": "data/demo/validation/failed.json"},
         "validation_report", "says the data failed (expect_column_values_to_be_between(pixel_std))"),
        ({"validation_report": report}, "train_path", "a validation report belongs to a training path"),
    ):
        response = admin.post("/api/datasets", json={"name": "colon", "prefix": "datasets/colon", **fields})
        message = response.json["error"]
        assert response.status_code == 400 and message.startswith(f"{field}: ") and error in message, message
    assert admin.post("/api/datasets", json={"name": "colon", "prefix": "datasets/colon"}).status_code == 201
    # A split of shards is a training path like a folder.
    pack_folder(project / "data/demo/images/train", project / "data/shards/train", max_bytes=8 << 10)
    assert make_dataset(admin, "sharded", "datasets/sharded", train_path="data/shards/train", validation_report=report)


def test_dataset_prefixes_cannot_nest(app):
    admin = signed_in(app, "ana")
    make_dataset(admin)
    for prefix in ("datasets/colon/private", "datasets", "datasets/colon/"):
        response = admin.post("/api/datasets", json={"name": f"n{len(prefix)}", "prefix": prefix})
        assert response.status_code == 400 and "overlaps the prefix of an existing dataset" in response.json["error"]


def test_training_form_is_validated_field_by_field_and_queued(app):
    admin = signed_in(app, "ana")
    colon = make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    bad = admin.post("/api/jobs", json={"dataset_id": colon, "name": "Colon ViT", "config": "configs/nope.yaml",
                                        "strategy": "distill", "lora_rank": "0", "lr": "fast", "distribution": "mpi"})
    assert bad.status_code == 400
    assert set(bad.json["errors"]) == {"name", "config", "teachers", "lora_rank", "lr", "distribution"}
    assert bad.json["errors"]["lr"] == "expected a number, got 'fast'"
    too_deep = admin.post("/api/jobs", json={"dataset_id": colon, "name": "colon", "config": "configs/demo.yaml",
                                             "strategy": "freeze", "freeze_blocks": "9"})
    assert too_deep.status_code == 400 and "student.freeze_blocks" in too_deep.json["errors"]["config"]

    form = {"dataset_id": colon, "name": "colon", "config": "configs/demo.yaml", "strategy": "lora", "lora_rank": "4",
            "lora_alpha": "8", "distribution": "fsdp", "batch_size": "16", "lr": "0.001"}
    # FSDP in one process would only fail once it ran; this portal's local backend has one node.
    alone = admin.post("/api/jobs", json=form)
    assert alone.status_code == 400 and "fsdp shards over several processes" in alone.json["errors"]["distribution"]
    nodes = admin.post("/api/jobs", json=form | {"nodes": "2", "processes_per_node": "2", "time_limit": "soon"})
    assert nodes.status_code == 400 and set(nodes.json["errors"]) == {"nodes", "time_limit"}
    job = admin.post("/api/jobs", json=form | {"processes_per_node": "2"})
    assert job.status_code == 201 and job.json["status"] == "queued"
    expected = {"strategy": "lora", "lora_rank": 4, "distribution": "fsdp", "processes_per_node": 2}
    assert job.json["parameters"] | expected == job.json["parameters"]
    assert "freeze_blocks" not in job.json["parameters"] and "teachers" not in job.json["parameters"]  # not LoRA's
    trial = admin.post("/api/jobs", json={"dataset_id": colon, "name": "trial", "config": "configs/demo.yaml",
                                          "steps_per_epoch": "5", "epochs": "1"})
    assert trial.status_code == 201 and "lora_rank" not in trial.json["parameters"]
    with app.app_context():
        assert "train.steps_per_epoch=5" in job_request(db.session.get(Job, trial.json["id"])).overrides()
    assert admin.post("/api/jobs", json={"dataset_id": colon, "name": "trial", "config": "configs/demo.yaml",
                                         "steps_per_epoch": "-1"}).json["errors"]["steps_per_epoch"]
    assert [j["id"] for j in admin.get("/api/jobs").json] == [trial.json["id"], job.json["id"]]
    assert signed_in(app, "bob").get(f"/api/jobs/{job.json['id']}").status_code == 404  # not bob's job


def test_heads_and_evaluate_jobs_name_a_registered_backbone_of_a_family_their_owner_shares(app):
    admin = signed_in(app, "ana")
    colon = make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    with app.app_context():
        db.session.add(ModelFamily(name="colon", owner="dan"))
        db.session.commit()
    version = register(MlflowClient(), "colon-backbone", evaluated=EVALUATED)
    for user in ("bob", "dan"):
        admin.post(f"/api/datasets/{colon}/grants", json={"user": user, "level": "read"})
    dan = signed_in(app, "dan")
    bad = dan.post("/api/jobs", json={"task": "heads", "dataset_id": colon, "backbone": "/data/weights", "knn_k": "0",
                                      "time_limit": "soon"})
    assert bad.status_code == 400 and set(bad.json["errors"]) == {"backbone", "knn_k", "time_limit"}
    assert dan.post("/api/jobs", json={"task": "fit", "dataset_id": colon}).json["errors"] == {
        "task": "expected one of ['train', 'heads', 'evaluate', 'predict'], got 'fit'"}
    missing = dan.post("/api/jobs", json={"task": "evaluate", "dataset_id": colon, "backbone": "models:/colon-backbone/9"})
    assert missing.status_code == 400 and "models:/colon-backbone/9" in missing.json["errors"]["backbone"]
    # bob shares nothing of colon: he may not write a head into it, nor evaluation tags on its backbone.
    for task in ("heads", "evaluate"):
        form = {"task": task, "dataset_id": colon, "backbone": f"models:/colon-backbone/{version}"}
        refused = signed_in(app, "bob").post("/api/jobs", json=form)
        assert refused.status_code == 403 and "'colon' belongs to dan" in refused.json["error"]
        job = dan.post("/api/jobs", json=form | {"knn_k": "5"})
        assert job.status_code == 201 and job.json["entry_point"] == task, job.json
        assert job.json["parameters"] == {"dataset_id": colon, "task": task, "backbone": f"models:/colon-backbone/{version}",
                                          "knn_k": 5, "time_limit": "", "folds": 0}
    with app.app_context():
        heads, evaluate = db.session.scalars(db.select(Job).where(Job.owner == "dan").order_by(Job.id)).all()
        assert job_request(heads).parameters(heads.dataset) == {
            "data": "data/demo/images", "validation_report": "data/demo/validation/report.json", "knn_k": "5",
            "masks": "", "targets": "", "target_column": "", "name": "colon",
            "backbone": f"models:/colon-backbone/{version}"}
        assert job_request(evaluate).parameters(evaluate.dataset)["model"] == f"models:/colon-backbone/{version}"
    with pytest.raises(FormErrors, match="its train_path 'data/flat' is not a folder named train"):
        ProbeRequest.splits(Dataset(name="flat", train_path="data/flat"))

    # Predict: a head of the family over an object of a dataset the user may read, as an s3:// input.
    head = register(MlflowClient(), "colon-head", "head", parent=f"models:/colon-backbone/{version}")
    form = {"task": "predict", "dataset_id": colon, "head": f"models:/colon-head/{head}", "path": "slides/case 7.svs"}
    bad = dan.post("/api/jobs", json=form | {"head": f"models:/colon-backbone/{version}", "path": "../x.svs"})
    assert bad.status_code == 400 and set(bad.json["errors"]) == {"head", "path"}
    assert signed_in(app, "bob").post("/api/jobs", json=form).status_code == 403  # not his family
    assert signed_in(app, "cara").post("/api/jobs", json=form).status_code == 404  # no grant on the dataset
    job = dan.post("/api/jobs", json=form)
    assert job.status_code == 201 and job.json["entry_point"] == "predict", job.json
    with app.app_context():
        queued = db.session.get(Job, job.json["id"])
        prefix = queued.dataset.prefix
        assert job_request(queued).parameters(queued.dataset) == {
            "model": f"models:/colon-head/{head}", "input": f"s3://{BUCKET}/{prefix}slides/case 7.svs", "score": ""}


def test_registry_promotion_and_rollback_go_through_the_gates_and_are_audited(app):
    with app.app_context():  # trained outside the portal: an administrator gave the family to dan
        db.session.add(ModelFamily(name="p", owner="dan"))
        db.session.commit()
    client = MlflowClient()
    v1 = register(client, "p-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.8, "linear.accuracy": 0.8})
    v2 = register(client, "p-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.9, "linear.accuracy": 0.9})
    head = register(client, "p-head", "head", evaluated=HEAD_EVALUATED, parent=f"models:/p-backbone/{v2}")
    bob, dan = signed_in(app, "bob"), signed_in(app, "dan")
    assert bob.post("/api/models/p-backbone/promote", json={"version": v1, "alias": "production"}).status_code == 403
    early = dan.post("/api/models/p-head/promote", json={"version": head, "alias": "production", "reason": "r"})
    assert early.status_code == 400 and early.json["gate"] == "parent promoted"
    for version in (v1, v2):
        assert dan.post("/api/models/p-backbone/promote", json={"version": version, "alias": "production",
                                                                  "reason": "better"}).status_code == 200
    model = bob.get("/api/models/p-backbone").json
    assert [v["aliases"] for v in model["versions"]] == [["production"], []]
    assert "models:/p-backbone/2 @production (backbone)" in model["lineage"]["2"]
    back = dan.post("/api/models/p-backbone/rollback", json={"alias": "production", "reason": "scanner B"})
    assert back.status_code == 200 and back.json["version"] == v1 and back.json["user"] == "dan"
    assert [m["name"] for m in bob.get("/api/models").json] == ["p-backbone", "p-head"]
    events = signed_in(app, "ana").get("/api/audit").json
    assert {(e["action"], e["user"], e["outcome"]) for e in events} >= {
        ("model.promote", "dan", "refused"), ("model.promote", "dan", "ok"), ("model.rollback", "dan", "ok"),
        ("access", "bob", "denied")}


def test_no_one_moves_another_familys_models_through_with_on_promote_or_rollback(app):
    with app.app_context():
        db.session.add_all([ModelFamily(name="mine", owner="dan"), ModelFamily(name="theirs", owner="ana")])
        db.session.commit()
    client = MlflowClient()
    mine = register(client, "mine-backbone", evaluated=EVALUATED)
    theirs = {alias: register(client, "theirs-backbone", evaluated=EVALUATED) for alias in ("staging", "production")}
    heads = {alias: register(client, "theirs-head", "head", evaluated=HEAD_EVALUATED, parent=f"models:/theirs-backbone/{theirs[alias]}")
             for alias in theirs}
    admin, dan = signed_in(app, "ana"), signed_in(app, "dan")
    for alias in ("staging", "production"):  # their owner's sets, then older ones to roll back to
        assert admin.post("/api/models/theirs-backbone/promote", json={
            "version": theirs[alias], "alias": alias, "reason": "theirs",
            "with": [f"models:/theirs-head/{heads[alias]}"]}).status_code == 200
    before = {(m["name"], a): v for m in admin.get("/api/models").json for a, v in m["aliases"].items()}
    for alias in ("staging", "production"):
        attack = dan.post("/api/models/mine-backbone/promote", json={
            "version": mine, "alias": alias, "reason": "mine",
            "with": [f"models:/theirs-backbone/{theirs['staging']}", f"models:/theirs-head/{heads['staging']}"]})
        assert attack.status_code == 403 and "model family 'theirs' (theirs-backbone) belongs to ana" in attack.json["error"]
        back = dan.post("/api/models/mine-backbone/rollback", json={"alias": alias, "reason": "r",
                                                                    "with": ["theirs-backbone", "theirs-head"]})
        assert back.status_code == 403 and "theirs-backbone" in back.json["error"]
    assert {(m["name"], a): v for m in admin.get("/api/models").json for a, v in m["aliases"].items()} == before
    denied = [(e["action"], e["user"]) for e in admin.get("/api/audit").json if e["outcome"] == "denied"]
    assert denied.count(("model.promote", "dan")) == 2 and denied.count(("model.rollback", "dan")) == 2


def test_unknown_models_are_404_and_malformed_json_is_400(app):
    admin = signed_in(app, "ana")
    missing = admin.get("/api/models/no-such-backbone")
    assert missing.status_code == 404 and missing.json == {"error": "no registered model 'no-such-backbone'"}
    assert admin.get("/registry/no-such-backbone").status_code == 404
    deep = admin.post("/api/datasets", data="[" * 5000 + "]" * 5000, content_type="application/json")
    assert deep.status_code == 400 and "nested deeper" in deep.json["error"]
    nested = admin.post("/api/datasets", data='{"name": ' + '{"a": ' * 40 + "1" + "}" * 41,
                        content_type="application/json")
    assert nested.status_code == 400 and "nested deeper than 32" in nested.json["error"]
    surrogate = admin.post("/api/datasets", data='{"name": "x\\ud800y", "prefix": "datasets/s"}',
                           content_type="application/json")
    assert surrogate.status_code == 400 and surrogate.json["error"] == "name: not valid Unicode text (a lone surrogate)"
    broken = admin.post("/api/datasets", data=b'{"name": "\xff"}', content_type="application/json")
    assert broken.status_code == 400 and broken.json["error"].startswith("body: not valid JSON")


def test_hostile_input_gets_4xx_naming_the_field_and_every_refusal_is_audited(app):
    anonymous = app.test_client()
    assert anonymous.post("/api/login", json=["ana"]).json["error"] == "body: expected a JSON object, got list"
    odd = anonymous.post("/api/login", json={"username": {"$ne": ""}, "password": 5})
    assert odd.status_code == 400 and odd.json["error"] == "username: expected a string, got dict"
    admin = signed_in(app, "ana")
    colon = make_dataset(admin)
    huge = admin.get("/api/datasets/99999999999999999999999/objects")
    assert huge.status_code == 404 and huge.json == {"error": huge.json["error"]}  # JSON, not an HTML page
    assert admin.get("/api/no-such-thing").is_json
    grant = admin.post(f"/api/datasets/{colon}/grants", json={"user": {"name": "bob"}, "level": "read"})
    assert grant.status_code == 400 and grant.json["error"] == "user: expected a string, got dict"
    missing = admin.post("/api/models/nothing-backbone/promote", json={"version": "7", "alias": "staging", "reason": "r"})
    assert missing.status_code == 400 and "models:/nothing-backbone/7" in missing.json["error"]
    events = [(e["action"], e["outcome"], e["target"]) for e in admin.get("/api/audit").json]
    assert ("model.promote", "refused", "models:/nothing-backbone/7") in events
    assert ("datasets.api_grants", "refused", f"/api/datasets/{colon}/grants") in events
    assert ("auth.api_login", "refused", "/api/login") in events


def test_sign_in_is_throttled_per_account_with_backoff_and_audited(app):
    guesser = app.test_client()
    answers = [guesser.post("/api/login", json={"username": "bob", "password": f"guess {i}"}) for i in range(8)]
    assert [a.status_code for a in answers] == [401] * 5 + [429] * 3
    assert int(answers[-1].headers["Retry-After"]) > 0 and "too many failed sign-ins" in answers[-1].json["error"]
    right = guesser.post("/api/login", json={"username": "bob", "password": PASSWORD})
    assert right.status_code == 429  # locked means locked, the right password too
    assert signed_in(app, "cara")  # other accounts from the same address are not locked yet
    with app.app_context():
        row = db.session.get(SignInFailures, "user:bob")
        assert row.failures == 5 and (row.locked_until - row.last_failure).total_seconds() == 30
        row.locked_until = row.last_failure  # the lock ran out: the next failure locks twice as long
        db.session.commit()
    assert guesser.post("/api/login", json={"username": "bob", "password": "again"}).status_code == 401
    with app.app_context():
        row = db.session.get(SignInFailures, "user:bob")
        assert (row.locked_until - row.last_failure).total_seconds() == 60
    events = [(e["action"], e["user"], e["outcome"]) for e in signed_in(app, "ana").get("/api/audit").json]
    assert events.count(("login", "bob", "throttled")) == 4 and events.count(("login", "bob", "denied")) == 6


def test_session_cookies_are_secure_unless_turned_off(app, tmp_path):
    assert "Secure" in app.test_client().post("/api/login", json={"username": "ana", "password": PASSWORD}).headers["Set-Cookie"]
    plain = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'plain.db'}", secret_key="t", run_jobs=False,
                                secure_cookies=False))
    with plain.app_context():
        user = User(username="ana")
        user.set_password(PASSWORD)
        db.session.add(user)
        db.session.commit()
    assert "Secure" not in plain.test_client().post("/api/login", json={"username": "ana", "password": PASSWORD}).headers["Set-Cookie"]


def test_jobs_train_only_into_families_their_owner_may_use_and_teachers_are_hub_ids(app):
    register(MlflowClient(), "demo-backbone")  # trained outside the portal
    admin = signed_in(app, "ana")
    colon = make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    admin.post(f"/api/datasets/{colon}/grants", json={"user": "bob", "level": "read"})
    admin.post(f"/api/datasets/{colon}/grants", json={"group": "pathology", "level": "read"})
    bob, cara = signed_in(app, "bob"), signed_in(app, "cara")
    form = {"dataset_id": colon, "config": "configs/demo.yaml"}
    for teachers in ("hf:/etc/models", "hf:../../secrets", "hf:org/../x"):
        refused = bob.post("/api/jobs", json=form | {"name": "bobs", "strategy": "distill", "teachers": teachers})
        assert refused.status_code == 400 and "never a local path" in refused.json["errors"]["teachers"], teachers
    # A two-part relative path looks like a hub id: it resolves in the Hugging Face cache only, never
    # to the portal's working directory (where outputs/pretrain and mlruns/models exist).
    for teachers in ("hf:outputs/pretrain", "hf:mlruns/models"):
        refused = bob.post("/api/jobs", json=form | {"name": "bobs", "strategy": "distill", "teachers": teachers})
        assert refused.status_code == 400 and "not in the local Hugging Face cache" in refused.json["errors"]["teachers"]
    taken = bob.post("/api/jobs", json=form | {"name": "demo"})
    assert taken.status_code == 403 and "'demo' is in the registry but has no owner" in taken.json["error"]
    assert bob.post("/api/jobs", json=form | {"name": "bobs"}).status_code == 201  # a new name: bob's now
    theirs = cara.post("/api/jobs", json=form | {"name": "bobs"})
    assert theirs.status_code == 403 and "'bobs' belongs to bob" in theirs.json["error"]
    dan = signed_in(app, "dan")
    register(MlflowClient(), "bobs-backbone")
    promote = dan.post("/api/models/bobs-backbone/promote", json={"version": "1", "alias": "staging", "reason": "r"})
    assert promote.status_code == 403 and "dan may not move its aliases" in promote.json["error"]


@pytest.fixture()
def live_portal(app, s3):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    # The browser PUTs straight to S3, a different origin: the bucket must allow the portal's origin.
    s3.put_bucket_cors(Bucket=BUCKET, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": [base], "AllowedMethods": ["PUT", "GET"], "AllowedHeaders": ["*"]}]})
    yield base
    server.shutdown()


def _check_screenshot(path: Path) -> None:
    """A real render: the page's size, the portal's header colour across the top, content below it."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[:2] == (800, 1200)
    header = image[5, 5:300]
    assert np.abs(header - [0x1F, 0x4E, 0x79]).max() <= 8, header[:3]
    body = image[80:]
    assert body.std() > 10  # text and tables, not a blank or error page


LITERAL = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\{\"|\{'")


def _shot(page, path: Path) -> None:
    """The page as Chromium renders it, scripts run: saved, and free of Python or JSON literals."""
    text = page.inner_text("body")
    assert not LITERAL.findall(text), (page.url, LITERAL.findall(text), text[:2000])
    page.screenshot(path=path)


@pytest.mark.browser
def test_pages_in_headless_chromium(live_portal, app, s3, tmp_path):
    from playwright.sync_api import sync_playwright

    admin = signed_in(app, "ana")
    make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    register(MlflowClient(), "ui-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.80})
    register(MlflowClient(), "ui-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.85})
    # A training job as the job runner leaves it: its MLflow run with a loss curve, kNN from step 0, progress.
    with mlflow.start_run() as training:
        for step, loss, knn in [(0, None, 0.40), (10, 7.1, None), (20, 6.8, 0.55), (30, 6.6, 0.62)]:
            mlflow.log_metrics({"total_loss": loss} if loss else {}, step=step)
            mlflow.log_metrics({"knn_top1": knn} if knn else {}, step=step)
        mlflow.set_tag("vf.progress", "30/90 (1m05s left)")
    with app.app_context():
        job = Job(owner="ana", dataset_id=1, entry_point="pretrain", parameters={"name": "ui", "strategy": "standard"},
                  command=[], status="running", mlflow_run_id=training.info.run_id, experiment_id="0")
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    upload = tmp_path / "tile.png"
    Image.new("RGB", (32, 32), (200, 100, 150)).save(upload)
    shots = tmp_path / "screenshots"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"{live_portal}/datasets")
        page.fill("input[name=username]", "ana")
        page.fill("input[name=password]", PASSWORD)
        page.click("#sign-in")
        page.wait_for_selector("table#datasets")
        assert "colon" in page.inner_text("table#datasets")
        _shot(page, shots / "datasets.png")

        page.click("text=colon")
        page.fill("#folder", "tiles")
        page.set_input_files("#file", str(upload))
        page.click("#upload")
        page.wait_for_selector("text=tiles/tile.png")  # the page reloads with the object S3 now holds
        assert s3.get_object(Bucket=BUCKET, Key="datasets/colon/tiles/tile.png")["Body"].read() == upload.read_bytes()
        _shot(page, shots / "dataset.png")

        page.goto(f"{live_portal}/jobs/new")
        page.fill("input[name=name]", "Not Valid!")
        page.fill("input[name=lr]", "fast")
        page.click("#submit")
        assert "expected a number, got 'fast'" in page.inner_text("[data-field=lr]")
        assert "lowercase letters" in page.inner_text("[data-field=name]")
        _shot(page, shots / "new_job_errors.png")

        page.goto(f"{live_portal}/jobs/new")  # the form shows the chosen task's fields only
        assert page.is_visible("input[name=lr]") and page.is_hidden("input[name=backbone]")
        assert page.is_hidden("input[name=lora_rank]")  # LoRA's, not the standard strategy's
        page.check("input[name=task][value=evaluate]")
        assert page.is_hidden("input[name=lr]") and page.is_hidden("input[name=name]")
        page.fill("input[name=backbone]", "models:/ui-backbone/1")
        page.click("#submit")
        page.wait_for_url(re.compile(r".*/jobs/\d+$"))
        assert page.inner_text("h1").startswith("Job") and "models:/ui-backbone/1" in page.inner_text("h1")
        assert page.inner_text("#status") == "queued" and "evaluate on colon" in page.inner_text("body")

        page.goto(f"{live_portal}/registry")
        page.click("text=ui-backbone")
        page.select_option("select[name=alias] >> nth=0", "staging")
        page.fill("input[name=reason] >> nth=0", "first candidate")
        page.click("#promote")
        page.wait_for_selector("table#history >> text=first candidate")
        assert "authorized, lineage complete" in page.inner_text("table#history")
        assert page.get_attribute("a.mlflow-version >> nth=0", "href") == \
            "http://mlflow.test/#/models/ui-backbone/versions/2?workflowType=machine_learning"
        assert page.get_attribute("a.mlflow-run >> nth=0", "href").startswith("http://mlflow.test/#/experiments/")
        assert "knn.accuracy 0.850" in page.inner_text("table#versions")
        _shot(page, shots / "model.png")
        page.click("#compare")  # v1 against v2, the newest
        page.wait_for_selector("table#comparison")
        comparison = page.inner_text("table#comparison")
        assert "knn.accuracy" in comparison and "+0.0500" in comparison, comparison
        _shot(page, shots / "compare.png")

        watch = MlflowClient()  # what the service's drift watch logs for the promoted version: two windows
        run = watch.create_run(watch.create_experiment("vf-monitoring"),
                               tags={Tag.MONITORED_MODEL: "models:/ui-backbone/2"}).info.run_id
        for step, (detected, ood) in enumerate([(0.0, 0.02), (1.0, 0.6)]):
            for key, value in {"drift.detected": detected, "ood.fraction": ood, "drift.p_value": 0.5 - detected / 2}.items():
                watch.log_metric(run, key, value, step=step)
        page.goto(f"{live_portal}/registry/ui-backbone")
        page.click("#monitoring")
        page.wait_for_selector("svg#watch polyline")
        assert page.locator("svg#watch circle.flagged").count() == 1 and page.locator("svg#watch line.promotion").count() == 1
        assert "v2 @staging" in page.text_content("svg#watch") and "60%" in page.inner_text("table#windows")
        _shot(page, shots / "monitoring.png")

        page.goto(f"{live_portal}/jobs/{job_id}")
        page.wait_for_selector("#chart polyline")
        assert page.inner_text("#progress") == "step 30/90 (1m05s left)"
        assert page.locator("#chart polyline").count() == 2 and page.locator("#chart circle").count() == 6
        chart = page.text_content("#chart")
        assert "step 0" in chart and "step 30" in chart and "kNN" in chart and "loss" in chart
        assert "knn_top1 0.620 (0.400 before training)" in page.inner_text("#latest")
        _shot(page, shots / "job.png")

        for path in ("/jobs", "/registry"):  # the lists, as rendered
            page.goto(f"{live_portal}{path}")
            _shot(page, shots / f"{path.strip('/')}-list.png")

        page.goto(f"{live_portal}/audit")
        assert "object.upload" in page.inner_text("table#audit") and "model.promote" in page.inner_text("table#audit")
        _shot(page, shots / "audit.png")
        browser.close()
    for name in ("datasets", "dataset", "new_job_errors", "model", "compare", "monitoring", "job", "audit"):
        _check_screenshot(shots / f"{name}.png")
    assert str(MlflowClient().get_model_version_by_alias("ui-backbone", "staging").version) == "2"  # the newest, preselected


@pytest.fixture()
def identity_provider():
    """A minimal OpenID Connect provider on loopback: discovery, authorize, token (signed id_token), JWKS."""
    import time as clock

    from authlib.jose import JsonWebKey, jwt
    from flask import Flask, request

    key = JsonWebKey.generate_key("RSA", 2048, is_private=True)
    public = key.as_dict(is_private=False) | {"kid": "test", "use": "sig", "alg": "RS256"}
    codes = {}
    idp = Flask("idp")
    server = make_server("127.0.0.1", 0, idp, threaded=True)
    issuer = f"http://127.0.0.1:{server.server_port}"

    @idp.get("/.well-known/openid-configuration")
    def discovery():
        return {"issuer": issuer, "authorization_endpoint": f"{issuer}/authorize", "token_endpoint": f"{issuer}/token",
                "jwks_uri": f"{issuer}/jwks", "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"], "subject_types_supported": ["public"]}

    @idp.get("/jwks")
    def jwks():
        return {"keys": [public]}

    @idp.post("/token")
    def token():
        nonce = codes.pop(request.form["code"])
        now = int(clock.time())
        claims = {"iss": issuer, "aud": "portal", "sub": "u-42", "iat": now, "exp": now + 300, "nonce": nonce,
                  "preferred_username": "erin.hospital"}
        id_token = jwt.encode({"alg": "RS256", "kid": "test"}, claims, key).decode()
        return {"access_token": "a", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield issuer, codes
    server.shutdown()


def test_institutional_sign_in_with_openid_connect(tmp_path, identity_provider):
    from urllib.parse import parse_qs, urlparse

    issuer, codes = identity_provider
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'portal.db'}", secret_key="t", run_jobs=False,
                              oidc_metadata_url=f"{issuer}/.well-known/openid-configuration",
                              oidc_client_id="portal", oidc_client_secret="s3cret"))
    web = app.test_client()
    assert "Sign in with your institution" in web.get("/login").text
    redirect = web.get("/login/sso")
    assert redirect.status_code == 302 and redirect.location.startswith(f"{issuer}/authorize?")
    query = parse_qs(urlparse(redirect.location).query)
    assert query["client_id"] == ["portal"] and query["scope"] == ["openid profile email"]
    codes["code-1"] = query["nonce"][0]  # the user signs in at the provider, which sends them back with a code
    back = web.get(f"/auth/callback?code=code-1&state={query['state'][0]}")
    assert back.status_code == 302 and back.location.endswith("/datasets")
    assert web.get("/api/datasets").json == []  # a new SSO account holds no grants
    with app.app_context():
        user = db.session.scalar(db.select(User).where(User.username == "erin.hospital"))
        assert user is not None and user.password_hash is None and not user.is_admin


def test_versions_show_their_evaluation_compare_side_by_side_and_say_why_they_hold_an_alias(app):
    client = MlflowClient()
    v1 = register(client, "cmp-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.80})
    v2 = register(client, "cmp-backbone", evaluated=EVALUATED | {"knn.accuracy": 0.86})
    client.set_model_version_tag("cmp-backbone", v2, "vf.data_md5", "other.dir")  # trained on another data version
    admin = signed_in(app, "ana")
    assert admin.post("/api/models/cmp-backbone/promote", json={"version": v1, "alias": "staging", "reason": "baseline"}
                      ).status_code == 200
    model = admin.get("/api/models/cmp-backbone").json
    newest = model["versions"][0]
    assert newest["evaluation"]["knn.accuracy"] == 0.86 and newest["learning"] == "not measured"
    # The promotion service validated the data of version 1, not the other data version 2 names.
    assert (model["versions"][1]["validated"], newest["validated"], newest["validation"]) == (True, None, "true")
    assert newest["links"]["version"] == "http://mlflow.test/#/models/cmp-backbone/versions/2?workflowType=machine_learning"
    assert newest["links"]["run"].startswith("http://mlflow.test/#/experiments/")
    assert newest["links"]["run"].endswith("?workflowType=machine_learning")  # model training, not MLflow's GenAI view
    assert newest["links"]["validation_report"] == "/registry/cmp-backbone/2/validation-report"
    missing = admin.get("/api/models/cmp-backbone/2/validation-report")  # this test's lineage names no real report
    assert missing.status_code == 404 and "cannot be read" in missing.json["error"]
    [record] = model["audit"]
    assert record["gates"][0] == "authorized" and "floor" in record["gates"] and record["reason"] == "baseline"
    assert "### Promotion history" in client.get_model_version("cmp-backbone", v1).description
    assert "| baseline | authorized, lineage complete" in client.get_model_version("cmp-backbone", v1).description

    compared = admin.get(f"/api/models/cmp-backbone/compare?a={v1}&b={v2}").json
    knn = next(row for row in compared["metrics"] if row["metric"] == "knn.accuracy")
    assert (knn["a"], knn["b"]) == (0.80, 0.86) and knn["difference"] == pytest.approx(0.06)
    assert compared["lineage"] == [{"field": "data_md5", "a": "m.dir", "b": "other.dir"}]
    page = admin.get(f"/registry/cmp-backbone/compare?a={v1}&b={v2}").get_data(as_text=True)
    assert "+0.0600" in page and "other.dir" in page
    assert admin.get("/api/models/cmp-backbone/compare?a=1&b=99").status_code == 404


def test_the_audit_page_filters_by_user_model_and_action_and_renders_details(app):
    client = MlflowClient()
    version = register(client, "aud-backbone", evaluated=EVALUATED)
    admin = signed_in(app, "ana")
    admin.post("/api/models/aud-backbone/promote", json={"version": version, "alias": "staging", "reason": "it's fine"})
    signed_in(app, "bob").post("/api/models/aud-backbone/promote", json={"version": version, "alias": "production"})
    mine = admin.get("/api/audit?user=bob&target=aud-backbone").json
    assert mine and all(e["user"] == "bob" and "aud-backbone" in e["target"] for e in mine)
    promotions = admin.get("/api/audit?action=model.promote").json
    assert promotions and {e["action"] for e in promotions} == {"model.promote"}
    page = admin.get("/audit?target=aud-backbone").get_data(as_text=True)
    assert "<dt>alias</dt><dd>staging</dd>" in page and "\\u0027" not in page


def test_unreachable_storage_is_a_page_that_says_so_and_empty_fields_are_the_configs(app):
    from portal.storage import Storage

    admin = signed_in(app, "ana")
    colon = make_dataset(admin)
    app.extensions["vf.storage"] = Storage(BUCKET, "http://127.0.0.1:9")  # nothing listens there
    page = admin.get(f"/datasets/{colon}")  # what the database knows, and why the files are not listed
    assert page.status_code == 200 and b"s3://hospital at http://127.0.0.1:9 is unreachable or refuses the portal" in page.data
    assert b'id="storage-unavailable"' in page.data and b"colon" in page.data and b'id="upload"' not in page.data
    app.extensions["vf.storage"] = Storage("no-such-bucket", app.extensions["vf.settings"].s3_endpoint_url)
    listing = admin.get(f"/api/datasets/{colon}/objects")
    assert listing.status_code == 503 and "s3://no-such-bucket" in listing.json["error"]

    from portal.jobs import TrainingRequest

    form = {"dataset_id": "1", "name": "plain", "config": "configs/demo.yaml"}
    assert TrainingRequest.from_form(form, REPO).overrides() == ["distribution.type=ddp"]
    chosen = TrainingRequest.from_form(form | {"batch_size": "8", "lr": "1e-3"}, REPO).overrides()
    assert chosen == ["distribution.type=ddp", "train.batch_size=8", "optim.lr=0.001"]


def test_registry_routes_answer_4xx_for_unknown_names_and_never_a_databases_words(app, monkeypatch, caplog):
    admin = signed_in(app, "ana")
    for url in ("/api/models/nothing/compare?a=1&b=2", "/api/models/%00", "/api/models/%00/compare?a=1&b=2",
                "/api/models/nothing", "/api/models/nothing/1/validation-report", "/api/models/" + "x" * 300,
                "/api/models/a%01b/1/validation-report", "/api/models/nothing/monitoring", "/api/models/%00/monitoring",
                "/api/models/" + "x" * 300 + "/monitoring"):
        answer = admin.get(url)
        assert answer.status_code == 404 and "registered model" in answer.json["error"], (url, answer.json)
    for action in ("promote", "rollback"):
        answer = admin.post(f"/api/models/nothing/{action}", json={"version": "1", "alias": "staging", "reason": "r"})
        assert answer.status_code == 400, answer.json
    # A registry whose database fails: the caller gets a reference, the log and the audit get the words.
    from mlflow.exceptions import MlflowException

    def broken(self, name):
        raise MlflowException("(psycopg2.OperationalError) connection to server at db.internal:5432 failed",
                              error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "get_registered_model", broken)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", lambda self, name, alias: broken(self, name))
    down = admin.get("/api/models/anything")
    assert down.status_code == 503 and "psycopg2" not in down.text and "db.internal" not in down.text
    reference = re.search(r"reference ([0-9a-f]{8})", down.json["error"]).group(1)
    assert any("db.internal" in r.getMessage() and reference in r.getMessage() for r in caplog.records)
    # An action so refused is audited with the words too.
    refused = admin.post("/api/models/anything/rollback", json={"alias": "staging", "reason": "r"})
    assert refused.status_code == 503 and "db.internal" not in refused.text
    with app.app_context():
        event = db.session.scalars(db.select(AuditEvent).order_by(AuditEvent.id.desc())).first()
    assert event.outcome == "refused" and "db.internal" in str(event.detail)


def test_job_fields_take_ascii_digits_and_registered_teachers_only(app):
    register(MlflowClient(), "slide-backbone", evaluated={})
    admin = signed_in(app, "ana")
    colon = make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    form = {"dataset_id": colon, "config": "configs/demo.yaml", "name": "slides"}
    for limit in ("١٢:٠٠:٠٠", "٠-12:00:00", "12:00:0٠"):
        refused = admin.post("/api/jobs", json=form | {"time_limit": limit})
        assert refused.status_code == 400 and set(refused.json["errors"]) == {"time_limit"}, limit
    for teachers in ("models:/../1", "models:/slide-backbone/١", "models:/slide-backbone@../x", "models:/%2e%2e/1"):
        refused = admin.post("/api/jobs", json=form | {"strategy": "distill", "teachers": teachers})
        assert refused.status_code == 400 and "teachers" in refused.json["errors"], teachers
    absent = admin.post("/api/jobs", json=form | {"strategy": "distill", "teachers": "models:/slide-backbone/7"})
    assert absent.status_code == 400 and "slide-backbone" in absent.json["errors"]["teachers"]
    fine = admin.post("/api/jobs", json=form | {"strategy": "distill", "teachers": "models:/slide-backbone/1"})
    assert fine.status_code == 201, fine.json


def test_jobs_run_the_portals_own_mlflow_and_portal_run_jobs_is_honoured_by_serve(monkeypatch, tmp_path):
    import shutil
    import sys

    from flask import Flask

    from portal.__main__ import main as portal_main
    from portal.jobs import own_environment_path

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a service manager's PATH, without the venv
    assert shutil.which("mlflow", path=own_environment_path()) == str(Path(sys.executable).parent / "mlflow")
    served = []
    monkeypatch.setattr(Flask, "run", lambda self, **kwargs: served.append(self))
    monkeypatch.setenv("PORTAL_DATABASE_URL", f"sqlite:///{tmp_path / 'portal.db'}")
    monkeypatch.setenv("PORTAL_SECRET_KEY", "t")
    for setting, runs in (("0", False), ("1", True)):
        monkeypatch.setenv("PORTAL_RUN_JOBS", setting)
        assert portal_main(["serve", "--port", "0"]) == 0
        assert ("vf.jobs" in served[-1].extensions) is runs, setting
        if runs:
            served[-1].extensions["vf.jobs"].stop()


def test_the_monitoring_page_draws_each_served_versions_windows_beside_its_promotions(app):
    client = MlflowClient()
    v1 = register(client, "mon-backbone", evaluated=EVALUATED)
    admin = signed_in(app, "ana")
    assert admin.post("/api/models/mon-backbone/promote", json={"version": v1, "alias": "production",
                                                                "reason": "first"}).status_code == 200
    assert admin.get("/api/models/mon-backbone/monitoring").json["watched"] == []
    # What the service's watch logs (serving.watch.Recorder): a run per served backbone, a point per window.
    experiment = client.create_experiment("vf-monitoring")
    run = client.create_run(experiment, tags={Tag.MONITORED_MODEL: f"models:/mon-backbone/{v1}",
                                              Tag.REFERENCE_RUN: "gate-run"}).info.run_id
    for step, (p_value, ood) in enumerate([(0.4, 0.0), (0.2, 0.1), (1e-6, 0.9)]):
        for key, value in {"drift.p_value": p_value, "drift.detected": float(p_value < 0.01), "ood.fraction": ood}.items():
            client.log_metric(run, key, value, step=step)
    watched = admin.get("/api/models/mon-backbone/monitoring").json
    [version] = watched["watched"]
    assert (version["version"], version["reference_run"], version["flagged"]) == (v1, "gate-run", 1)
    assert [w["ood.fraction"] for w in version["windows"]] == [0.0, 0.1, 0.9]
    assert [p["version"] for p in watched["promotions"]] == [v1]
    page = admin.get("/registry/mon-backbone/monitoring").get_data(as_text=True)
    assert page.count('class="flagged"') == 1 and page.count('class="window"') == 2
    assert 'class="promotion"' in page and f"v{v1} @production" in page
    assert "/registry/mon-backbone/monitoring" in admin.get("/registry/mon-backbone").get_data(as_text=True)
    assert admin.get("/api/models/nothing-backbone/monitoring").status_code == 404


def test_a_finished_job_that_did_not_learn_says_so_and_a_stopped_one_shows_no_eta(app):
    admin = signed_in(app, "ana")
    make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    with mlflow.start_run() as training:
        mlflow.set_tags({"vf.learned": "false", "vf.progress": "20/30 (1m12s left)",
                         "vf.learning": "did not learn: kNN 0.400 -> 0.405 (+0.005 over the network before training); "
                                        "needs at least +0.02"})
    with app.app_context():
        jobs = [Job(owner="ana", dataset_id=1, entry_point="pretrain", parameters={"name": "flat"}, command=[],
                    status=status, mlflow_run_id=training.info.run_id, experiment_id="0")
                for status in ("finished", "cancelled", "running")]
        db.session.add_all(jobs)
        db.session.commit()
        finished, cancelled, running = (job.id for job in jobs)
    body = admin.get(f"/api/jobs/{finished}").json
    assert (body["state"], body["learned"], body["progress"]) == ("finished, did not learn", "false", None)
    page = admin.get(f"/jobs/{finished}").get_data(as_text=True)
    assert 'class="badge status-not-learned" id="status">finished, did not learn<' in page
    assert "Did not learn: kNN 0.400 -&gt; 0.405" in page
    assert admin.get(f"/api/jobs/{cancelled}").json["progress"] is None  # stopped: no ETA
    assert admin.get(f"/api/jobs/{running}").json["progress"] == "20/30 (1m12s left)"


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_local_job_runs_until_its_whole_session_ends_and_a_cancelled_one_ends_cancelled(tmp_path, cancelled, mlflow_store):
    """`mlflow run` ends at once on a cancel while the training under it still checkpoints: the job
    runs until no process of its session is left. A process that then ended without ending its
    run leaves it FAILED, or KILLED (the job cancelled) when the portal had asked for the cancel."""
    import os
    import signal
    import subprocess
    from types import SimpleNamespace

    from portal.jobs import CANCELLING, LocalLauncher
    from registry.mlflow_service import MlflowService

    uri = mlflow_store
    run_id = MlflowClient(uri).create_run("0").info.run_id
    launcher = LocalLauncher(tmp_path, uri, tmp_path)

    def started():
        """The session's leader exits at once; the process it left behind names the run, as a training
        does. Polled at once, that process is now and then in the middle of its exec."""
        leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], env={**os.environ, "MLFLOW_RUN_ID": run_id},
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        training = int(leader.stdout.readline())
        leader.wait()
        job = SimpleNamespace(scheduler_id=str(leader.pid), mlflow_run_id=run_id,
                              scheduler_state=CANCELLING if cancelled else "RUNNING")
        launcher._children[job.scheduler_id] = leader  # as submit keeps the `mlflow run` it started
        return job, training

    for _ in range(10):  # each a new chance to catch the process mid-exec
        job, training = started()
        assert launcher.poll(job) == ("RUNNING", None, None)
        os.kill(training, signal.SIGKILL)
    job, training = started()
    os.kill(training, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while (state := launcher.poll(job))[1] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state[:2] == ("EXITED", "cancelled" if cancelled else "failed")
    assert MlflowService(uri).status(run_id) == ("KILLED" if cancelled else "FAILED")


def test_a_versions_validation_report_reads_as_a_page_and_stays_json_for_the_api(app, tmp_path):
    client = MlflowClient()
    version = register(client, "rep-backbone")
    ValidationReport("image_tiles_rgb", "data/demo/images", False, 64, 12, failures=[
        Failure("expect_column_values_to_be_between", "pixel_std", 2, ["train/a/x.png", "train/a/y.png"],
                "min_value=2.0", [0.0, 0.5])]).write(tmp_path / "report.json")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "report.json"), "validation")
    client.set_model_version_tag("rep-backbone", version, "vf.validation_report",
                                 f"{run.info.artifact_uri}/validation/report.json")
    admin = signed_in(app, "ana")
    page = admin.get(f"/registry/rep-backbone/{version}/validation-report").get_data(as_text=True)
    assert 'id="verdict">FAILED<' in page and "train/a/x.png (0.0)" in page and "min_value=2.0" in page
    assert "{&#34;" not in page and '{"' not in page  # a page, not the JSON
    assert admin.get(f"/api/models/rep-backbone/{version}/validation-report").json["success"] is False


def test_no_page_shows_a_python_or_json_literal(app):
    """Every page a person opens, with objects that carry None, booleans and nested values, as text
    (scripts and styles aside): no `None`, `True`, `False` or `{"`."""
    admin = signed_in(app, "ana")
    colon = make_dataset(admin, train_path="data/demo/images/train", validation_report="data/demo/validation/report.json")
    client = MlflowClient()
    v1 = register(client, "lit-backbone", evaluated=EVALUATED)
    register(client, "lit-backbone", evaluated=EVALUATED)
    assert admin.post("/api/models/lit-backbone/promote", json={"version": v1, "alias": "staging", "reason": "r"}
                      ).status_code == 200
    with app.app_context():
        job = Job(owner="ana", dataset_id=colon, entry_point="pretrain", command=[], status="queued",
                  parameters={"name": "lit", "lr": None, "freeze": False, "lora": {"r": 8, "targets": ["q", "v"]}})
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    pages = ["/datasets", f"/datasets/{colon}", "/jobs", f"/jobs/{job_id}", "/registry", "/registry/lit-backbone",
             f"/registry/lit-backbone/compare?a={v1}&b=2", "/registry/lit-backbone/monitoring", "/audit"]
    for path in pages:
        page = admin.get(path)
        assert page.status_code == 200, (path, page.status_code)
        text = re.sub(r"<(script|style)\b.*?</\1>", "", page.get_data(as_text=True), flags=re.DOTALL)
        text = re.sub(r"<[^>]+>", " ", text)
        leaked = re.findall(r"\bNone\b|\bTrue\b|\bFalse\b|\{&#34;|\{\"|\{&#39;", text)
        assert not leaked, (path, leaked, text[:2000])
    parameters = admin.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "<th>lr</th><td>—</td>" in parameters and "<th>freeze</th><td>no</td>" in parameters
    assert "<th>lora</th><td>r: 8; targets: q, v</td>" in parameters
