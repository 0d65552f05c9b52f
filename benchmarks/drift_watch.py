"""How soon the drift watch (``dinomx.drift``) sees real shifts, how often it cries wolf, and what a
window costs, for each window test and window size. It asserts nothing.

    .venv/bin/python benchmarks/drift_watch.py --windows 40 --sizes 25 50 100
    .venv/bin/python benchmarks/drift_watch.py --model models:/demo-backbone@production   # a registered backbone

Images are real (``data.shifts``): tiles of the tests' H&E slide and patches of pydicom's CT, a
reference built from some of them, a held-out pool of the rest (in distribution), and the shifts:
another lab's stain, a blurred scan, the CT under the lung window or blurred (a smoother kernel),
and another domain (digits served to the H&E model). Each row: the share of windows of the shifted
images that the test flags (power; ``first`` is the first of them flagged, so requests until
detection at one image per request are ``first`` x size), and the share of windows of held-out
images it flags (false alarms, to be <= alpha), and the median milliseconds a window's test takes.
Windows are drawn from each pool without replacement (the held-out
pool from other places than the reference's). The backbone defaults to the demo's
architecture at random init (configs/demo.yaml), which is what a watch must work with from a
model's first day; ``--model`` takes a registered one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import shifts  # noqa: E402
from data.samples import digits  # noqa: E402
from dinomx.drift import Reference, window_test  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / ".venv" / "testdata" / "cmu_small_region.svs"


def embedder_of(model: str):
    if model:
        import mlflow

        return mlflow.pyfunc.load_model(model).unwrap_python_model().embedder
    from dinomx.backbone import build_image_processor
    from dinomx.config import DinoMXConfig
    from dinomx.embed import Embedder
    from dinomx.model import build_models

    cfg = DinoMXConfig.from_yaml(REPO / "configs" / "demo.yaml")
    torch.manual_seed(0)
    student, _ = build_models(cfg)
    return Embedder(student.backbone, build_image_processor(cfg.dataset, cfg.crops.global_crops_size, 3))


def sets(reference_size: int, pool: int) -> dict[str, dict[str, np.ndarray]]:
    """Per modality: train, val (the reference), held-out, and each shift, as image arrays."""
    he, held_he = shifts.he_tiles(str(SLIDE), 2 * reference_size, seed=0), shifts.he_tiles(str(SLIDE), pool, seed=7)
    ct, held_ct = shifts.ct_patches(2 * reference_size, seed=0), shifts.ct_patches(pool, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        digit_files = sorted(Path(digits(Path(tmp) / "digits")).rglob("*.png"))[:pool]
        digit_images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in digit_files])
    return {
        "H&E slide": {"train": he[:reference_size], "val": he[reference_size:2 * reference_size], "held-out": held_he,
                      "stain of another lab": shifts.stain(held_he), "out of focus": shifts.blur(held_he, 1.0),
                      "digits (another domain)": digit_images},
        "CT slice": {"train": ct[:reference_size], "val": ct[reference_size:2 * reference_size], "held-out": held_ct,
                     "lung window": shifts.ct_patches(pool, shifts.LUNG, seed=1),
                     "smoother kernel": shifts.blur(held_ct, 1.0)},
    }


def embed(embedder, images: np.ndarray) -> np.ndarray:
    return embedder.embed(shifts.as_images(images))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a registered backbone (default: the demo's at random init)")
    parser.add_argument("--reference", type=int, default=400, help="train and val images of the reference, each")
    parser.add_argument("--pool", type=int, default=400, help="held-out and shifted images per set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100], help="window sizes")
    parser.add_argument("--windows", type=int, default=40, help="windows per row")
    parser.add_argument("--alpha", type=float, default=0.01)
    args = parser.parse_args(argv)
    embedder = embedder_of(args.model)
    rng = np.random.default_rng(0)
    print(f"{'set':<10} {'images':<24} {'test':<4} {'size':>4} {'flagged':>8} {'first':>5} {'ms/window':>9} "
          f"{'ood share':>9}")
    for modality, images in sets(args.reference, args.pool).items():
        embedded = {name: embed(embedder, array) for name, array in images.items()}
        reference = Reference.fit(embedded["train"], embedded["val"])
        for name, pool in embedded.items():
            if name in ("train", "val"):
                continue
            projected = reference.project(pool)
            for test in ("ks", "mmd"):
                for size in args.sizes:
                    flagged, costs, ood = [], [], []
                    for window in range(args.windows):
                        chosen = projected[rng.choice(len(projected), size, replace=False)]
                        start = time.perf_counter()
                        result = window_test(reference, chosen, test, args.alpha, seed=window)
                        costs.append(1000 * (time.perf_counter() - start))
                        flagged.append(result.drifted)
                        ood.append(result.ood_fraction)
                    first = next((i + 1 for i, f in enumerate(flagged) if f), None)
                    print(f"{modality:<10} {name:<24} {test:<4} {size:>4} {np.mean(flagged):>8.2f} "
                          f"{first if first else '-':>5} {statistics.median(costs):>9.1f} {np.mean(ood):>9.2f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
