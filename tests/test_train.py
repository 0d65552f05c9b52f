import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image
from transformers import AutoModel

from data.shards import pack_folder
from dinomx.backbone import Backbone, pretrained_student
from dinomx.checkpoint import CHECKPOINT_NAME, ResumeError, read_checkpoint
from dinomx.config import DatasetConfig, StudentConfig
from dinomx.distillation import FrozenTeacher
from dinomx.embed import Embedder
from dinomx.errors import DataError, MissingInput
from dinomx.interrupt import Interrupted
from dinomx.model import build_models, ema_pairs, ema_update, param_groups, share_frozen
from dinomx.sampling import StreamSampler
from dinomx.train import train
from scripts.demo import free_port
from tests.conftest import tiny_config


def test_train_logs_all_metrics_and_saves_an_automodel_backbone(tiles, tmp_path, caplog):
    cfg = tiny_config(train={"output_dir": str(tmp_path / "run")})
    logged = []
    with caplog.at_level(logging.INFO, logger="dinomx.train"):
        result = train(cfg, tiles / "train", on_log=lambda step, m: logged.append((step, m)))
    assert [step for step, _ in logged] == [2, 4, 6]
    assert set(logged[-1][1]) >= {"total_loss", "dino_global_loss", "dino_local_loss", "lr", "wd",
                                  "teacher_momentum", "teacher_temp"}
    assert "it 6/6 (0s left)  loss" in caplog.text and re.search(r"it 2/6 \(\d+s left\)", caplog.text)
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
        train(cfg, tiles / "train", on_log=lambda step, m, out=metrics: out.append(m["total_loss"]))
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
        student={"gradient_checkpointing": True},
        dino_head={"koleo_loss_weight": 0.1, "centering": "sinkhorn_knopp"},
        ibot={"loss_weight": 1.0, "mask_sample_probability": 1.0, "separate_head": True,
              "out_dim": 48, "hidden_dim": 32, "bottleneck_dim": 16},
    )
    logged = []
    train(cfg, tiles / "train", on_log=lambda step, m: logged.append(m))
    assert {"ibot_loss", "koleo_loss", "dino_global_loss"} <= set(logged[-1])
    assert build_models(cfg)[0].backbone.model.is_gradient_checkpointing
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


def test_resume_from_a_file_that_is_no_checkpoint_says_so(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    whole = (tmp_path / "weights.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "tile.png")
    for name, problem in (("cut.pt", "is not a readable checkpoint"), ("empty.pt", "is not a readable checkpoint"),
                          ("tile.png", "is not a readable checkpoint"), ("weights.pt", "is a torch file but not a DINO-MX")):
        with pytest.raises(ResumeError, match=rf"resume_from: {tmp_path / name} {problem}"):
            read_checkpoint(tmp_path / name, tiny_config())


def _backbone_params(model_dir):
    return {k: v.clone() for k, v in AutoModel.from_pretrained(model_dir).state_dict().items()}


def test_freezing_keeps_the_first_blocks_and_embeddings(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path)}, student={"freeze_blocks": 1},
                      teacher={"momentum_teacher": 0.0, "final_momentum_teacher": 0.0})
    set_seed(cfg.train.seed)  # as train() does: the same initial weights
    student, _ = build_models(cfg)
    initial = {k: v.clone() for k, v in student.backbone.model.state_dict().items()}
    trained = _backbone_params(train(cfg, tiles / "train").backbone_dir)
    assert torch.equal(trained["encoder.layer.0.attention.q_proj.weight"], initial["encoder.layer.0.attention.q_proj.weight"])
    assert torch.equal(trained["embeddings.patch_embeddings.projection.weight"], initial["embeddings.patch_embeddings.projection.weight"])
    assert not torch.equal(trained["encoder.layer.1.attention.q_proj.weight"], initial["encoder.layer.1.attention.q_proj.weight"])


def test_lora_trains_adapters_only_and_exports_a_merged_automodel(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path)}, lora_config={"enabled": True, "r": 4, "alpha": 8},
                      student={"freeze_blocks": 1}, teacher={"momentum_teacher": 0.0, "final_momentum_teacher": 0.0})
    set_seed(cfg.train.seed)
    student, teacher = build_models(cfg)
    trainable = [n for n, p in student.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "layer.1." in n for n in trainable)
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    initial = {k: v.clone() for k, v in student.backbone.export_model().state_dict().items()}

    trained = _backbone_params(train(cfg, tiles / "train").backbone_dir)
    assert not any("lora" in k for k in trained)
    assert set(trained) == set(initial)
    assert torch.equal(trained["encoder.layer.0.attention.q_proj.weight"], initial["encoder.layer.0.attention.q_proj.weight"])
    # Adapters were merged into the targeted projections of the unfrozen block, nowhere else.
    assert not torch.equal(trained["encoder.layer.1.attention.q_proj.weight"], initial["encoder.layer.1.attention.q_proj.weight"])
    assert torch.equal(trained["encoder.layer.1.attention.k_proj.weight"], initial["encoder.layer.1.attention.k_proj.weight"])


def test_the_teacher_shares_the_students_frozen_weights_and_the_ema_moves_only_trained_ones():
    cfg = tiny_config(lora_config={"enabled": True, "r": 4, "alpha": 8})
    student, teacher = build_models(cfg)
    frozen = [name for name, p in student.named_parameters() if not p.requires_grad]
    saved = share_frozen(student, teacher)
    assert frozen and saved == sum(p.numel() for p in student.parameters() if not p.requires_grad)
    s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert all(t[name] is s[name] for name in frozen)  # one tensor for both: the teacher's copy is gone
    assert not any(t[name] is s[name] for name in s if s[name].requires_grad)
    teacher_params, student_params = ema_pairs(teacher, student)
    assert len(student_params) == sum(p.requires_grad for p in student.parameters()) < len(s)
    before = {name: p.detach().clone() for name, p in s.items()}
    with torch.no_grad():
        for p in student_params:
            p.add_(1.0)
    ema_update(teacher_params, student_params, 0.5)
    assert all(torch.equal(s[name], before[name]) for name in frozen)  # frozen weights stay bit for bit
    moved = next(name for name in s if s[name].requires_grad)
    assert torch.allclose(t[moved], before[moved] + 0.5)


def test_unknown_lora_target_names_the_key(tmp_path):
    cfg = tiny_config(lora_config={"enabled": True, "target_modules": ["qkv"]})
    with pytest.raises(ValueError, match="lora_config.target_modules"):
        build_models(cfg)


def test_a_pretrained_source_that_is_not_there_names_the_key_that_named_it(tmp_path):
    with pytest.raises(MissingInput, match=r"^student.pretrained: 'org/name' is neither 'scratch', 'hf:<repo id>' nor a directory"):
        pretrained_student(tiny_config(student={"pretrained": "org/name"}))
    gone = str(tmp_path / "gone")
    with pytest.raises(MissingInput, match=rf"^distillation.teachers: '{gone}' is neither 'hf:<repo id>' nor a directory"):
        FrozenTeacher.load(gone, (0.5,) * 3, (0.25,) * 3, 32)


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_process_cpu_run_saves_one_backbone(tiles, tmp_path, kind):
    """DDP reads shards (each process its own, two DataLoader workers each), FSDP the folder."""
    cfg = tiny_config(train={"output_dir": str(tmp_path / "out"), "batch_size": 4}, distribution={"type": kind},
                      lora_config={"enabled": kind == "fsdp"}, dataset={"num_workers": 2 if kind == "ddp" else 0})
    data = tiles / "train"
    if kind == "ddp":
        data = tmp_path / "shards"
        assert len(pack_folder(tiles / "train", data, max_bytes=4 << 10).shards) >= 4
    run = subprocess.run(_torchrun(tmp_path, cfg, "--data", str(data)), capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "2 process(es), DistributedType.MULTI_CPU" in log
    assert "it 6/6" in log and "batch 8" in log  # the global batch spans both processes
    model = AutoModel.from_pretrained(tmp_path / "out" / "backbone")
    assert model.config.hidden_size == 32 and not any("lora" in k for k in model.state_dict())


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test of another precision needs its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _torchrun(tmp_path, cfg, *extra):
    cfg.to_yaml(tmp_path / "c.yaml")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "dinomx.cli", "--config", str(tmp_path / "c.yaml"), *extra]


@pytest.mark.slow  # two torchrun processes
def test_fsdp_checkpoint_of_two_processes_resumes_in_one(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path / "out"), "batch_size": 4, "log_every": 1, "checkpoint_every": 2},
                      distribution={"type": "fsdp"}, ibot={"loss_weight": 1.0})
    # Killed by hand once step 4 is logged (its checkpoint is written before the log line): torchrun
    # and its workers, which it starts in sessions of their own. Left alive, they would train on to
    # step 6 and write the checkpoint this test resumes from while it resumes (seen with one thread a
    # worker).
    run = subprocess.Popen(_torchrun(tmp_path, cfg, "--data", str(tiles / "train")), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "it 4/6" in line:
            launcher = psutil.Process(run.pid)
            processes = [launcher, *launcher.children(recursive=True)]
            for process in processes:
                process.kill()
            psutil.wait_procs(processes, timeout=60)
            break
    run.wait(timeout=60)
    log = "".join(seen)
    assert "2 process(es), DistributedType.MULTI_CPU" in log and "it 4/6" in log, log[-3000:]
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["step"] == 4

    single = cfg.replace(distribution=cfg.distribution.replace(type="ddp"))
    steps = []
    result = train(single, tiles / "train", on_log=lambda step, m: steps.append(step), resume_from=tmp_path / "out")
    assert steps == [5, 6]
    assert AutoModel.from_pretrained(result.backbone_dir).config.hidden_size == 32


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_at_that_iteration_and_resumes_there(tiles, tmp_path, signum):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "log_every": 1, "checkpoint_every": 0},
                      dataset={"num_workers": 1})

    def notice_at_step_2(step, metrics):
        if step == 2:  # the scheduler's notice arrives mid-run (a DataLoader worker gets it too)
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted, match=f"{signal.Signals(signum).name} at iteration 2") as stopped:
        train(cfg, tiles / "train", on_log=notice_at_step_2)
    assert stopped.value.step == 2
    # The held exception keeps the loop's frame; its workers (which ignore the signal) ended anyway,
    # else interpreter exit would wait on them forever.
    assert not multiprocessing.active_children()
    assert torch.load(stopped.value.checkpoint, weights_only=True)["step"] == 2
    assert signal.getsignal(signum) is signal.SIG_DFL  # the process's own handling is back

    steps = []
    train(cfg, tiles / "train", on_log=lambda step, m: steps.append(step), resume_from=stopped.value.checkpoint)
    assert steps == [3, 4, 5, 6]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named_and_the_workers_end(tiles, tmp_path, workers):
    data = shutil.copytree(tiles / "train", tmp_path / "train")
    for path in data.glob("*/*.png"):
        path.write_bytes(path.read_bytes()[:100])
    cfg = tiny_config(train={"output_dir": str(tmp_path / "run")}, dataset={"num_workers": workers})
    with pytest.raises(DataError) as refused:
        train(cfg, data)
    # One line naming the file, not the worker's traceback that torch re-raises it with.
    assert re.fullmatch(rf"{data}/\w+/\w+\.png: not a readable image \(truncated or corrupt after 100 bytes .*\)",
                        str(refused.value)), str(refused.value)
    # The held error does not keep the worker alive (interpreter exit would wait for it forever).
    assert not multiprocessing.active_children()


def test_fsdp_needs_several_processes(tiles, tmp_path):
    with pytest.raises(ValueError, match="distribution.type: fsdp shards over several processes"):
        train(tiny_config(train={"output_dir": str(tmp_path)}, distribution={"type": "fsdp"}), tiles / "train")


def test_bf16_mixed_precision_trains_on_cpu(tiles, tmp_path, fresh_accelerate_state):
    cfg = tiny_config(train={"output_dir": str(tmp_path)}, distribution={"mixed_precision": "bf16"})
    logged = []
    train(cfg, tiles / "train", on_log=lambda step, m: logged.append(m["total_loss"]))
    assert len(logged) == 3 and all(math.isfinite(v) for v in logged)


@pytest.mark.parametrize(("channels", "table"), [(1, "ct"), (3, "he")])
def test_medical_tables_train_and_embed(tiles, tmp_path, channels, table):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "epochs": 1}, student={"num_channels": channels},
                      dataset={"mean": [0.5] * channels, "std": [0.25] * channels, "augmentation": table})
    result = train(cfg, tiles / "train")
    assert AutoModel.from_pretrained(result.backbone_dir).config.num_channels == channels
    embeddings, _, _ = Embedder.from_pretrained(result.backbone_dir).embed_folder(tiles / "val")
    assert embeddings.shape == (32, 32)


def test_layerwise_lr_decay_scales_by_depth():
    cfg = tiny_config(optim={"layerwise_decay": 0.5})
    student, _ = build_models(cfg)
    scale_of = {id(p): g["lr_scale"] for g in param_groups(student, 0.5) for p in g["params"]}
    named = dict(student.named_parameters())
    assert scale_of[id(named["backbone.model.embeddings.patch_embeddings.projection.weight"])] == 0.125
    assert scale_of[id(named["backbone.model.encoder.layer.0.mlp.fc1.weight"])] == 0.25
    assert scale_of[id(named["backbone.model.encoder.layer.1.mlp.fc1.weight"])] == 0.5
    assert scale_of[id(named["backbone.model.layernorm.weight"])] == 1.0
    assert scale_of[id(named["dino_head.mlp.0.weight"])] == 1.0


def _saved_teacher(path, arch="vit", hidden=48, patch=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    backbone = Backbone.from_config(StudentConfig(arch=arch, image_size=32, patch_size=patch, hidden_size=hidden,
                                                  num_hidden_layers=1, num_attention_heads=2))
    backbone.save_pretrained(path, DatasetConfig(mean=mean, std=std), 32)
    return str(path)


def test_teacher_renormalises_student_crops_to_its_own_statistics(tmp_path):
    path = _saved_teacher(tmp_path / "t", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    teacher = FrozenTeacher.load(path, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_size=32)
    raw = torch.rand(1, 3, 32, 32)
    as_student = (raw - 0.5) / 0.25
    expected = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(as_student * teacher.scale + teacher.shift, expected, atol=1e-5)
    with pytest.raises(ValueError, match="patch size 8, which does not divide crops.global_crops_size=20"):
        FrozenTeacher.load(path, (0.5,) * 3, (0.25,) * 3, crop_size=20)


def test_multi_teacher_distillation_learns_to_match_the_teachers(tiles, tmp_path):
    teachers = [_saved_teacher(tmp_path / "vit"), _saved_teacher(tmp_path / "dinov2", arch="dinov2", hidden=24, patch=4)]
    cfg = tiny_config(train={"output_dir": str(tmp_path / "out"), "epochs": 4, "log_every": 1},
                      distillation={"teachers": teachers, "loss_weight": 1.0}, optim={"lr": 0.003})
    student, _ = build_models(cfg)
    # Teachers of any width are compared by neighbourhoods: the student gets no parameters for them.
    assert not any("distill" in name for name, _ in student.named_parameters())
    logged = []
    train(cfg, tiles / "train", on_log=lambda step, m: logged.append(m["distill_loss"]))
    assert len(logged) == 12 and sum(logged[-3:]) < sum(logged[:3])


def test_magnification_aware_distillation_feeds_teachers_the_paired_tiles(tiles, tmp_path):
    low = tmp_path / "low"
    for path in (tiles / "train").rglob("*.png"):
        target = low / path.relative_to(tiles / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).resize((64, 64)).save(target)  # stands in for the 4x wider field of view
    cfg = tiny_config(train={"output_dir": str(tmp_path / "out")},
                      distillation={"teachers": [_saved_teacher(tmp_path / "t")], "paired_root": str(low)})
    logged = []
    train(cfg, tiles / "train", on_log=lambda step, m: logged.append(m))
    assert all(math.isfinite(m["distill_loss"]) for m in logged)

    next(low.rglob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 96 tiles have no low-magnification pair"):
        train(cfg, tiles / "train")


def test_label_guided_training_reads_masks_and_names_missing_ones(tiles, tmp_path):
    masks = tmp_path / "masks"
    for path in (tiles / "train").rglob("*.png"):
        target = masks / path.relative_to(tiles / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(target)
    cfg = tiny_config(train={"output_dir": str(tmp_path / "out"), "epochs": 1},
                      crops={"label_masks_root": str(masks), "label_guided_probability": 1.0})
    assert train(cfg, tiles / "train").steps == 3
    next(masks.rglob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="crops.label_masks_root: 1 of 96 tiles have no label mask"):
        train(cfg, tiles / "train")


def test_stream_sampler_deals_each_step_from_one_shard():
    sampler = StreamSampler(num_items=10, start=0, end=4 * 6, seed=0, shards=2, step_size=4)
    pairs = list(sampler)
    for step in range(6):
        indices = [index for _, index in pairs[step * 4 : (step + 1) * 4]]
        assert all(index % 2 == step % 2 for index in indices)
    single = [index for _, index in StreamSampler(num_items=10, start=0, end=20, seed=0)]
    assert sorted(single[:10]) == list(range(10)) and sorted(single[10:]) == list(range(10))
    # Resuming mid-stream yields the same continuation.
    assert list(StreamSampler(10, 12, 24, 0, 2, 4)) == pairs[12:]


def test_multi_expert_training_aggregates_experts_into_one_teacher(tiles, tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "num_experts": 2, "log_every": 1, "checkpoint_every": 2})
    losses = []
    result = train(cfg, tiles / "train", on_log=lambda step, m: losses.append(m["total_loss"]))
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    state = torch.load(result.checkpoint, weights_only=True)
    assert len(state["students"]) == 2 and len(state["optimizers"]) == 2
    # The experts saw different data, so they differ; the teacher is their running average.
    a, b = (s["backbone.model.encoder.layer.0.mlp.fc1.weight"] for s in state["students"])
    assert not torch.equal(a, b)
    again = []
    cfg_b = tiny_config(train={"output_dir": str(tmp_path / "b"), "num_experts": 2, "log_every": 1})
    train(cfg_b, tiles / "train", on_log=lambda step, m: again.append(m["total_loss"]))
    assert again == losses  # deterministic per seed, experts included


@pytest.mark.parametrize(("minutes", "written"), [(1e-6, True), (0.0, False)])
def test_a_checkpoint_is_written_every_few_minutes_of_training(tiles, tmp_path, minutes, written):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "checkpoint_every": 0, "checkpoint_every_minutes": minutes})
    seen = {}
    train(cfg, tiles / "train", on_log=lambda step, _: seen.setdefault(step, (tmp_path / CHECKPOINT_NAME).is_file()))
    assert seen[2] is written  # before the end of training, which always writes one


@pytest.mark.parametrize(("seconds", "lines"), [(1e-9, [1, 2, 3, 4, 5]), (0.0, [])])
def test_off_a_terminal_a_progress_line_comes_every_few_seconds_between_log_steps(tiles, tmp_path, caplog, seconds, lines):
    cfg = tiny_config(train={"output_dir": str(tmp_path), "log_every": 6, "progress_every_seconds": seconds})
    with caplog.at_level(logging.INFO, logger="dinomx.train"):
        train(cfg, tiles / "train")
    short = [re.fullmatch(r"it (\d)/6 \(\d+s left\)  [\d.]+ it/s  [\d.]+ img/s", r.getMessage()) for r in caplog.records]
    assert [int(m[1]) for m in short if m] == lines
    assert "it 6/6 (0s left)  loss" in caplog.text


def test_a_checkpoint_of_other_modules_is_refused_naming_resume_from():
    from dinomx.checkpoint import ResumeError, restore

    cfg = tiny_config()
    student, teacher = build_models(cfg)
    old = {"students": [{**student.state_dict(), "distill_heads.0.weight": torch.zeros(4, 4)}],
           "teacher": teacher.state_dict(), "losses": {}}
    with pytest.raises(ResumeError, match=r"resume_from: the checkpoint holds other modules .*distill_heads"):
        restore(old, [student], teacher, torch.nn.Module())


def test_the_engine_cli_ends_with_the_learning_verdict_in_words(tiles, tmp_path, capsys, fresh_accelerate_state):
    from dinomx.cli import main

    cfg = tiny_config(train={"output_dir": str(tmp_path / "out"), "eval_every": 3})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert main(["--config", str(tmp_path / "c.yaml"), "--data", str(tiles / "train"), "--eval-data",
                 str(tiles / "val"), "--skip-validation-gate"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert said[0].startswith("saved ") and re.fullmatch(
        r"(learned|did NOT learn): kNN \d\.\d{3} -> \d\.\d{3} \([+-]\d\.\d{3} over the network before training\)"
        r"(; needs at least \+[\d.]+)?", said[1]), said
    assert main(["--config", str(tmp_path / "c.yaml"), "--data", str(tiles / "train"), "--skip-validation-gate"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("learning not measured: give --eval-data")
