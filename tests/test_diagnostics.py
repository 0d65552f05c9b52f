import math

import pytest
import torch

from dinomx.classifiers import KNNClassifier
from dinomx.diagnostics import CollapseDetector, CollapseError, batch_diagnostics, effective_rank, entropy
from dinomx.online_eval import KNNMonitor
from dinomx.train import train
from tests.conftest import tiny_config

K = 16


def test_entropy_and_effective_rank_on_known_cases():
    assert entropy(torch.full((1, K), 1 / K)).item() == pytest.approx(math.log(K))
    assert entropy(torch.eye(K)[:1]).item() == pytest.approx(0.0, abs=1e-9)
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)
    assert effective_rank(torch.ones(8, 1) @ torch.randn(1, 5)) == pytest.approx(1.0, abs=1e-3)


def test_diagnostics_tell_uniform_from_one_prototype_collapse_and_health():
    n = 32
    logits = torch.randn(n, K)
    uniform = batch_diagnostics(torch.full((n, K), 1 / K), logits, 0.1, torch.randn(n, 8))
    assert uniform["teacher_entropy"] == pytest.approx(math.log(K)) and uniform["teacher_batch_entropy"] == pytest.approx(math.log(K))

    one = torch.zeros(n, K)
    one[:, 3] = 1
    single = batch_diagnostics(one, logits, 0.1, torch.randn(1, 8).expand(n, 8))
    assert single["teacher_entropy"] < 1e-6 and single["teacher_batch_entropy"] < 1e-6
    assert single["prototypes_in_use"] == 1 and single["embedding_rank"] == pytest.approx(1.0, abs=1e-3)
    assert single["embedding_std"] == pytest.approx(0.0, abs=1e-6)

    healthy_targets = torch.eye(K).repeat(2, 1)  # every prototype used, each sample sure of its own
    healthy = batch_diagnostics(healthy_targets, healthy_targets * 10, 0.1, torch.randn(n, 8))
    assert healthy["teacher_entropy"] < 1e-6 and healthy["teacher_batch_entropy"] == pytest.approx(math.log(K))
    assert healthy["prototypes_in_use"] == K and healthy["kl_teacher_student"] < 0.01 < single["kl_teacher_student"]


def test_collapse_detector_waits_for_the_warmup_and_for_persistence():
    flat = {"teacher_entropy": math.log(K), "teacher_batch_entropy": math.log(K), "prototypes_in_use": K}
    fine = {"teacher_entropy": 0.5, "teacher_batch_entropy": 2.5, "prototypes_in_use": 12}
    one = {"teacher_entropy": 0.01, "teacher_batch_entropy": 0.02, "prototypes_in_use": 1}
    detector = CollapseDetector(K, grace_steps=10, patience=2)
    assert [detector.update(step, flat) for step in (5, 10)] == [None, None]  # still warming up
    assert detector.update(11, flat) is None
    assert detector.update(12, flat).startswith("uniform collapse")
    assert detector.update(13, fine) is None  # recovered: the streak starts over
    assert detector.update(14, one) is None
    assert "one-prototype collapse" in detector.update(15, one)


def test_knn_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.02, 1.0]])
    knn = KNNClassifier(num_classes=2, k=3).fit(bank.numpy(), labels.numpy())
    assert knn.predict_proba(queries.numpy()).argmax(1).tolist() == [0, 1]


def test_training_reports_diagnostics_and_online_knn_every_eval_step(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "log_every": 3, "eval_every": 2, "eval_images": 40})
    logged = {}
    train(cfg, tiles / "train", on_log=lambda step, m: logged.setdefault(step, m), eval_root=tiles / "val")
    # Step 0: the network before any update, the baseline of the curve; then log and evaluation steps.
    assert sorted(logged) == [0, 2, 3, 4, 6] and set(logged[0]) == {"knn_top1"}
    assert all(0.0 <= logged[s]["knn_top1"] <= 1.0 for s in (0, 2, 4, 6)) and "knn_top1" not in logged[3]
    assert set(logged[6]) >= {"teacher_entropy", "teacher_batch_entropy", "kl_teacher_student", "prototypes_in_use",
                              "embedding_rank", "embedding_std", "grad_norm", "collapsed"}
    assert logged[6]["grad_norm"] > 0 and 1 <= logged[6]["embedding_rank"] <= 2 * cfg.train.batch_size


def test_online_knn_names_missing_labels(tiles, tmp_path):
    unlabelled = tmp_path / "flat" / "all"
    unlabelled.mkdir(parents=True)
    for path in list((tiles / "train").rglob("*.png"))[:4]:
        (unlabelled / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="online kNN needs labelled training images"):
        KNNMonitor(tmp_path / "flat", tiles / "val", 3, 32, (0.5,) * 3, (0.25,) * 3)


def _flat_teacher_config(tmp_path, **train_section):
    # A teacher temperature of 100 makes every teacher answer uniform: a collapse by construction.
    return tiny_config(teacher={"teacher_temp": 100.0, "warmup_teacher_temp": 100.0, "warmup_teacher_temp_epochs": 0},
                       optim={"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
                       train={"output_dir": str(tmp_path), "log_every": 1, **train_section})


def test_a_collapse_is_announced_once_and_flagged_in_the_metrics(tiles, tmp_path, caplog):
    seen, flags = [], []
    result = train(_flat_teacher_config(tmp_path), tiles / "train", on_log=lambda step, m: flags.append(m["collapsed"]),
                   on_collapse=lambda step, reason: seen.append((step, reason)))
    assert [step for step, _ in seen] == [3] and seen[0][1].startswith("uniform collapse")
    assert flags == [0, 0, 1, 1, 1, 1]
    assert result.collapse == seen[0][1] and "the representation collapsed" in caplog.text


def test_stop_on_collapse_stops_with_a_checkpoint(tiles, tmp_path):
    with pytest.raises(CollapseError, match="stopped at iteration 3 .*uniform collapse"):
        train(_flat_teacher_config(tmp_path, stop_on_collapse=True), tiles / "train")
    assert (tmp_path / "checkpoint.pt").is_file()


def test_collapse_watch_starts_after_the_warmups_even_with_prototypes_frozen_throughout():
    from dinomx.schedules import Schedules

    cfg = tiny_config(optim={"warmup_epochs": 1, "freeze_last_layer_epochs": 2},
                      teacher={"warmup_teacher_temp_epochs": 0}, train={"epochs": 2, "steps_per_epoch": 3})
    assert Schedules.from_config(cfg).warmup_steps == 3  # the lr warm-up, not the 6 frozen steps


def test_the_learning_verdict_compares_the_end_with_the_network_before_training():
    from dinomx.online_eval import learning_verdict

    assert learning_verdict(0.46, 0.61) == (True, "kNN 0.460 -> 0.610 (+0.150 over the network before training)")
    learned, verdict = learning_verdict(0.731, 0.719)
    assert not learned and verdict.startswith("did not learn: kNN 0.731 -> 0.719 (-0.012")
    assert not learning_verdict(0.70, 0.71)[0]  # within what another subset or seed moves
