"""Train-step throughput of DINO-MX against lightly's DINO on the same HF ViT, batch and crops.

Both read the same data pipeline (DINO-MX's multi-crop loader over generated tiles) and train
the same `transformers` backbone from the same initialisation; what differs is the training step
(heads, loss, EMA, how views are batched through the backbone). The two alternate in rounds
(A B A B ...: the machine is shared and drifts); every round is printed, then the median ratio and
its range over rounds.

lightly needs torchvision, which does not import beside the CPU build of torch 2.13 this
project pins; run it in an environment whose torch and torchvision match, e.g.

    python -m venv /tmp/bench && /tmp/bench/bin/pip install torch torchvision lightly==1.6.0 \\
        transformers peft accelerate pyyaml pillow
    PYTHONPATH=. /tmp/bench/bin/python benchmarks/vs_lightly.py --steps 30 [--config configs/demo.yaml]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.synthetic import generate
from dinomx.backbone import Backbone
from dinomx.config import DinoMXConfig
from dinomx.data import ImageFolderDataset
from dinomx.sampling import CropDataset, StreamSampler
from dinomx.train import train

WARMUP = 5


def dinomx_images_per_sec(cfg: DinoMXConfig, data: Path) -> float:
    stamps = []
    train(cfg, data, on_log=lambda step, metrics: stamps.append(time.perf_counter()))
    timed = stamps[WARMUP:]
    return (len(timed) - 1) * cfg.train.batch_size / (timed[-1] - timed[0])


def lightly_images_per_sec(cfg: DinoMXConfig, data: Path, device: torch.device) -> float:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(cfg.train.seed)
    h = cfg.dino_head
    backbone = Backbone.from_config(cfg.student)
    def head():
        return DINOProjectionHead(backbone.embed_dim, h.hidden_dim, h.bottleneck_dim, h.out_dim,
                                  freeze_last_layer=cfg.optim.freeze_last_layer_epochs)

    student_head = head()
    student = torch.nn.ModuleDict({"backbone": backbone, "head": student_head}).to(device)
    # lightly's head uses the legacy weight_norm, which cannot be deep-copied: build, then copy weights.
    teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": head()}).to(device)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=h.out_dim, warmup_teacher_temp=cfg.teacher.warmup_teacher_temp,
                         teacher_temp=cfg.teacher.teacher_temp,
                         warmup_teacher_temp_epochs=cfg.teacher.warmup_teacher_temp_epochs).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def forward(model, x):
        return model["head"](model["backbone"](x)[0])

    images = ImageFolderDataset(data, cfg.student.num_channels)
    crops = CropDataset(images, cfg)
    total = cfg.total_steps
    loader = torch.utils.data.DataLoader(
        crops, batch_size=cfg.train.batch_size, collate_fn=crops.augment.collate, drop_last=True,
        sampler=StreamSampler(len(images), 0, total * cfg.train.batch_size, cfg.train.seed),
        num_workers=cfg.dataset.num_workers,
    )
    stamps = []
    for step, batch in enumerate(loader):
        epoch = step // cfg.train.steps_per_epoch
        momentum = cosine_schedule(step, total, cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher)
        update_momentum(student, teacher, m=momentum)
        global_views = list(batch["global_crops"].to(device).chunk(2))
        local_views = list(batch["local_crops"].to(device).chunk(cfg.crops.local_crops_number)) if "local_crops" in batch else []
        teacher_out = [forward(teacher, v) for v in global_views]
        student_out = [forward(student, v) for v in global_views + local_views]
        loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # synchronise, as DINO-MX's NaN check does every step
        stamps.append(time.perf_counter())
    timed = stamps[WARMUP:]
    return (len(timed) - 1) * cfg.train.batch_size / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["train.epochs=1", f"train.steps_per_epoch={args.steps + WARMUP}", "train.log_every=1",
                     f"train.output_dir={tmp}/out"]
        if args.batch_size:
            overrides.append(f"train.batch_size={args.batch_size}")
        cfg = DinoMXConfig.from_yaml(args.config, overrides)
        size = cfg.student.image_size
        data = generate(Path(tmp) / "tiles", seed=0, image_size=size, train_per_class=64, val_per_class=1) / "train"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        print(f"device {name}, torch {torch.__version__}, batch {cfg.train.batch_size}, "
              f"2x{cfg.crops.global_crops_size}px + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}px crops")
        ratios = []
        for round_ in range(args.rounds):
            ours = dinomx_images_per_sec(cfg, data)
            theirs = lightly_images_per_sec(cfg, data, device)
            ratios.append(ours / theirs)
            print(f"round {round_ + 1}: DINO-MX {ours:8.1f} img/s  lightly {theirs:8.1f} img/s  ratio {ratios[-1]:.2f}x")
    print(f"ratio DINO-MX/lightly: median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f} "
          f"over {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
