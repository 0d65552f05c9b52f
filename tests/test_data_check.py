"""The promotion service validates a version's training data itself: fetched by its md5 from the
platform's DVC remote, checked object by object, validated with the suite's parameters, the verdict
kept in the ledger. Nothing the researcher wrote (the lineage's "passed", their own report, objects
they pushed) decides it. A real git + DVC repository with a local remote, a real SQLite registry."""
import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from data.synthetic import generate
from data.versioning import dataset_version
from registry import data_check
from registry.data_check import VALIDATION, DataUnavailable, fetch, vouch
from registry.evidence import Evaluation, record
from registry.lineage import Lineage
from registry.promote import Gates, PromotionRefused, check_training_data, ledger_of, promote

SUITE, PARAMETERS = "image_tiles_rgb", {"tile_size": 32}


def dvc(repo: Path, *args: str) -> None:
    subprocess.run(["dvc", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture()
def platform(tmp_path, monkeypatch):
    """The promotion service's checkout (its working directory), whose default DVC remote holds
    ``data/tiles``; a registry beside it."""
    repo = tmp_path / "platform"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    generate(repo / "data" / "tiles", seed=0, image_size=32, train_per_class=3, val_per_class=1)
    dvc(repo, "add", "data/tiles")
    dvc(repo, "push")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield repo, MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def trained_on(client: MlflowClient, repo: Path, name: str = "d-backbone", **changes):
    """A version whose lineage names ``data/tiles/train`` as DVC has it now and says it passed."""
    version = dataset_version(repo / "data/tiles/train")
    fields = dict(kind="backbone", source_run_id="r", parent="scratch", data_path=version.path, data_md5=version.md5,
                  data_source=version.source, data_remote="", validation_suite=SUITE, validation_success=True,
                  validation_report="r", git_commit="c" * 40, git_dirty=False, config_sha256="s",
                  data_output=version.tracked_path, validation_dataset="data/tiles",
                  validation_parameters=json.dumps(PARAMETERS))
    lineage = Lineage(**(fields | changes))
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, source="s", tags=lineage.tags())


def validations(client: MlflowClient) -> list[dict]:
    return [e.body for e in ledger_of(client).entries() if e.kind == VALIDATION]


@pytest.mark.slow  # runs data.validate (Great Expectations) in a process of its own
def test_the_gate_validates_the_data_itself_once_per_data_version(platform, monkeypatch):
    repo, client = platform
    check = vouch(ledger_of(client), trained_on(client, repo))
    assert check.success and check.rows == 4 * 4 and check.dataset == "data/tiles"
    (recorded,) = validations(client)
    assert recorded["data_md5"] == dataset_version(repo / "data/tiles").md5 and recorded["parameters"] == PARAMETERS
    assert recorded["asked_by"] == "models:/d-backbone/1"

    # Another model on the same data and suite reads the ledger's verdict; other parameters are
    # another question, asked again.
    def no_second_run(*_):
        raise AssertionError("validated twice")

    monkeypatch.setattr(data_check, "run_validation", no_second_run)
    assert check_training_data(ledger_of(client), trained_on(client, repo, "d-head")) == check
    with pytest.raises(AssertionError, match="validated twice"):
        vouch(ledger_of(client), trained_on(client, repo, validation_parameters=json.dumps({"tile_size": 48})))


@pytest.mark.slow  # runs data.validate (Great Expectations) in a process of its own
def test_data_that_fails_its_suite_is_refused_whatever_its_lineage_says(platform):
    repo, client = platform
    # A file that is not an image, tracked and pushed; the lineage (the researcher's) says it passed.
    (repo / "data/tiles/train/glands/broken.png").write_bytes(b"not a png")
    dvc(repo, "add", "data/tiles")
    dvc(repo, "push")
    mv = trained_on(client, repo)
    record(ledger_of(client), Evaluation("models:/d-backbone/1", "data/eval", "e.dir", "gate-run",
                                         {"knn.accuracy": 0.9}), mv)
    with pytest.raises(PromotionRefused) as refused:
        promote(client, "models:/d-backbone/1", "production", reason="r", gates=Gates())
    assert refused.value.gate == "data validation"
    assert "fails image_tiles_rgb when the promotion service validates it" in str(refused.value)
    assert "readable" in str(refused.value) and "train/glands/broken.png = False" in str(refused.value)
    assert client.get_registered_model("d-backbone").aliases == {}
    (verdict,) = validations(client)
    assert verdict["success"] is False and verdict["asked_by"] == "models:/d-backbone/1"


def test_data_missing_from_or_altered_in_the_platforms_remote_is_refused(platform, tmp_path):
    repo, client = platform
    store = tmp_path / "remote" / "files" / "md5"
    ledger = ledger_of(client)

    def refused(mv, match: str) -> None:
        with pytest.raises(DataUnavailable, match=match):
            vouch(ledger, mv)

    # Not pushed: the platform cannot see it, whatever the researcher's machine holds.
    (repo / "data/tiles/train/glands/new.png").write_bytes(next((repo / "data/tiles/val/glands").glob("*.png")).read_bytes())
    dvc(repo, "add", "data/tiles")
    refused(trained_on(client, repo), r"is not in the platform's DVC remote .*`dvc push` it")
    dvc(repo, "push")

    # An object overwritten in the remote under its md5, and a file list that is not the one hashed.
    manifest_md5 = dataset_version(repo / "data/tiles").md5
    manifest = store / manifest_md5[:2] / manifest_md5[2:]
    entries = json.loads(manifest.read_bytes())
    tile = store / entries[0]["md5"][:2] / entries[0]["md5"][2:]
    original = tile.read_bytes()
    tile.chmod(0o644)
    tile.write_bytes(original[:-1] + b"!")
    refused(trained_on(client, repo), "does not hash to its md5 .*the remote was altered")
    tile.write_bytes(original)
    text = manifest.read_bytes()
    manifest.chmod(0o644)
    manifest.write_bytes(text.replace(b"glands", b"gland5"))
    refused(trained_on(client, repo), "file list does not hash to its md5")
    manifest.write_bytes(text)

    # A file list crafted to write outside the folder it is fetched into.
    crafted = json.dumps([{"md5": entries[0]["md5"], "relpath": "../../escaped.png"}]).encode()
    digest = hashlib.md5(crafted).hexdigest()
    (store / digest[:2]).mkdir(exist_ok=True)
    (store / digest[:2] / f"{digest[2:]}.dir").write_bytes(crafted)
    refused(trained_on(client, repo, data_md5=f"{digest}.dir"), "lists the path '../../escaped.png', which leaves")
    assert not list(tmp_path.rglob("escaped.png"))

    # A lineage whose folders do not nest, or that does not say how its data was validated.
    refused(trained_on(client, repo, validation_dataset="data/other"), r"data/tiles/train\) is not inside data/other")
    refused(trained_on(client, repo, validation_parameters=""), "does not name the data's DVC output")
    # Parameters become options of the command the service runs: suite parameters and numbers only.
    for hostile in ({"tile_size": 32, "dataset": "/etc"}, {"tile_size": "32 --report-dir /tmp/x"},
                    {"magnifications": []}, {"min_tissue": True}, ["tile_size"]):
        refused(trained_on(client, repo, validation_parameters=json.dumps(hostile)),
                r"vf.validation_parameters: expected a JSON object of tile_size, magnifications, min_tissue \(numbers\)")
    # An md5 or a listed object that is not DVC's could name a path outside the remote.
    refused(trained_on(client, repo, data_md5="../../etc/passwd.dir"), "not a DVC md5")
    crafted = json.dumps([{"md5": "../../../etc/hostname", "relpath": "a.png"}]).encode()
    digest = hashlib.md5(crafted).hexdigest()
    (store / digest[:2]).mkdir(exist_ok=True)
    (store / digest[:2] / f"{digest[2:]}.dir").write_bytes(crafted)
    refused(trained_on(client, repo, data_md5=f"{digest}.dir"), "its file list is not DVC's")
    assert validations(client) == []

    # A checkout with no remote: nothing to fetch from, said as such.
    dvc(repo, "remote", "remove", "local")
    refused(trained_on(client, repo), "has no remote to fetch data from")


def test_every_suite_parameter_is_one_the_check_passes_on():
    from data.report import SUITE_PARAMETERS
    from data.suites import SUITES

    assert {name for suite in SUITES.values() for name in suite.parameters} <= set(SUITE_PARAMETERS)


def test_fetch_writes_only_the_validated_folder(platform, tmp_path):
    repo, _ = platform
    md5 = dataset_version(repo / "data/tiles").md5
    assert fetch(md5, "val", tmp_path / "out") == 4
    fetched = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert fetched == sorted(p.relative_to(repo / "data/tiles").as_posix() for p in (repo / "data/tiles/val").rglob("*.png"))
    for name in fetched:
        assert (tmp_path / "out" / name).read_bytes() == (repo / "data/tiles" / name).read_bytes()
