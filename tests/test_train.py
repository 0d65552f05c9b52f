import logging

import pytest
import torch
from transformers import AutoModel

from dinomx.embed import Embedder
from dinomx.train import train
from tests.conftest import tiny_config


def test_train_logs_all_metrics_and_saves_an_automodel_backbone(tiles, tmp_path, caplog):
    cfg = tiny_config(train={"output_dir": str(tmp_path / "run")})
    logged = []
    with caplog.at_level(logging.INFO, logger="dinomx.train"):
        result = train(cfg, tiles / "train", on_log=lambda step, m: logged.append((step, m)))
    assert [step for step, _ in logged] == [2, 4, 6]
    assert set(logged[-1][1]) >= {"total_loss", "dino_global_loss", "dino_local_loss", "lr", "wd",
                                  "teacher_momentum", "teacher_temp"}
    assert "it 6/6  loss" in caplog.text
    # The teacher momentum follows its cosine schedule up to the final value.
    assert logged[0][1]["teacher_momentum"] < logged[-1][1]["teacher_momentum"] <= 1.0

    model = AutoModel.from_pretrained(result.backbone_dir)
    assert model.config.model_type == "dinov2" and model.config.hidden_size == 32
    embeddings = Embedder.from_pretrained(result.backbone_dir).embed_folder(tiles / "val")[0]
    assert embeddings.shape == (32, 32) and torch.isfinite(torch.from_numpy(embeddings)).all()


def test_train_is_deterministic_for_a_seed(tiles, tmp_path):
    losses = []
    for run in ("a", "b"):
        cfg = tiny_config(train={"output_dir": str(tmp_path / run)})
        metrics = []
        train(cfg, tiles / "train", on_log=lambda step, m: metrics.append(m["total_loss"]))
        losses.append(metrics)
    assert losses[0] == losses[1]


def test_divergence_stops_with_a_clear_message(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path)}, optim={"lr": 1e30, "warmup_epochs": 0})
    with pytest.raises(FloatingPointError, match="loss became .* at iteration"):
        train(cfg, tiles / "train")


def test_batch_larger_than_dataset_is_refused(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "batch_size": 1000})
    with pytest.raises(ValueError, match="train.batch_size=1000 is larger than the dataset"):
        train(cfg, tiles / "train")
