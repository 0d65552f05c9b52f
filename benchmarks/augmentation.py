"""Training views per second: the photometric pass over a whole batch at once (what training
does: ``DataAugmentationDINO.collate``) against the same pass image by image (collate over each
image alone), on real images (scikit-learn's digits). Before the pass was batched it ran crop by
crop, slower still than image by image.

Both variants read and crop every image the same way (``CropDataset``); only the photometric
pass differs. They alternate in rounds (A B A B ...: the machine is shared and drifts); every
round is printed, then the median ratio and its range over rounds. One thread, as in a
DataLoader worker.

    .venv/bin/python benchmarks/augmentation.py [--config configs/small-cpu.yaml] [--augmentation gray]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.samples import digits
from dinomx.config import DinoMXConfig
from dinomx.data import ImageFolderDataset
from dinomx.sampling import CropDataset

REPO = Path(__file__).resolve().parents[1]


def batch_seconds(crops: CropDataset, batch: int, batches: int, per_image: bool) -> float:
    """Seconds per batch of views, over ``batches`` batches."""
    start = time.perf_counter()
    for b in range(batches):
        samples = [crops[(b * batch + i, (b * batch + i) % len(crops))] for i in range(batch)]
        if per_image:
            torch.cat([crops.augment.collate([s])["global_crops"] for s in samples])
        else:
            crops.augment.collate(samples)
    return (time.perf_counter() - start) / batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "small-cpu.yaml")
    parser.add_argument("--augmentation", choices=["rgb", "gray", "ct", "he"], default=None,
                        help="photometric table (default: the config's)")
    parser.add_argument("--batches", type=int, default=10, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = DinoMXConfig.from_yaml(args.config, [f"dataset.augmentation={args.augmentation}"] if args.augmentation else [])
    data = digits(Path(tempfile.mkdtemp(prefix="dinomx-augmentation-")), size=cfg.crops.global_crops_size)
    crops = CropDataset(ImageFolderDataset(data / "train", cfg.student.num_channels), cfg)
    batch = cfg.train.batch_size
    views = batch * (2 + cfg.crops.local_crops_number)
    print(f"{args.config.name}, table {cfg.dataset.augmentation!r}: batches of {batch} images ({views} views), "
          f"{cfg.crops.global_crops_size} px global / {cfg.crops.local_crops_size} px local crops")
    batch_seconds(crops, batch, 2, per_image=False)  # warm-up
    ratios, per_batch = [], []
    print(f"{'round':>5} {'per batch s':>12} {'per image s':>12} {'ratio':>6}")
    for r in range(args.rounds):
        together = batch_seconds(crops, batch, args.batches, per_image=False)
        alone = batch_seconds(crops, batch, args.batches, per_image=True)
        ratios.append(alone / together)
        per_batch.append(together)
        print(f"{r:>5} {together:>12.4f} {alone:>12.4f} {ratios[-1]:>6.2f}")
    print(f"per image / per batch, median over {args.rounds} rounds: {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}); views per second, per batch: {views / statistics.median(per_batch):.0f}")


if __name__ == "__main__":
    main()
