"""Real labelled images that installed packages ship, written as image folders.

The engine's learning is checked on images that no one here generated, of four kinds, all
inside wheels the project installs, so they are on every machine and need no download:

- ``digits``: the UCI handwritten digits scikit-learn carries (1797 scans, 8x8, 17 grey levels,
  10 classes). Every fourth image of each class goes to ``val``.
- ``textures``: patches of eight photographs scikit-image carries (brick, grass, gravel, an IHC
  stain, a retina, coffee, coins, the moon), one class per photograph. Train patches come from the
  top 70 % of each photograph and val patches from the rest, so no pixel is in both splits. The
  patches are grey, so that colour alone does not name the class.
- ``faces``: scikit-image's ``lfw_subset``, 100 faces (Labeled Faces in the Wild) and 100 patches
  of other photographs, 25x25 grey; every fourth of each class goes to ``val``.
- ``photos``: colour patches of eight other photographs (an astronaut, a cat, the Hubble deep
  field, a rocket, a motorcycle, a Chinese temple, a flower, Grace Hopper), cut as the textures
  are, in colour: the one set where colour names much of the class, as stain does in H&E.

    python -m data.samples textures out/textures --size 32

Layout: ``<out>/{train,val}/<class>/<index>.png`` (textures: ``y<row>x<column>.png``, where the
patch was cut), RGB (the grey value in every channel), resized to ``size`` with bicubic
interpolation. The splits are fixed.
"""
from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

VAL_EVERY = 4
# scikit-image's photographs, one texture class each (files in its wheel's skimage/data).
PHOTOGRAPHS = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png", "ihc": "ihc.png",
               "retina": "retina.jpg", "coffee": "coffee.png", "coins": "coins.png", "moon": "moon.png"}
# Colour photographs of scenes, none of them among the textures': (package, file in it).
COLOUR_PHOTOGRAPHS = {
    "astronaut": ("skimage", "data/astronaut.png"), "cat": ("skimage", "data/chelsea.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"), "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"), "temple": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"), "hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
PATCH = 64  # pixels of the photograph a texture patch covers, before resizing
LONGEST = 512  # larger photographs (the retina) are first brought to this side, as the others are
TRAIN_ROWS = 0.7
PER_CLASS = {"train": 200, "val": 50}
MIN_STD = 4.0  # grey levels: a patch of plain background (the retina's black border) names no class


def _save(pixels: np.ndarray, size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(path)


def _every_fourth_to_val(images: np.ndarray, labels: list[str], out: Path, size: int) -> Path:
    counters: dict[str, int] = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        seen = counters.get(label, 0)
        counters[label] = seen + 1
        split = "val" if seen % VAL_EVERY == VAL_EVERY - 1 else "train"
        _save(image, size, out / split / label / f"{index:04d}.png")
    return out


def digits(out: str | Path, size: int = 32) -> Path:
    """Write the digits as an image folder per split; returns ``out``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * 255 / 16).astype(np.uint8)
    return _every_fourth_to_val(grey, [str(label) for label in bunch.target], Path(out), size)


def faces(out: str | Path, size: int = 32) -> Path:
    """scikit-image's ``lfw_subset``: its first 100 images are faces, the other 100 are not."""
    grey = np.round(np.load(files("skimage") / "data" / "lfw_subset.npy") * 255).astype(np.uint8)
    return _every_fourth_to_val(grey, ["face"] * 100 + ["other"] * 100, Path(out), size)


def _corners(grey: np.ndarray, rows: tuple[int, int], count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``count`` top-left corners of patches lying wholly within ``rows``, from a
    quarter-patch grid, plain patches left out."""
    top, bottom = rows
    corners = [(y, x) for y in range(top, bottom - PATCH + 1, PATCH // 4)
               for x in range(0, grey.shape[1] - PATCH + 1, PATCH // 4)
               if grey[y:y + PATCH, x:x + PATCH].std() >= MIN_STD]
    return [corners[i] for i in sorted(rng.permutation(len(corners))[:count])]


def _patches(out: Path, size: int, photographs: dict[str, Path], mode: str) -> Path:
    """Patches of each photograph in ``mode``, one class per photograph; train and val from
    disjoint rows of it. A patch's file is named for where it was cut: ``y<row>x<column>.png`` in
    the resized photograph."""
    rng = np.random.default_rng(0)
    for label, path in photographs.items():
        photo = Image.open(path).convert(mode)
        photo.thumbnail((LONGEST, LONGEST), Image.Resampling.LANCZOS)
        pixels, grey = np.asarray(photo), np.asarray(photo.convert("L"))
        split_row = int(grey.shape[0] * TRAIN_ROWS)
        regions = {"train": (0, split_row), "val": (split_row, grey.shape[0])}
        for split, rows in regions.items():
            for y, x in _corners(grey, rows, PER_CLASS[split], rng):
                _save(np.ascontiguousarray(pixels[y:y + PATCH, x:x + PATCH]), size, out / split / label / f"y{y:04d}x{x:04d}.png")
    return out


def textures(out: str | Path, size: int = 32) -> Path:
    """Grey texture patches of scikit-image's photographs of surfaces."""
    return _patches(Path(out), size, {label: files("skimage") / "data" / name for label, name in PHOTOGRAPHS.items()}, "L")


def photos(out: str | Path, size: int = 32) -> Path:
    """Colour patches of photographs of scenes, from three installed packages."""
    return _patches(Path(out), size, {label: files(package) / name for label, (package, name) in COLOUR_PHOTOGRAPHS.items()},
                    "RGB")


SETS = {"digits": digits, "textures": textures, "faces": faces, "photos": photos}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SETS))
    parser.add_argument("out", help="output folder (train/ and val/ are written inside)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    args = parser.parse_args(argv)
    print(summary(SETS[args.name](args.out, args.size)))
    return 0


def summary(root: Path) -> str:
    """What was written, for a person: "out/digits: 1,797 images of 10 classes, 1,347 train and 450 val (32x32 RGB PNG)"."""
    counts = {split: sum(1 for _ in (root / split).rglob("*.png")) for split in ("train", "val")}
    classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    with Image.open(next((root / "train").rglob("*.png"))) as first:
        width, height = first.size
    return (f"{root}: {sum(counts.values()):,} images of {classes} classes, {counts['train']:,} train and "
            f"{counts['val']:,} val ({width}x{height} RGB PNG)")


if __name__ == "__main__":
    sys.exit(main())
