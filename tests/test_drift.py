"""The drift watch: a backbone's reference (``dinomx.drift``), scores per image and tests per
window, checked on real images under real shifts (``data.shifts``: the tests' H&E slide, pydicom's
CT slice, scikit-learn's digits), and the service's side of it (``serving.watch``): answers,
windows tested off the request path, a point per window in an MLflow run."""
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from scipy.stats import ks_2samp

from data import shifts
from data.samples import digits
from dinomx.backbone import build_image_processor
from dinomx.drift import Reference, ks_bonferroni, window_test
from dinomx.embed import Embedder
from dinomx.errors import DataError
from dinomx.model import build_models
from registry.mlflow_service import Tag
from scripts.demo import demo_slide
from serving import watch
from tests.conftest import tiny_config

ALPHA = 0.01


def test_a_reference_round_trips_and_refuses_what_is_not_it(tmp_path):
    rng = np.random.default_rng(0)
    reference = Reference.fit(rng.normal(size=(200, 16)), rng.normal(size=(120, 16)), components=8, k=5,
                              about={"backbone": "models:/b/1"})
    sha256 = reference.save(tmp_path / "reference.npz")
    loaded = Reference.load(tmp_path / "reference.npz", sha256).check("models:/b/1")
    queries = loaded.project(rng.normal(size=(7, 16)))
    np.testing.assert_allclose(loaded.score(queries)[0], reference.score(queries)[0])
    assert loaded.about == {"backbone": "models:/b/1", "train": 200, "val": 120} and loaded.points.shape == (120, 9)
    # Leave-one-out calibration: the reference's own points sit at the percentiles they define.
    assert np.all(np.diff(loaded.loo) >= 0) and len(loaded.loo) == 120
    with pytest.raises(DataError, match="not the reference its record names"):
        Reference.load(tmp_path / "reference.npz", "0" * 64)
    with pytest.raises(DataError, match="built for models:/b/1, not models:/b/2"):
        loaded.check("models:/b/2")
    with pytest.raises(DataError, match="expected embeddings of dimension 16, got shape"):
        loaded.project(np.zeros((3, 32)))
    (tmp_path / "other.npz").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a reference"):
        Reference.load(tmp_path / "other.npz")
    with pytest.raises(DataError, match="needs at least 2 train and 6 val"):
        Reference.fit(rng.normal(size=(10, 16)), rng.normal(size=(5, 16)))


def test_the_window_ks_test_agrees_with_scipys_two_sample_test():
    """The statistic read at the window's points is scipy's exactly; the p-values agree within
    the two asymptotic approximations' difference."""
    rng = np.random.default_rng(3)
    reference = Reference.fit(rng.normal(size=(400, 12)), rng.normal(size=(700, 12)), components=6)
    near = reference.project(rng.normal(size=(60, 12)))
    far = reference.project(rng.normal(size=(60, 12)) + 0.4 * np.eye(12)[0])
    repeated = reference.project(np.repeat(rng.normal(size=(1, 12)), 60, axis=0))  # one image sent 60 times
    tied = near.copy()
    tied[:20] = reference.points[:20]  # values the reference holds too
    for window in (near, far, repeated, tied):
        statistic, p_value = ks_bonferroni(reference, window, rng)
        theirs = [ks_2samp(reference.points[:, c], window[:, c], method="asymp") for c in range(window.shape[1])]
        assert statistic == pytest.approx(max(t.statistic for t in theirs), abs=1e-9)
        assert p_value == pytest.approx(min(1.0, min(t.pvalue for t in theirs) * len(theirs)), abs=0.02)


@pytest.fixture(scope="module")
def embedder():
    """The tests' tiny DINO-MX backbone at random init: what a watch must work with from day one."""
    cfg = tiny_config()
    torch.manual_seed(0)
    student, _ = build_models(cfg)
    return Embedder(student.backbone, build_image_processor(cfg.dataset, cfg.crops.global_crops_size, 3))


def _embedded(embedder, images: np.ndarray) -> np.ndarray:
    return embedder.embed(shifts.as_images(images))


@pytest.mark.slow  # embeds ~4,000 real images
def test_real_shifts_are_seen_in_the_first_window_and_held_out_images_rarely_alarm(embedder, tmp_path):
    """Reference: 300 + 300 images; held-out images come from other places of the same slide or
    slice. Each shift is flagged in the first window of 100 images; 300 windows of 50 held-out
    images raise alarms at about alpha, and about 1 % of held-out images lie beyond the threshold."""
    slide = str(demo_slide())
    digit_files = sorted(digits(tmp_path / "digits").rglob("*.png"))[:300]
    digit_images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in digit_files])
    modalities = {
        "H&E": (shifts.he_tiles(slide, 600, seed=0), shifts.he_tiles(slide, 600, seed=7),
                lambda held: {"stain": shifts.stain(held), "focus": shifts.blur(held, 1.0), "digits": digit_images}),
        "CT": (shifts.ct_patches(600, seed=0), shifts.ct_patches(600, seed=7),
               lambda held: {"lung window": shifts.ct_patches(300, shifts.LUNG, seed=1),
                             "smoother kernel": shifts.blur(held, 1.0)}),
    }
    rng = np.random.default_rng(0)
    for modality, (built, held, shifted) in modalities.items():
        reference = Reference.fit(_embedded(embedder, built[:300]), _embedded(embedder, built[300:]))
        for name, images in shifted(held[:300]).items():
            first = reference.project(_embedded(embedder, images[:100]))
            result = window_test(reference, first, "ks", ALPHA)
            assert result.drifted and result.p_value < ALPHA, (modality, name, result)
        pool = reference.project(_embedded(embedder, held))
        alarms = [window_test(reference, pool[rng.choice(len(pool), 50, replace=False)], "ks", ALPHA, seed=i).drifted
                  for i in range(300)]
        assert np.mean(alarms) <= 3 * ALPHA, (modality, np.mean(alarms))  # P(> 9 of 300 | rate 0.01) < 0.001
        _, percentiles = reference.score(pool)
        assert np.mean(percentiles > reference.threshold) <= 0.03, (modality, np.mean(percentiles > reference.threshold))


@pytest.fixture()
def watched(monkeypatch, mlflow_store):
    """A watch of ``models:/w-backbone/1`` with windows of 10 images, recording into a SQLite store."""
    uri = mlflow_store
    mlflow.set_tracking_uri(uri)
    monkeypatch.setattr(watch, "WINDOW", 10)
    monkeypatch.setattr(watch, "LOG_INTERVAL_S", 0)  # a point as soon as a window is tested
    monkeypatch.setattr(watch, "TESTER", watch.Tester())
    rng = np.random.default_rng(1)

    def images(count: int, axis: int = 0) -> np.ndarray:
        """Embeddings around one direction (0: the reference's; another: far from it)."""
        return np.eye(24)[axis] + 0.2 * rng.normal(size=(count, 24))

    reference = Reference.fit(images(300), images(300), components=8, about={"backbone": "models:/w-backbone/1"})
    yield watch.Watch("models:/w-backbone/1", reference, "", "gate-run"), MlflowClient(uri), images
    mlflow.set_tracking_uri(None)


def _points(client: MlflowClient, key: str, count: int) -> list:
    """The monitoring run's history of ``key``, once it has ``count`` points (the tester's thread logs them)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name(watch.EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(history := client.get_metric_history(runs[0].info.run_id, key)) >= count:
            return sorted(history, key=lambda m: m.step)
        time.sleep(0.2)
    raise AssertionError(f"no {count} points of {key} within 60 s")


def test_the_service_scores_each_image_and_tests_full_windows_into_one_run_per_backbone(watched):
    watcher, client, images = watched
    # 12 images like the reference: a window of 10 is tested, 2 wait for the next one.
    answer = watcher.answer(images(12))
    assert answer.reference == "gate-run" and answer.window == 10 and len(answer.scores) == 12
    assert sum(s.in_distribution for s in answer.scores) >= 10
    assert all(0 <= s.percentile <= 100 and s.score >= 0 for s in answer.scores)
    # 8 more, from far away: the second window holds them and 2 of the first kind.
    far = watcher.answer(images(8, axis=1))
    assert not any(s.in_distribution for s in far.scores) and all(s.percentile == 100 for s in far.scores)
    p_values = _points(client, "drift.p_value", 2)
    assert [m.step for m in p_values] == [0, 1] and p_values[1].value < ALPHA < p_values[0].value
    detected = _points(client, "drift.detected", 2)
    assert [m.value for m in detected] == [0.0, 1.0]
    (run,) = client.search_runs([client.get_experiment_by_name(watch.EXPERIMENT).experiment_id])
    assert run.data.tags[Tag.MONITORED_MODEL] == "models:/w-backbone/1" and run.data.tags[Tag.REFERENCE_RUN] == "gate-run"
    assert run.data.metrics["ood.fraction"] == 0.8

    # A service started again carries on in the same run, after the points it has.
    watch.TESTER.recorder = None
    watcher.answer(images(10))
    assert [m.step for m in _points(client, "drift.p_value", 3)] == [0, 1, 2]
    assert len(client.search_runs([client.get_experiment_by_name(watch.EXPERIMENT).experiment_id])) == 1


def test_windows_tested_between_two_writes_reach_mlflow_together_each_its_own_point(watched, monkeypatch):
    watcher, client, images = watched
    monkeypatch.setattr(watch, "LOG_INTERVAL_S", 1.0)
    watcher.answer(images(30))  # three windows at once: written when no other window came for a second
    assert [m.step for m in _points(client, "window.size", 3)] == [0, 1, 2]


def test_a_backbone_without_a_reference_is_served_unwatched_and_says_so():
    unwatched = watch.Watch("models:/n-backbone/1", None, "no reference: the promotion service has not evaluated it")
    answer = unwatched.answer(np.zeros((3, 8)))
    assert answer.reference is None and answer.scores == [] and answer.note.startswith("no reference:")


def test_a_reference_that_is_not_the_backbones_is_refused_at_load_in_one_line(tmp_path, monkeypatch, mlflow_store):
    from registry.evidence import Evaluation, record
    from registry.promote import ledger_of
    from serving.models import ServingError, fetch_reference, watch_of
    from tests.test_registry import register

    mlflow.set_tracking_uri(mlflow_store)
    try:
        client = MlflowClient()
        version = register(client, "r-backbone")
        uri, mv = f"models:/r-backbone/{version}", client.get_model_version("r-backbone", version)
        assert fetch_reference(uri, tmp_path / "none")["note"].startswith("no reference: the promotion service has not")
        rng = np.random.default_rng(0)

        def evaluated_with(about: str, sha256: str | None = None) -> dict:
            reference = Reference.fit(rng.normal(size=(50, 16)), rng.normal(size=(30, 16)), about={"backbone": about})
            path = tmp_path / f"{about.replace('/', '_')}.npz"
            digest = reference.save(path)
            record(ledger_of(client), Evaluation(uri, "data/eval", "e.dir", "gate-run", {},
                                                 {"uri": str(path), "sha256": sha256 or digest}), mv)
            return fetch_reference(uri, tmp_path / "fetched" / about.replace("/", "_"))

        with pytest.raises(ServingError, match=r"^models:/r-backbone/1: drift reference refused: .*SHA-256 differs"):
            evaluated_with(uri, sha256="0" * 64)
        with pytest.raises(ServingError, match="drift reference refused: built for models:/other/1, not models:/r-backbone/1"):
            evaluated_with("models:/other/1")
        fetched = evaluated_with(uri)
        assert fetched["run_id"] == "gate-run" and watch_of(uri, 16, fetched).reference.dim == 16
        with pytest.raises(ServingError, match="it holds 16-d embeddings, the backbone makes 96-d ones"):
            watch_of(uri, 96, fetched)
        monkeypatch.setattr(watch, "ON", False)
        assert watch_of(uri, 96, fetched).note == "not watched: VF_WATCH=off"
    finally:
        mlflow.set_tracking_uri(None)
