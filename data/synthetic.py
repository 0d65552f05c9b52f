"""Generate the demo dataset: small tissue-like texture tiles in four classes.

The class lives in the *structure* (stripes, nuclei, glands, a fat-cell mesh); stain colour and
brightness vary a little from tile to tile. Self-supervised training has to learn the structure,
which is what the demo's kNN evaluation measures.

Output layout: ``<out>/<split>/<class>/<class>_<index>.png`` (an image folder per split), and
``tiling.json``: the tiles stand for fields of ``image_size`` px at ``magnification`` of a slide with
at least half tissue, which is how a model trained on them cuts a real slide (``projects.predict``). With
``annotations``, the ground truth the generator drew from: ``masks/<split>/<class>/<name>.png``
(0 background, 1 stained structure; ``classes.json``) and ``targets.csv`` (each tile's structure
fraction, a continuous target for regression).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data.tiling import TILING, slide_record

CLASSES = ("adipose", "glands", "nuclei", "stroma")
SPLITS = ("train", "val")


def _grid(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    return u, v


def _mask(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground weight in [0, 1] for one tile of the given class."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if cls == "stroma":
        u, _ = _grid(size, rng)
        period = rng.uniform(5, 9)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if cls == "adipose":
        u, v = _grid(size, rng)
        period = rng.uniform(8, 12)
        lines = np.maximum(np.abs(((u / period) % 1) - 0.5), np.abs(((v / period) % 1) - 0.5))
        return (lines > 0.38).astype(np.float32)
    if cls == "nuclei":
        mask = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(6, 12)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, 3.0)
            mask = np.maximum(mask, ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(np.float32))
        return mask
    if cls == "glands":
        mask = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(size * 0.25, size * 0.75, size=2)
            r = rng.uniform(size * 0.18, size * 0.35)
            dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
            mask = np.maximum(mask, (np.abs(dist - r) < 1.5).astype(np.float32))
        return mask
    raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


HEMATOXYLIN = np.array([0.35, 0.22, 0.55])
EOSIN = np.array([0.92, 0.55, 0.72])


def make_tile(cls: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The tile and its ground truth: which pixels are stained structure (haematoxylin)."""
    mask = _mask(cls, size, rng)[..., None]
    # Stain and scanner vary from tile to tile, but less than the augmentations do: colour must
    # not become a shortcut that self-supervision could latch on to instead of structure.
    foreground = HEMATOXYLIN + rng.normal(0, 0.05, 3)
    background = EOSIN + rng.normal(0, 0.05, 3)
    img = (mask * foreground + (1 - mask) * background) * rng.uniform(0.85, 1.1)
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask[..., 0] > 0.5


def _replace(staging: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def generate(out: str | Path, seed: int, image_size: int, train_per_class: int, val_per_class: int,
             annotations: str | Path | None = None, magnification: float = 10.0) -> Path:
    """Write the dataset to ``out`` atomically: a failure leaves no half-written dataset."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    notes = Path(annotations).with_name(Path(annotations).name + ".partial") if annotations else None
    for folder in (staging, notes):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    counts = {"train": train_per_class, "val": val_per_class}
    targets = []
    for split_index, split in enumerate(SPLITS):
        for class_index, cls in enumerate(CLASSES):
            (staging / split / cls).mkdir(parents=True)
            for i in range(counts[split]):
                # One generator per tile: a tile's pixels do not depend on how many come before it.
                rng = np.random.default_rng([seed, split_index, class_index, i])
                tile, structure = make_tile(cls, image_size, rng)
                relative = f"{split}/{cls}/{cls}_{i:04d}.png"
                Image.fromarray(tile).save(staging / relative)
                if notes is not None:
                    (notes / "masks" / split / cls).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(structure.astype(np.uint8)).save(notes / "masks" / relative)
                    targets.append({"path": relative, "structure_fraction": round(float(structure.mean()), 6)})
    (staging / TILING).write_text(slide_record((magnification,), image_size, min_tissue=0.5))
    if notes is not None:
        (notes / "classes.json").write_text(json.dumps(["background", "structure"]))
        with open(notes / "targets.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "structure_fraction"])
            writer.writeheader()
            writer.writerows(targets)
        _replace(notes, Path(annotations))
    _replace(staging, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--annotations", help="also write masks/, classes.json and targets.csv here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--magnification", type=float, default=10.0, help="the field of view a tile stands for")
    args = parser.parse_args(argv)
    out = generate(args.out, args.seed, args.image_size, args.train_per_class, args.val_per_class, args.annotations,
                   args.magnification)
    print(f"wrote {len(list(out.rglob('*.png')))} tiles to {out}")


if __name__ == "__main__":
    main()
