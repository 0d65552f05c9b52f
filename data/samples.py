"""Real labelled images that installed packages ship, written as image folders.

The engine's learning is checked on images that no one here generated: scikit-learn carries the
UCI handwritten digits (1797 scans of real handwriting, 8x8, 17 grey levels, 10 classes) inside
its wheel, so they are on every machine that installed the project and need no download.

    python -m data.samples digits out/digits --size 32

Layout: ``<out>/{train,val}/<digit>/<index>.png``, RGB (the grey value in every channel), upscaled
with bicubic interpolation. Every fourth image of each class goes to ``val``; the split is fixed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VAL_EVERY = 4


def digits(out: str | Path, size: int = 32) -> Path:
    """Write the digits as an image folder per split; returns ``out``."""
    from sklearn.datasets import load_digits

    out = Path(out)
    bunch = load_digits()
    counters: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(bunch.images, bunch.target)):
        seen = counters.get(int(label), 0)
        counters[int(label)] = seen + 1
        split = "val" if seen % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L")
        grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{index:04d}.png")
    return out


SETS = {"digits": digits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SETS))
    parser.add_argument("out", help="output folder (train/ and val/ are written inside)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    args = parser.parse_args(argv)
    print(SETS[args.name](args.out, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
