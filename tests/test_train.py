import logging
import math

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


def test_ibot_koleo_and_sinkhorn_train_together(tiles, tmp_path):
    cfg = tiny_config(
        train={"output_dir": str(tmp_path)},
        dino_head={"koleo_loss_weight": 0.1, "centering": "sinkhorn_knopp"},
        ibot={"loss_weight": 1.0, "mask_sample_probability": 1.0, "separate_head": True,
              "out_dim": 48, "hidden_dim": 32, "bottleneck_dim": 16},
    )
    logged = []
    train(cfg, tiles / "train", on_log=lambda step, m: logged.append(m))
    assert {"ibot_loss", "koleo_loss", "dino_global_loss"} <= set(logged[-1])
    assert all(math.isfinite(m["ibot_loss"]) and m["ibot_loss"] > 0 for m in logged)


@pytest.mark.parametrize("arch", ["vit", "dinov2_with_registers"])
def test_other_backbones_train_with_ibot(tiles, tmp_path, arch):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "epochs": 1}, student={"arch": arch, "num_register_tokens": 2},
                      ibot={"loss_weight": 1.0, "mask_sample_probability": 1.0})
    result = train(cfg, tiles / "train")
    assert AutoModel.from_pretrained(result.backbone_dir).config.model_type == cfg.student.arch


def test_resume_after_a_kill_continues_the_same_loss_curve(tiles, tmp_path):
    sections = dict(ibot={"loss_weight": 1.0}, dino_head={"koleo_loss_weight": 0.1})
    straight = []
    train(tiny_config(train={"output_dir": str(tmp_path / "a"), "log_every": 1}, **sections), tiles / "train",
          on_log=lambda step, m: straight.append(m["total_loss"]))

    class Killed(Exception):
        pass

    def die_at_4(step, metrics):
        resumed.append(metrics["total_loss"])
        if step == 4:
            raise Killed

    resumed: list[float] = []
    cfg = tiny_config(train={"output_dir": str(tmp_path / "b"), "log_every": 1, "checkpoint_every": 2}, **sections)
    with pytest.raises(Killed):
        train(cfg, tiles / "train", on_log=die_at_4)
    # Killed after step 4 was checkpointed; the resumed run repeats nothing and diverges nowhere.
    resumed = resumed[:4]
    result = train(cfg, tiles / "train", on_log=lambda step, m: resumed.append(m["total_loss"]), resume_from=tmp_path / "b")
    assert resumed == straight
    assert result.checkpoint.is_file()


def test_resume_refuses_another_config(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path)})
    train(cfg, tiles / "train")
    other = tiny_config(train={"output_dir": str(tmp_path), "epochs": 3}, optim={"lr": 0.01})
    with pytest.raises(ValueError, match="written with a different config"):
        train(other, tiles / "train", resume_from=tmp_path)
